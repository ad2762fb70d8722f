"""History Resampling (SRPO) and dynamic sampling (DAPO): the rules as pure functions, the prompt
set's epochs and stage mix, and the replay buffer that hands prompts out and records outcomes.
No Ray: the buffer is a plain object here."""

import json
from collections import Counter

import pytest

from rayrl.algo.resampling import (ALL_CORRECT, ALL_WRONG, MIXED, UNGRADED, curate, effective_fraction,
                                   group_outcome, keep_group, next_epoch)
from rayrl.replay.buffer import ReplayBuffer
from rayrl.replay.prompts import PromptSet, prompt_key


def tasks(domain, n):
    return [{"id": f"{domain}-{i}", "prompt": f"p{i}", "answer": "", "domain": domain, "meta": {}} for i in range(n)]


@pytest.mark.parametrize("rewards, outcome", [
    ([1.0, 1.0, 1.0], ALL_CORRECT),
    ([0.0, 0.0], ALL_WRONG),
    ([1.0, 0.0, 1.0], MIXED),
    ([1.0, None, 1.0], ALL_CORRECT),          # an infrastructure failure is no evidence either way
    ([None, float("nan")], UNGRADED),
    ([0.5, 0.5], ALL_WRONG),                  # partial credit is not success at 1.0
])
def test_group_outcome(rewards, outcome):
    assert group_outcome(rewards) == outcome


def test_group_outcome_success_threshold():
    assert group_outcome([0.5, 0.7], success=0.5) == ALL_CORRECT


def test_dynamic_sampling_keeps_only_groups_with_differing_rewards():
    assert keep_group([1.0, 0.0]) and keep_group([0.2, 0.3, None])
    assert not keep_group([1.0, 1.0]) and not keep_group([0.0, 0.0, None]) and not keep_group([1.0])


def test_next_epoch_drops_solved_keeps_mixed_wrong_and_unseen():
    latest = {"a": ALL_CORRECT, "b": MIXED, "c": ALL_WRONG}
    assert next_epoch(["a", "b", "c", "d"], latest) == (["b", "c", "d"], ["a"])
    assert next_epoch(["a"], latest) == ([], ["a"])


def test_next_epoch_floor_brings_back_the_prompts_dropped_longest_ago():
    latest = {"a": ALL_CORRECT, "b": ALL_CORRECT, "c": ALL_WRONG}
    assert next_epoch(["a", "b", "c"], latest, dropped=["x", "y"], min_active=3) == (["c", "x", "y"], ["a", "b"])
    assert next_epoch(["a", "b", "c"], latest, dropped=["x"], min_active=4) == (["c", "x", "a", "b"], [])
    assert next_epoch(["a", "b", "c"], latest, dropped=["x"], min_active=1) == (["c"], ["x", "a", "b"])


def test_effective_fraction_counts_samples_of_groups_with_signal():
    assert effective_fraction([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]) == pytest.approx(4 / 8)
    assert effective_fraction([]) == 0.0


def drain(ps, n):
    return [ps.next()["id"] for _ in range(n)]


def test_epochs_visit_every_prompt_once_in_a_fresh_order():
    ps = PromptSet(tasks("math", 6), seed=1)
    first, second = drain(ps, 6), drain(ps, 6)
    assert sorted(first) == sorted(second) == sorted(t["id"] for t in tasks("math", 6))
    assert first != second          # reshuffled per epoch
    assert ps.epoch["math"] == 2


def test_history_resampling_drops_solved_prompts_at_the_epoch_boundary_only():
    ps = PromptSet(tasks("math", 4), history=True)
    for tid in drain(ps, 4):
        rewards = {"math-0": [1, 1], "math-1": [1, 0], "math-2": [0, 0], "math-3": [None, None]}[tid]
        ps.record("math", tid, rewards)
    assert ps.stats()["prompts/math/active"] == 4            # still epoch 1
    second = drain(ps, 3)
    assert sorted(second) == ["math-1", "math-2", "math-3"]  # solved math-0 left; ungraded math-3 kept
    assert ps.stats()["prompts/math/solved_dropped"] == 1
    # A kept prompt that is solved later leaves at the next boundary; recovering is too late for a dropped one.
    ps.record("math", "math-1", [1.0, 1.0])
    ps.record("math", "math-0", [0.0, 1.0])
    assert sorted(drain(ps, 2)) == ["math-2", "math-3"]


def test_without_history_solved_prompts_stay():
    ps = PromptSet(tasks("math", 3), history=False)
    for tid in drain(ps, 3):
        ps.record("math", tid, [1.0, 1.0])
    assert sorted(drain(ps, 3)) == ["math-0", "math-1", "math-2"]


def test_a_fully_solved_domain_starts_over_instead_of_stalling():
    ps = PromptSet(tasks("math", 2), history=True)
    for tid in drain(ps, 2):
        ps.record("math", tid, [1.0])
    assert sorted(drain(ps, 2)) == ["math-0", "math-1"]
    assert ps.stats()["prompts/math/restarts"] == 1


def test_stage_weights_give_each_domain_its_share():
    ps = PromptSet(tasks("math", 5) + tasks("code", 5))
    ps.set_weights({"math": 1.0})
    assert {t.split("-")[0] for t in drain(ps, 7)} == {"math"}
    ps.set_weights({"math": 0.25, "code": 0.75})
    counts = Counter(t.split("-")[0] for t in drain(ps, 8))
    assert counts == {"math": 2, "code": 6}
    with pytest.raises(ValueError, match="share"):
        ps.set_weights({"physics": 1.0})


def test_state_dict_round_trip_continues_identically():
    a = PromptSet(tasks("math", 5) + tasks("code", 3), history=True, seed=3)
    a.set_weights({"math": 0.5, "code": 0.5})
    for i, tid in enumerate(drain(a, 7)):
        a.record(tid.split("-")[0], tid, [1.0, 1.0] if i % 2 else [0.0, 1.0])
    state = json.loads(json.dumps(a.state_dict()))   # saved as JSON with the checkpoint
    b = PromptSet(tasks("math", 5) + tasks("code", 3), seed=99)
    b.load_state_dict(state)
    assert drain(a, 12) == drain(b, 12)
    assert a.records == b.records and a.stats() == b.stats()
    with pytest.raises(ValueError, match="different set of tasks"):
        PromptSet(tasks("math", 4)).load_state_dict(state)


def meta(task_id, rewards, domain="math", version=0):
    return {"id": task_id, "task_id": task_id, "domain": domain, "min_version": version, "rewards": list(rewards),
            "infra_failures": 0, "num_paths": len(rewards), "num_tokens": 10, "loss_tokens": 4}


async def test_buffer_hands_out_prompts_and_records_outcomes():
    buf = ReplayBuffer(groups_per_step=2, max_staleness=10, filter_zero_variance=False)
    buf.set_prompts(tasks("math", 2), resampling="history")
    issued = []
    for rewards in ([1.0, 1.0], [0.0, 1.0]):
        task = (await buf.acquire_ticket(timeout=0.1))["task"]
        issued.append(task["id"])
        await buf.put(meta(task["id"], rewards), [task["id"]])
    solved = issued[0]
    # Both groups are trained on (no per-step filter) ...
    assert [m["task_id"] for m, _ in await buf.get(2, 0, timeout=0.1)] == issued
    # ... and the next epoch no longer holds the solved prompt.
    task = (await buf.acquire_ticket(timeout=0.1))["task"]
    assert task["id"] == issued[1] != solved
    stats = buf.stats()
    assert stats["prompts/math/solved_dropped"] == 1 and stats["rollout_effective"] == pytest.approx(0.5)
    saved = buf.state_dict()
    other = ReplayBuffer(groups_per_step=2)
    other.set_prompts(tasks("math", 2), resampling="history")
    other.load_state_dict(json.loads(json.dumps(saved)))
    assert other.state_dict() == saved
    assert prompt_key("math", solved) in other.prompts.latest


async def test_dynamic_sampling_in_the_buffer_drops_both_kinds_of_constant_group():
    buf = ReplayBuffer(groups_per_step=1, max_staleness=10, filter_zero_variance=True)
    for i, rewards in enumerate(([1.0, 1.0], [0.0, 0.0], [1.0, 0.0])):
        assert (await buf.acquire_ticket(timeout=0.1))["task"] is None   # no prompt set: the generator samples
        await buf.put(meta(f"t{i}", rewards), [i])
    assert buf.dropped["zero_variance"] == 2
    assert [ref for _, ref in await buf.get(1, 0, timeout=0.1)] == [2]


def test_the_floor_keeps_a_share_of_the_prompts_active():
    ps = PromptSet(tasks("math", 8), history=True, floor=0.5)
    for _ in range(3):                       # every prompt solved, epoch after epoch
        for tid in drain(ps, len(ps.active["math"])):
            ps.record("math", tid, [1.0, 1.0])
    assert len(ps.active["math"]) == 4       # never below half of the 8 prompts
    stats = ps.stats()
    assert stats["prompts/math/readmitted"] > 0 and stats["prompts/math/restarts"] == 0
    restored = PromptSet(tasks("math", 8), history=True)
    restored.load_state_dict(json.loads(json.dumps(ps.state_dict())))
    assert restored.floor == 0.5 and restored.dropped == ps.dropped
    with pytest.raises(ValueError, match="floor"):
        PromptSet(tasks("math", 2), history=True, floor=1.5)


def test_curation_drops_prompts_by_pass_rate_and_keeps_those_without_evidence():
    samples = {"never": [0.0, 0.0, 0.0], "always": [1.0, 1.0, None], "some": [0.0, 1.0, 0.0],
               "failed": [None, None, None]}
    assert curate(samples) == (["always", "some", "failed"], {"kept": 3, "kept_ungraded": 1, "dropped_unsolved": 1,
                                                              "dropped_solved": 0})
    assert curate(samples, "solved")[0] == ["never", "some", "failed"]
    kept, counts = curate(samples, "both")
    assert kept == ["some", "failed"] and counts["dropped_unsolved"] == counts["dropped_solved"] == 1
    assert curate({"half": [0.5, 0.5]}, success=0.5)[0] == ["half"]
    rare = {"one_in_4": [1.0, 0.0, 0.0, 0.0], "two_in_4": [1.0, 1.0, 0.0, 0.0]}
    assert curate(rare, min_pass=0.25) == (["two_in_4"], {"kept": 1, "kept_ungraded": 0, "dropped_unsolved": 1,
                                                          "dropped_solved": 0})
    with pytest.raises(ValueError, match="hard"):
        curate(samples, "hard")


def test_a_curated_prompt_set_hands_out_only_the_kept_prompts_and_restores_into_the_whole_set():
    ps = PromptSet(tasks("math", 6) + tasks("code", 2), history=True, seed=1)
    ps.set_weights({"math": 1.0, "code": 1.0})
    kept = [prompt_key("math", f"math-{i}") for i in (0, 2, 4)] + [prompt_key("code", "code-1")]
    ps.keep(kept)
    assert ps.weights == {"math": 1.0, "code": 1.0}           # a stage's mix survives the filter
    assert set(drain(ps, 8)) == {"math-0", "math-2", "math-4", "code-1"}
    assert ps.stats()["prompts/math/solved_dropped"] == 0     # curated away is not solved
    restored = PromptSet(tasks("math", 6) + tasks("code", 2), history=True, seed=1)
    restored.load_state_dict(json.loads(json.dumps(ps.state_dict())))
    assert sorted(restored.tasks) == sorted(kept) and drain(restored, 8) == drain(ps, 8)
    with pytest.raises(ValueError, match="no prompt of domain code"):
        PromptSet(tasks("math", 2) + tasks("code", 2)).keep([prompt_key("math", "math-0")])
    with pytest.raises(ValueError, match="not in the set"):
        PromptSet(tasks("math", 2)).keep([prompt_key("math", "math-9")])


def test_the_resampling_benchmark_pools_seeds_by_means_and_median_steps():
    from benchmarks.resampling import combine

    runs = [{"effective_ratio": ratio, "steps_to_target": steps, "first_drop_step": 7,
             "groups_to_target": None if steps is None else 16 * steps}
            for ratio, steps in ((0.8, 20), (0.9, None), (0.85, 12))]
    pooled = combine(runs)
    assert pooled["effective_ratio"] == pytest.approx(0.85)
    assert (pooled["steps_to_target"], pooled["groups_to_target"], pooled["first_drop_step"]) == (20, 320, 7)
    assert pooled["steps_to_target_per_seed"] == [20, None, 12]
    # A target most runs never reached has no median step: never, not the one run's.
    assert combine(runs[1:2] * 2 + runs[:1])["steps_to_target"] is None
