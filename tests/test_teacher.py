"""Teachers in scoring mode: the student's tree gets the teacher's log-prob of every token."""

import numpy as np
import pytest
import torch

from rayrl.config import TinyModelConfig
from rayrl.learner.worker import pad_paths
from rayrl.models import ensure_tiny_model
from rayrl.rollout.teacher import score_tree
from rayrl.rollout.torch_engine import TorchEngine
from rayrl.tree import NOT_SAMPLED, TrajectoryTree, decode, encode, summarize


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return TorchEngine(ensure_tiny_model(str(tmp_path_factory.mktemp("models")), TinyModelConfig()))


def agent_tree(rng) -> TrajectoryTree:
    """A group of two agent episodes (turn, observation, turn) and one single-turn sample."""
    tree = TrajectoryTree(rng.integers(5, 90, 12), meta={"task": {"domain": "terminal"}})
    for _ in range(2):
        turn = tree.add(0, rng.integers(5, 90, 6), -rng.random(6), np.ones(6, np.uint8), np.full(6, 3))
        obs = tree.add(turn, rng.integers(5, 90, 4), None, np.zeros(4, np.uint8), np.full(4, NOT_SAMPLED))
        tree.add(obs, rng.integers(5, 90, 5), -rng.random(5), np.ones(5, np.uint8), np.full(5, 4))
    tree.add(0, rng.integers(5, 90, 7), -rng.random(7), np.ones(7, np.uint8), np.full(7, 3))
    return tree


def test_teacher_log_probs_equal_a_full_forward_of_each_path(engine):
    tree = score_tree(engine.score, agent_tree(np.random.default_rng(0)))
    model = engine.model
    for path in tree.paths():
        ids = torch.as_tensor(path.tokens.astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = logp.gather(-1, ids[0, 1:, None])[:, 0].numpy()
        n = len(tree.nodes[0])
        np.testing.assert_allclose(path.teacher_logprobs[n:], expected[n - 1:], atol=1e-5)
        assert not path.teacher_logprobs[:n].any()     # the prompt is not scored


def test_teacher_column_survives_the_codec_and_feeds_the_summary(engine):
    tree = score_tree(engine.score, agent_tree(np.random.default_rng(1)))
    again = decode(encode(tree))
    assert again == tree
    unscored = agent_tree(np.random.default_rng(1))
    assert decode(encode(unscored)).nodes[1].teacher_logprobs is None
    meta = summarize(tree)
    diffs = [p.logprobs[p.loss_mask == 1] - p.teacher_logprobs[p.loss_mask == 1] for p in tree.paths()]
    assert meta["teacher_tokens"] == sum(len(d) for d in diffs) == 29
    assert meta["reverse_kl_sum"] == pytest.approx(sum(float(d.sum()) for d in diffs), rel=1e-5)
    assert meta["domain"] == "terminal" and summarize(unscored)["teacher_tokens"] == 0


def test_per_token_advantages_reach_the_padded_batch():
    tree = agent_tree(np.random.default_rng(2))
    paths = tree.paths()
    advantages = [np.arange(len(p), dtype=np.float32) for p in paths]
    batch = pad_paths(paths, advantages=advantages)
    for i, p in enumerate(paths):   # shifted by one: position t holds the advantage of token t+1
        np.testing.assert_array_equal(batch["advantage"][i, :len(p) - 1].numpy(), advantages[i][1:])


def test_topk_scoring_gives_the_teachers_k_likeliest_tokens_at_every_position(engine, lively_engine):
    """distill.topk: at every scored position the k likeliest next tokens and their log-probs
    (those of a full forward), which survive the codec and reach the padded batch shifted like
    the other per-token arrays."""
    k = 5
    tree = score_tree(lively_engine.score, agent_tree(np.random.default_rng(3)), 1.0, topk=k)
    n = len(tree.nodes[0])
    for path in tree.paths():
        ids = torch.as_tensor(path.tokens.astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(lively_engine.model(input_ids=ids).logits[0, :-1].float(), -1)
        top = logp.topk(k, dim=-1)
        np.testing.assert_array_equal(path.teacher_topk_ids[n:], top.indices[n - 1:].numpy())
        np.testing.assert_allclose(path.teacher_topk_logprobs[n:], top.values[n - 1:].numpy(), atol=1e-5)
        assert (np.diff(path.teacher_topk_logprobs[n:], axis=1) <= 0).all()   # likeliest first
        assert not path.teacher_topk_logprobs[:n].any()   # the prompt is not scored
    again = decode(encode(tree))
    assert again == tree and again.nodes[1].teacher_topk_ids.shape == (len(again.nodes[1]), k)
    assert decode(encode(score_tree(engine.score, agent_tree(np.random.default_rng(3))))).nodes[1].teacher_topk_ids \
        is None
    paths = again.paths()
    batch = pad_paths(paths)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(batch["topk_ids"][i, :len(p) - 1].numpy(), p.teacher_topk_ids[1:])
        np.testing.assert_array_equal(batch["topk_logprobs"][i, :len(p) - 1].numpy(), p.teacher_topk_logprobs[1:])
    assert "topk_ids" not in pad_paths(agent_tree(np.random.default_rng(3)).paths())


@pytest.fixture(scope="module")
def lively_engine(tmp_path_factory):
    """A tiny model with sharp distributions (a fresh one is near uniform: its top-k would be ties)."""
    path = ensure_tiny_model(str(tmp_path_factory.mktemp("lively")), TinyModelConfig())
    engine = TorchEngine(path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in engine.model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2, generator=generator)
    return engine


def test_a_top_k_wider_than_the_vocabulary_is_refused(engine, tmp_path):
    from rayrl.rollout.teacher import Teacher
    path = ensure_tiny_model(str(tmp_path), TinyModelConfig())
    vocab = engine.vocab_size
    assert Teacher(path, topk=vocab).topk == vocab
    with pytest.raises(ValueError, match=f"distill.topk={vocab + 1} exceeds the vocabulary"):
        Teacher(path, topk=vocab + 1)
