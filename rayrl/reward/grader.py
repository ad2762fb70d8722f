"""RewardGrader: scores finished trajectory trees with their environment's verifier, and assigns
the group's advantages. Agent episodes arrive already scored (their checker ran in the episode's
own sandbox); their leaves are left as they are."""

from __future__ import annotations

import asyncio
import functools

import numpy as np

from envs import Task, make_env
from envs.base import guarded_verdict
from envs.pools import close_env, local_pool
from rayrl.algo.advantages import assign_advantages
from rayrl.sandbox.base import SandboxInfraError
from rayrl.tree import TrajectoryTree, summarize


class RewardGrader:
    def __init__(self, task_cfg, tokenizer_path: str, advantage_mode: str = "grpo", sandbox_pool=None):
        self.task_cfg = task_cfg
        self._env = None
        self.sandbox_pool = sandbox_pool   # the cluster's pools (a SandboxRouter), or None: a pool of its own
        self._own_pool = None
        self.tokenizer_path = tokenizer_path
        self.advantage_mode = advantage_mode
        self.graded = 0
        self.infra_failures = 0

    @property
    def env(self):
        """Built on first use: agent episodes, scored where they ran, never need it."""
        if self._env is None:
            pool = self.sandbox_pool
            if pool is None:
                pool = self._own_pool = local_pool(self.task_cfg)
            self._env = make_env(self.task_cfg, pool=pool)
        return self._env

    @env.setter
    def env(self, env) -> None:
        self._env = env

    @functools.cached_property
    def tokenizer(self):
        """Loaded on first use, like the env: agent episodes arrive scored and never need it, and
        importing the model stack would cost every grader about 5 s of CPU at start-up. (The
        generators load the same tokenizer at start-up, so a bad path still fails there.)"""
        from rayrl.models import load_tokenizer
        return load_tokenizer(self.tokenizer_path)

    async def close(self) -> None:
        """Before the actor is killed (Roles.shutdown), as RolloutGenerator.close."""
        await close_env(self._env, self._own_pool)

    def response_text(self, tree: TrajectoryTree, leaf: int) -> str:
        """Text of the model-sampled tokens on the path to `leaf` (observations excluded)."""
        chain = tree.ancestry(leaf)[1:]
        ids = np.concatenate([tree.nodes[i].tokens[tree.nodes[i].loss_mask.astype(bool)] for i in chain]) \
            if chain else np.zeros(0, np.int32)
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    async def _grade_leaf(self, tree: TrajectoryTree, task: Task, leaf: int) -> None:
        node = tree.nodes[leaf]
        if node.infra_failure or node.reward is not None:
            return
        try:
            node.reward, node.reward_info = await guarded_verdict(self.env.verify(task, self.response_text(tree, leaf)),
                                                                  task)
        except SandboxInfraError as err:
            # Not the model's fault: no reward, kept out of the advantages, counted.
            node.infra_failure, node.reward, node.reward_info = True, None, {"infra_error": str(err)}
            self.infra_failures += 1

    async def grade(self, tree: TrajectoryTree) -> tuple[TrajectoryTree, dict]:
        task = Task(**tree.meta["task"])
        await asyncio.gather(*(self._grade_leaf(tree, task, leaf) for leaf in tree.leaves()))
        assign_advantages(tree, self.advantage_mode)
        self.graded += 1
        return tree, summarize(tree)
