"""MCLA and routing replay on a tiny MoE: the routing control, the engine's K-pass behaviour
log-probs and recorded routes, the learner's replay plans, and (the acceptance measurement) the
variance of the log importance weights for K = 1 and 8 with the share IcePop masks.

Why a measurement and not an RL run that collapses: on a model this small, noisy routing moves
log-probs by a few percent (var log w ~ 0.1 at K = 1, ~2% of tokens outside IcePop's [0.5, 2]),
which GRPO rides out for the few dozen steps a test can afford; neither a reward collapse nor an
explosion of the IS weights shows up reliably, with or without MCLA. The variance and masking
that MCLA and routing replay act on are what can be measured, on fixed seeds.
"""

import numpy as np
import pytest
import torch

from rayrl.algo.mcla import average_passes, log_weight_stats, mcla_passes
from rayrl.config import LossConfig, MCLAConfig, TinyModelConfig
from rayrl.mcla import engine_and_learner, local_worker, measure, sample, warm_start
from rayrl.models import build_tiny_model, load_model, load_tokenizer
from rayrl.models.moe import routes_from_bytes, routes_to_bytes, routing
from rayrl.tree import TrajectoryTree, decode, encode

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, expert_size=16,
             num_experts=4, experts_per_token=2)


@pytest.fixture(scope="module")
def small_moe(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("moe")), TinyModelConfig(family="qwen3_moe", router_noise=1.0,
                                                                                  **SMALL))


def forward(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits, -1)


def test_moe_builds_loads_and_saves_with_its_noise(small_moe, tmp_path):
    model = load_model(small_moe)
    control = routing(model)
    assert (control.num_layers, control.top_k, control.num_experts, control.noise) == (2, 2, 4, 1.0)
    assert routing(load_model(build_tiny_model(str(tmp_path / "dense"), TinyModelConfig(**{
        k: v for k, v in SMALL.items() if "expert" not in k})))) is None
    model.save_pretrained(tmp_path / "again")   # the router's forward is replaced, not its module: same names
    load_tokenizer(small_moe).save_pretrained(tmp_path / "again")
    again = load_model(str(tmp_path / "again"))
    assert routing(again).noise == 1.0
    assert set(dict(again.named_parameters())) == set(dict(model.named_parameters()))


def test_router_noise_moves_log_probs_and_replay_pins_the_experts(small_moe):
    model = load_model(small_moe)
    control = routing(model)
    control.reseed(0)
    ids = torch.randint(5, 90, (3, 12))
    with control.record():
        first = forward(model, ids)
    plan = control.recorded()
    assert plan.shape == (36, 2, 2)
    assert not torch.allclose(first, forward(model, ids))   # a fresh noise draw: another estimate
    with control.replay(plan), control.record():
        forward(model, ids)
    assert torch.equal(control.recorded(), plan)            # replayed passes use exactly the plan
    control.noise = 0.0
    free = forward(model, ids)
    assert torch.equal(free, forward(model, ids))           # no noise: deterministic
    with control.record():
        forward(model, ids)
    exact = control.recorded()
    with control.replay(torch.full_like(exact, -1)):        # -1 rows route as usual
        assert torch.equal(forward(model, ids), free)
    with control.replay(exact):
        assert torch.equal(forward(model, ids), free)
    with pytest.raises(ValueError, match="rows"):
        with control.replay(exact[:5]):
            forward(model, ids)


def test_mcla_pass_counts():
    assert mcla_passes(MCLAConfig(), is_moe=True) == (8, 8)
    assert mcla_passes(MCLAConfig(), is_moe=False) == (1, 1)
    assert mcla_passes(MCLAConfig(k=4, side="engine"), is_moe=True) == (4, 1)
    assert mcla_passes(MCLAConfig(k=2, side="learner"), is_moe=False) == (1, 2)
    draws = iter([torch.tensor([3.0]), torch.tensor([5.0])])
    assert average_passes(torch.tensor([1.0]), lambda: next(draws), 3).item() == pytest.approx(3.0)


def test_log_weight_stats():
    stats = log_weight_stats(torch.log(torch.tensor([[1.0, 3.0, 0.25, 1.0]])), torch.tensor([[1, 1, 1, 0]]))
    assert stats["masked_frac"] == pytest.approx(2 / 3) and stats["max_weight"] == pytest.approx(3.0)
    values = np.log([1.0, 3.0, 0.25])
    assert stats["var"] == pytest.approx(values.var()) and stats["mean"] == pytest.approx(values.mean())


def test_engine_averages_passes_and_records_routes_of_prompt_and_completion(small_moe):
    engine, _ = engine_and_learner(small_moe)
    tokenizer = load_tokenizer(small_moe)
    prompts, completions, params = sample(engine, tokenizer, 6)
    engine.logprob_passes, engine.record_routes = 4, True
    scored = engine._rescore(prompts, completions, params)
    for prompt, before, after in zip(prompts, completions, scored):
        assert np.array_equal(before.tokens, after.tokens)
        assert after.routes.shape == (len(prompt) + len(after.tokens), 2, 2)
        assert np.array_equal(routes_from_bytes(routes_to_bytes(after.routes), 2, 2), after.routes)
    routing(engine.model).noise = 0.0   # exact routing: the K-pass mean is the sampling pass's value
    exact = engine._rescore(prompts, completions, params)
    engine.logprob_passes, engine.record_routes = 1, False
    resampled = engine.generate(prompts[:1], params)   # greedy would skip rescoring; this one samples
    assert resampled[0].routes is None
    first = engine.score(prompts[:1], [completions[0].tokens])[0]
    np.testing.assert_allclose(exact[0].logprobs, first, atol=1e-5)


@pytest.mark.parametrize("tree_training", [False, True])
def test_learner_replays_the_routes_the_engine_recorded(small_moe, tree_training):
    engine, learner = engine_and_learner(small_moe)
    prompts, completions, params = sample(engine, load_tokenizer(small_moe), 5)
    engine.record_routes = True
    scored = engine._rescore(prompts, completions, params)
    trees = []
    for prompt, c in zip(prompts, scored):
        tree = TrajectoryTree(prompt)
        tree.add(0, c.tokens, c.logprobs, np.ones(len(c.tokens), np.uint8), meta={"routes": routes_to_bytes(c.routes)})
        trees.append(decode(encode(tree)))   # the routes travel with the tree
    paths = [p for t in trees for p in t.paths()]
    worker = local_worker(learner, LossConfig(mcla=MCLAConfig(k=1, routing_replay=True)))
    worker.cfg.tree_training = tree_training
    tensors = worker._batch_tensors(paths, "rl", 0.0)
    plan = tensors["routes"]
    if tree_training:   # a token shared by several paths (the chat prefix) carries one path's routes
        packed = tensors["tree"]
        for b, c in enumerate(scored[:1]):
            assert np.array_equal(plan[packed.path_index[b][-len(c.tokens):]].numpy(), c.routes[-len(c.tokens):])
    else:
        width = tensors["tokens"].shape[1]
        rows = plan.reshape(len(paths), width, 2, 2)
        for b, c in enumerate(scored):
            n = len(prompts[b]) + len(c.tokens)
            assert np.array_equal(rows[b, :n].numpy(), c.routes) and (rows[b, n:] == -1).all()
    # The learner's forward follows the plan.
    with routing(learner).record(), torch.no_grad():
        from rayrl.models.moe import replay_routes
        with replay_routes(learner, plan):
            worker._token_logprobs(tensors)
    assert torch.equal(routing(learner).recorded()[(plan >= 0).all(-1).all(-1)], plan[(plan >= 0).all(-1).all(-1)])


def test_mcla_and_routing_replay_cut_the_variance_of_log_importance_weights(tmp_path):
    """The acceptance measurement (benchmarks/mcla.py at test size): same weights on both sides,
    so all the mismatch is routing noise. K = 8 passes per side cut Var[log w] at least 4-fold;
    routing replay cuts it at K = 1; IcePop masks fewer tokens with K = 8."""
    torch.manual_seed(0)
    path = build_tiny_model(str(tmp_path / "moe"), TinyModelConfig(family="qwen3_moe", router_noise=1.0))
    path = warm_start(path, str(tmp_path / "sft"), steps=120)
    results = measure(path, ks=(1, 8), n=96)
    k1, k8, replay1 = results[(1, False)], results[(8, False)], results[(1, True)]
    assert k8["var"] <= k1["var"] / 4, results
    assert replay1["var"] < k1["var"], results
    assert k8["masked_frac"] <= k1["masked_frac"], results
    assert k1["max_weight"] > k8["max_weight"], results
