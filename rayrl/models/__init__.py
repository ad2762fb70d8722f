"""Hugging Face model folders: the tiny default model and tokenizer, SmolLM2, loading, weight transfer."""

from rayrl.models.hf import (
    SMOLLM2,
    build_tiny_model,
    chat_prompt_ids,
    ensure_tiny_model,
    load_model,
    load_state_dict_numpy,
    load_tokenizer,
    resolve_model_path,
    smollm2_path,
    state_dict_numpy,
    tiny_model_key,
)
from rayrl.models.tokenizer import build_char_tokenizer

__all__ = [
    "SMOLLM2",
    "build_char_tokenizer",
    "build_tiny_model",
    "chat_prompt_ids",
    "ensure_tiny_model",
    "load_model",
    "load_state_dict_numpy",
    "load_tokenizer",
    "resolve_model_path",
    "smollm2_path",
    "state_dict_numpy",
    "tiny_model_key",
]
