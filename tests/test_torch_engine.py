"""TorchEngine: KV-cached batched sampling against naive full-forward references."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from rayrl.algo.logprobs import gather_logprobs
from rayrl.config import ModelConfig, TinyModelConfig, expand
from rayrl.models import ensure_tiny_model, load_tokenizer, smollm2_path, state_dict_numpy
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.torch_engine import TorchEngine, _sample, _top_p_filter

TINY = TinyModelConfig()  # the default: 2 layers, hidden 128


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def _lively_engine(path, seed=0, **kwargs):
    """An engine whose weight matrices are redrawn with std 0.2.

    A fresh tiny model (init std 0.02, tied embeddings) greedily just repeats the last prompt
    token, which would make token-level comparisons blind to most bugs.
    """
    engine = TorchEngine(path, **kwargs)
    rng = np.random.default_rng(seed)
    weights = {name: array if array.ndim == 1 else rng.normal(0.0, 0.2, array.shape).astype(np.float32)
               for name, array in state_dict_numpy(engine.model).items()}
    engine.load_weights(weights, version=0)
    return engine


@pytest.fixture(scope="module")
def engine(cache):
    return _lively_engine(ensure_tiny_model(cache, TINY))


def _prompts(n, low=1, high=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 101, size=int(rng.integers(low, high))) for _ in range(n)]


@torch.inference_mode()
def _naive_greedy(model, prompt, max_new_tokens):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache, no padding)."""
    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None]
    for _ in range(max_new_tokens):
        token = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@torch.inference_mode()
def _teacher_forced_logprobs(model, prompt, completion, temperature):
    ids = torch.as_tensor(np.concatenate([prompt, completion]).astype(np.int64))[None]
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return gather_logprobs(logits, torch.as_tensor(completion.astype(np.int64)), temperature).numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_greedy_matches_naive_loop_with_left_padding(cache, family):
    engine = _lively_engine(ensure_tiny_model(cache, dataclasses.replace(TINY, family=family)))
    prompts = _prompts(7, low=1, high=20)
    assert len({len(p) for p in prompts}) > 3  # really mixed lengths, so rows are padded differently
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens.dtype == np.int32 and completion.logprobs.dtype == np.float32
        assert completion.tokens.tolist() == _naive_greedy(engine.model, prompt, 12)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.5, 1.0)])
def test_recorded_logprobs_match_a_teacher_forced_forward(engine, temperature, top_p):
    prompts = _prompts(6, seed=1)
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p, seed=3)
    lp_temperature = temperature if temperature > 0 else 1.0
    for prompt, completion in zip(prompts, engine.generate(prompts, params)):
        expected = _teacher_forced_logprobs(engine.model, prompt, completion.tokens, lp_temperature)
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4)


def test_score_matches_completion_logprobs(engine):
    prompts = _prompts(9, seed=2)
    for temperature in (1.0, 0.7):
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=temperature, seed=0))
        scores = engine.score(prompts, [c.tokens for c in completions], temperature=temperature)
        for score, completion in zip(scores, completions):
            assert score.dtype == np.float32
            np.testing.assert_allclose(score, completion.logprobs, atol=1e-4)
    # continuations of different lengths in one batch, one of them empty
    scores = engine.score(prompts[:3], [[7, 8, 9], [], [10]])
    assert [len(s) for s in scores] == [3, 0, 1]
    np.testing.assert_allclose(scores[0], _teacher_forced_logprobs(engine.model, prompts[0], np.array([7, 8, 9]), 1.0),
                               atol=1e-4)


def test_tiny_top_p_is_greedy(engine):
    prompts = _prompts(8, seed=4)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    nucleus = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5))
    for g, n in zip(greedy, nucleus):
        assert g.tokens.tolist() == n.tokens.tolist()
        np.testing.assert_allclose(g.logprobs, n.logprobs, atol=1e-6)  # both at T=1, untruncated


def test_top_p_filter_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.1, 0.2, 0.3, 0.4]])
    kept = _top_p_filter(probs, 0.75)
    assert (kept > 0).tolist() == [[False, True, False, True], [False, True, True, True]]
    assert torch.equal(kept[kept > 0], probs[kept > 0])  # survivors keep their weight


def test_sampler_follows_the_tempered_nucleus_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    token, logprob = _sample(logits, SamplingParams(temperature=1.0, top_p=0.9), generator)
    freq = torch.bincount(token, minlength=4).float() / len(token)
    np.testing.assert_allclose(freq.numpy(), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)
    np.testing.assert_allclose(logprob.numpy(), np.log([0.5, 0.3, 0.15, 0.05])[token.numpy()], atol=1e-5)
    token, _ = _sample(logits, SamplingParams(temperature=0.5), generator)
    sharpened = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    freq = torch.bincount(token, minlength=4).float() / len(token)
    np.testing.assert_allclose(freq.numpy(), sharpened / sharpened.sum(), atol=0.015)


def test_stop_tokens_end_sequences(engine):
    prompts = _prompts(8, seed=6)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    stop = int(free[0].tokens[2])  # hit by row 0 at step 2 or earlier
    stopped = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop, 999)))
    reasons = set()
    for f, s in zip(free, stopped):
        hits = np.flatnonzero(f.tokens == stop)
        if len(hits):
            assert s.tokens.tolist() == f.tokens[:hits[0] + 1].tolist() and s.finish_reason == "stop"
        else:
            assert s.tokens.tolist() == f.tokens.tolist() and s.finish_reason == "length"
        np.testing.assert_allclose(s.logprobs, f.logprobs[:len(s.tokens)], atol=1e-5)
        reasons.add(s.finish_reason)
    assert stopped[0].finish_reason == "stop"
    assert len({len(s.tokens) for s in stopped}) > 1  # rows left the batch at different steps


def test_max_new_tokens_gives_length(engine):
    for completion in engine.generate(_prompts(5), SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)):
        assert len(completion.tokens) == len(completion.logprobs) == 4
        assert completion.finish_reason == "length"


def test_sampling_is_reproducible_by_seed(cache, engine):
    prompts = _prompts(16, seed=7)

    def sample(e, seed):
        return [c.tokens.tolist() for c in e.generate(prompts, SamplingParams(max_new_tokens=8, seed=seed))]

    assert sample(engine, 11) == sample(engine, 11)
    assert sample(engine, 11) != sample(engine, 12)
    # seed=None continues the engine's own stream: fresh engines with one seed agree, calls differ
    a, b = (_lively_engine(ensure_tiny_model(cache, TINY), seed=42) for _ in range(2))
    first = sample(a, None)
    assert first == sample(b, None) and sample(a, None) != first


def test_chunking_by_max_batch_changes_nothing(cache, engine):
    small = _lively_engine(ensure_tiny_model(cache, TINY), max_batch=3)
    prompts = _prompts(10, seed=8)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    for a, b in zip(engine.generate(prompts, params), small.generate(prompts, params)):
        assert a.tokens.tolist() == b.tokens.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_load_weights_changes_outputs_and_version(cache):
    path = ensure_tiny_model(cache, TINY)
    engine, other = _lively_engine(path, seed=0), _lively_engine(path, seed=1)
    prompts = _prompts(6, seed=9)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    before = engine.generate(prompts, params)
    assert {c.version for c in before} == {0}
    published = state_dict_numpy(other.model)
    for array in published.values():
        array.flags.writeable = False  # as they come out of the Ray object store
    engine.load_weights(published, version=3)
    after = engine.generate(prompts, params)
    expected = other.generate(prompts, params)
    assert engine.version == 3 and {c.version for c in after} == {3}
    assert [c.tokens.tolist() for c in after] != [c.tokens.tolist() for c in before]
    assert [c.tokens.tolist() for c in after] == [c.tokens.tolist() for c in expected]


def test_rejects_empty_prompts(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1, 2], []], SamplingParams())


def test_256_by_8_tokens_is_fast(engine):
    prompts = _prompts(256, low=8, high=24, seed=10)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)
    engine.generate(prompts[:8], params)  # warm-up
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert sum(len(c.tokens) for c in completions) == 256 * 8
    assert elapsed < 5.0, f"256 x 8 tokens took {elapsed:.2f} s (expected well under 1 s)"


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct, converted once into the shared model cache (~30 s the first time)."""
    path = smollm2_path(expand(ModelConfig().cache_dir))
    return TorchEngine(path), load_tokenizer(path)


def test_smollm2_generates_from_a_chat_prompt(smollm2):
    engine, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(tokenizer.eos_token_id,))
    greedy, = engine.generate([prompt], params)
    assert np.isfinite(greedy.logprobs).all() and (greedy.logprobs <= 0).all()
    assert "Paris" in tokenizer.decode(greedy.tokens, skip_special_tokens=True)
    np.testing.assert_allclose(engine.score([prompt], [greedy.tokens])[0], greedy.logprobs, atol=1e-4)
    sampled = engine.generate([prompt, prompt[-5:]], SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.95,
                                                                    seed=0))
    for completion in sampled:
        assert 1 <= len(completion.tokens) <= 6 and np.isfinite(completion.logprobs).all()
        assert isinstance(tokenizer.decode(completion.tokens), str)
