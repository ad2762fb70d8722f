"""The weight-sync checks: the on-policy mismatch KL (rayrl.algo.mismatch), the versions the
generators report after a publish, and the config keys that select the engine and the limit."""

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from rayrl.algo.mismatch import (MismatchWindow, WeightSyncError, check_mismatch, check_served_versions,
                                 onpolicy_mismatch_sums)
from rayrl.config import ConfigError, GRPOConfig, TinyModelConfig, load
from rayrl.models import ensure_tiny_model, state_dict_numpy
from rayrl.tree import NOT_SAMPLED


def test_mismatch_counts_only_the_sampled_tokens_of_the_learners_version():
    learner = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -9.0, -0.3]])
    behaviour = torch.tensor([[-1.2, -2.0, -0.1, -1.0], [-0.1, -0.4, -1.0, -0.3]])
    versions = torch.tensor([[4, 4, 3, 4], [4, 4, NOT_SAMPLED, 4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    total, count = onpolicy_mismatch_sums(learner, behaviour, versions, mask, version=4)
    # On-policy: (0,0), (0,1), (1,0), (1,1), (1,3); (0,2) is stale, (0,3) and (1,2) are not sampled.
    log_r = np.array([0.2, 0.0, 0.0, 0.2, 0.0])
    assert count == 5
    assert total == pytest.approx(np.sum(np.exp(log_r) - 1 - log_r), rel=1e-6)
    assert onpolicy_mismatch_sums(learner, learner, versions, mask, 4) == (0.0, 5.0)
    assert onpolicy_mismatch_sums(learner, behaviour, versions, mask, 5)[1] == 0.0


def test_k3_is_non_negative_and_estimates_the_kl_of_the_behaviour_policy():
    """Tokens drawn from pi_b: the mean of r - 1 - log r approaches KL(pi_b || pi_learner)."""
    generator = torch.Generator().manual_seed(0)
    behaviour_logits, learner_logits = torch.randn(2, 50, generator=generator)
    pi_b, pi_l = behaviour_logits.log_softmax(-1), learner_logits.log_softmax(-1)
    tokens = torch.multinomial(pi_b.exp(), 200_000, replacement=True, generator=generator)
    total, count = onpolicy_mismatch_sums(pi_l[tokens][None], pi_b[tokens][None], torch.ones(1, len(tokens)),
                                          torch.ones(1, len(tokens)), 1)
    exact = float((pi_b.exp() * (pi_b - pi_l)).sum())
    assert total / count == pytest.approx(exact, rel=0.03)


def test_check_mismatch_names_the_version_the_value_and_the_key():
    assert check_mismatch(0.0, 0.0, 3, 1e-3) is None   # no on-policy tokens: nothing to check
    assert check_mismatch(2e-4, 10.0, 3, 1e-3) == pytest.approx(2e-5)
    assert check_mismatch(5.0, 10.0, 3, 0.0) == 0.5   # 0: no limit, only the value
    with pytest.raises(WeightSyncError, match=r"version 7: .* 10 tokens .* is 0\.05 > rollout\.max_mismatch_kl=0\.001"):
        check_mismatch(0.5, 10.0, 7, 1e-3)
    with pytest.raises(WeightSyncError):
        check_mismatch(float("nan"), 10.0, 7, 1e-3)


def k3_sum(log_r: np.ndarray) -> float:
    return float(np.sum(np.exp(log_r) - 1 - log_r))


def test_the_window_pools_small_steps_so_one_bf16_outlier_does_not_stop_the_run():
    """Steps of 50 on-policy tokens with bf16-like noise (|log r| ~ 1e-3), one of them holding a
    token off by 3 nats (k3 17: alone, that step's mean is 0.34): pooled over 1000 tokens the mean
    stays far below the limit. The same steps with every token shifted (a skipped update) fail,
    naming the versions the window spans."""
    rng = np.random.default_rng(0)
    steps = [rng.normal(0, 1e-3, 50) for _ in range(40)]
    steps[7][13] = 3.0
    assert k3_sum(steps[7]) / 50 > 0.3 > 2e-2
    window, checked = MismatchWindow(), []
    for version, log_r in enumerate(steps, start=1):
        kl = window.add(k3_sum(log_r), len(log_r), version, 2e-2, 1000)
        if kl is not None:
            checked.append((version, kl))
    assert [v for v, _ in checked] == [20, 40]   # every 20 steps of 50 tokens
    assert checked[0][1] == pytest.approx(sum(k3_sum(x) for x in steps[:20]) / 1000) and checked[0][1] < 2e-2
    assert window.add(0.0, 0.0, 41, 2e-2, 1000) is None and window.tokens == 0   # no on-policy tokens: nothing
    # One step checked alone (min_tokens=1) fails on the outlier.
    with pytest.raises(WeightSyncError, match=r"at version 8: .* 50 tokens .* is 0\.3"):
        MismatchWindow().add(k3_sum(steps[7]), 50, 8, 2e-2, 1)
    # A skipped update moves every token (here by 0.3 nats, k3 0.05; with the outlier 0.073): the
    # window fails at its 1000th token.
    window = MismatchWindow()
    for version, log_r in enumerate(steps[:19], start=5):
        assert window.add(k3_sum(log_r + 0.3), 50, version, 2e-2, 1000) is None
    with pytest.raises(WeightSyncError, match=r"at versions 5-24: .* 1000 tokens .* is 0\.0726 >"):
        window.add(k3_sum(steps[19] + 0.3), 50, 24, 2e-2, 1000)
    assert window.tokens == 0   # checked, so a new window starts


def test_served_versions_must_all_be_the_published_one():
    check_served_versions([5, 5], 5)
    with pytest.raises(WeightSyncError, match="version 5 were published, but generator 1 serves version 4"):
        check_served_versions([5, 4], 5)


@pytest.mark.parametrize("args, key", [(["rollout.engine=sglang"], "rollout.engine"),
                                       (["rollout.vllm_dtype=int8"], "rollout.vllm_dtype"),
                                       (["rollout.max_mismatch_kl=-1"], "rollout.max_mismatch_kl"),
                                       (["rollout.mismatch_check_tokens=0"], "rollout.mismatch_check_tokens")])
def test_engine_settings_are_checked(args, key):
    with pytest.raises(ConfigError, match=key):
        load(GRPOConfig, None, args)
    assert load(GRPOConfig, None, ["rollout.engine=vllm"]).rollout.engine == "vllm"


async def test_a_generator_reports_the_version_its_engine_serves(tmp_path):
    """update_weights swaps the weights in and returns the engine's version; an engine that drops
    the update (its loader disabled here, the fault under test) reports the old one, and the
    driver's check names it."""
    from rayrl.rollout.generator import RolloutGenerator
    path = ensure_tiny_model(str(tmp_path), TinyModelConfig())
    cfg = GRPOConfig()
    gen = RolloutGenerator(path, replace(cfg.rollout, group_size=2), cfg.task, seed=0)
    weights = {k: v * 1.5 for k, v in state_dict_numpy(gen.engine.model).items()}
    published = asyncio.get_running_loop().create_future()   # stands in for the ObjectRef
    published.set_result(weights)
    assert await gen.update_weights(1, [published]) == 1 == gen.version()
    assert np.array_equal(state_dict_numpy(gen.engine.model)["model.norm.weight"], weights["model.norm.weight"])
    gen.engine.load_weights = lambda state, version: None
    served = [await gen.update_weights(2, [published])]
    with pytest.raises(WeightSyncError, match="generator 0 serves version 1"):
        check_served_versions(served, 2)
