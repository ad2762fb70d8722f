"""An infrastructure failure during an episode or its grading is marked on the tree, kept out of
the advantages and the loss, and counted; it is never scored as the model's mistake."""

import os
import random

import numpy as np
import pytest

from envs.arith import ArithEnv
from rayrl.algo.advantages import group_advantages
from rayrl.config import GRPOConfig
from rayrl.models import load_tokenizer, resolve_model_path
from rayrl.replay.buffer import ReplayBuffer
from rayrl.reward.grader import RewardGrader
from rayrl.sandbox.base import Profile
from rayrl.sandbox.pool import SandboxPool
from rayrl.tree import TrajectoryTree, summarize


class SandboxedArith(ArithEnv):
    """Checks the answer inside a real bubblewrap sandbox. The response "CRASH" stands for a
    sandbox that dies during grading: the test kills its agent process from the host."""

    def __init__(self, cfg, pool: SandboxPool):
        super().__init__(cfg)
        self.pool = pool

    async def verify(self, task, response):
        lease = await self.pool.lease()
        try:
            if response == "CRASH":
                os.kill(self.pool._leases[lease].sandbox.agent_pid, 9)
            await self.pool.write_file(lease, "answer.txt", response.encode())
            result = await self.pool.exec(lease, f'test "$(cat answer.txt)" = "{task.answer}"')
            return float(result.exit_code == 0), {"exit_code": result.exit_code}
        finally:
            await self.pool.release(lease)


@pytest.fixture
async def grader():
    cfg = GRPOConfig()
    path = resolve_model_path(cfg.model)
    pool = SandboxPool([Profile()], min_idle=0, max_total=4, export_metrics=False)
    grader = RewardGrader(cfg.task, path)
    grader.env = SandboxedArith(cfg.task, pool)
    yield grader, load_tokenizer(path)
    await pool.shutdown()


def group(tokenizer, task, responses):
    tree = TrajectoryTree([1, 2, 3], meta={"group_id": "g", "task": vars(task)})
    for text in responses:
        ids = tokenizer.encode(text, add_special_tokens=False)
        tree.add(0, ids, np.full(len(ids), -0.5), np.ones(len(ids)), np.zeros(len(ids)))
    return tree


async def test_grader_marks_a_dead_sandbox_as_infra_failure(grader):
    grader, tokenizer = grader
    task = grader.env._task(12, "+", 30)
    tree, meta = await grader.grade(group(tokenizer, task, ["42", "41", "CRASH", "42"]))

    leaves = [tree.nodes[i] for i in tree.leaves()]
    assert [n.infra_failure for n in leaves] == [False, False, True, False]
    assert leaves[2].reward is None and "infra_error" in leaves[2].reward_info
    assert [n.reward for n in leaves if not n.infra_failure] == [1.0, 0.0, 1.0]
    # the advantages are those of the three valid samples alone; the failed one gets none
    expected = group_advantages(np.array([1.0, 0.0, 1.0]))
    assert np.allclose([leaves[i].advantage for i in (0, 1, 3)], expected)
    assert leaves[2].advantage == 0.0
    assert meta["infra_failures"] == 1 and grader.infra_failures == 1
    # the failed path's tokens are not counted as loss tokens
    assert meta["loss_tokens"] == sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in ["42", "41", "42"])
    assert grader.env.pool.stats()["infra_failures"] == 1


class FragileArith(ArithEnv):
    """A verifier that cannot handle one output (as JSON parsers fail on deep nesting)."""

    async def verify(self, task, response):
        if response == "BOOM":
            raise RecursionError("maximum recursion depth exceeded")
        return await super().verify(task, response)


async def test_a_verifier_error_scores_that_sample_0_and_keeps_its_group(capsys, monkeypatch):
    monkeypatch.setattr("envs.base._verifier_errors", 0)   # the first few are printed, per process
    cfg = GRPOConfig()
    path = resolve_model_path(cfg.model)
    grader = RewardGrader(cfg.task, path)
    grader.env = FragileArith(cfg.task)
    tokenizer = load_tokenizer(path)
    task = grader.env._task(12, "+", 30)
    tree, meta = await grader.grade(group(tokenizer, task, ["42", "BOOM", "41", "42"]))
    leaves = [tree.nodes[i] for i in tree.leaves()]
    assert [n.reward for n in leaves] == [1.0, 0.0, 0.0, 1.0]
    assert leaves[1].reward_info["verifier_error"].startswith("RecursionError")
    assert not any(n.infra_failure for n in leaves) and meta["infra_failures"] == 0
    assert np.allclose([n.advantage for n in leaves], group_advantages(np.array([1.0, 0.0, 0.0, 1.0])))
    assert f"verifier error on task {task.id!r}" in capsys.readouterr().out


async def test_a_group_lost_entirely_to_infrastructure_is_dropped_and_counted(grader):
    grader, tokenizer = grader
    task = grader.env._task(1, "+", 1)
    tree, meta = await grader.grade(group(tokenizer, task, ["CRASH", "CRASH"]))
    assert meta["infra_failures"] == 2 and all(r is None for r in meta["rewards"])
    buffer = ReplayBuffer(groups_per_step=1, max_staleness=0)
    assert await buffer.acquire_ticket(timeout=0.1)
    assert await buffer.put(meta, [tree]) == "infra_failure"
    assert buffer.stats()["dropped_infra_failure"] == 1 and buffer.stats()["size"] == 0


async def test_episode_infra_failure_is_marked_by_the_generator(monkeypatch):
    """The environment step (a tool call) fails for infrastructure reasons in one episode."""
    from rayrl.rollout.generator import RolloutGenerator
    from rayrl.sandbox.base import SandboxInfraError
    cfg = GRPOConfig()
    cfg.rollout.group_size = 4
    gen = RolloutGenerator(resolve_model_path(cfg.model), cfg.rollout, cfg.task)
    calls = {"n": 0}

    async def flaky_step(task, response):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SandboxInfraError("sandbox vanished during the tool call")

    monkeypatch.setattr(gen.env, "step", flaky_step)
    tree = await gen.rollout_group(gen.env.sample(random.Random(0)), "g0")
    flags = [tree.nodes[i].infra_failure for i in tree.leaves()]
    assert flags.count(True) == 1 and summarize(tree)["infra_failures"] == 1
    assert gen.stats()["infra_failures"] == 1
    gen._serve_task.cancel()


async def test_held_out_evaluation_returns_why_an_episode_failed(monkeypatch):
    """A failed held-out agent episode comes back as its reason, not as a score (evaluate_domains
    leaves it out and names it when a whole domain has no score left)."""
    import rayrl.rollout.generator as generator
    from rayrl.sandbox.base import SandboxInfraError
    cfg = GRPOConfig()
    cfg.rollout.scaffold = "xml"
    gen = generator.RolloutGenerator(resolve_model_path(cfg.model), cfg.rollout, cfg.task)
    tasks = [vars(t) for t in (gen.env._task(1, "+", 1), gen.env._task(2, "+", 2))]

    async def play_task(env, task, *args):
        if task.id == tasks[1]["id"]:
            raise SandboxInfraError("sandbox pool closed")
        return None, 0.5, {}

    monkeypatch.setattr(generator, "play_task", play_task)
    assert await gen.evaluate(tasks) == [0.5, "sandbox pool closed"]
    assert gen.stats()["infra_failures"] == 1
    gen._serve_task.cancel()
