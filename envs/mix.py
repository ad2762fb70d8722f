"""Several domains as one environment (the student's mixed-domain prompts in Specialize-then-Unify).

Training tasks are drawn from the domains in turn by weight; held-out evaluation takes the first
n held-out tasks of every domain; every other call goes to the task's own domain (`for_task`).
"""

from __future__ import annotations

import random
from dataclasses import replace

from envs.base import Env, Task


class MixedEnv(Env):
    domain = "mixed"

    def __init__(self, envs: dict[str, Env], weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__("none", seed)
        if not envs:
            raise ValueError("MixedEnv needs at least one domain")
        self.envs = envs
        self.names = list(envs)
        self.weights = [float((weights or {}).get(n, 1.0)) for n in self.names]

    def for_task(self, task: Task) -> Env:
        try:
            return self.envs[task.domain]
        except KeyError:
            raise ValueError(f"task {task.id!r} is of domain {task.domain!r}, not one of {', '.join(self.names)}") \
                from None

    def _tagged(self, name: str, task: Task) -> Task:
        return task if task.domain == name else replace(task, domain=name)

    def sample(self, rng: random.Random) -> Task:
        name = rng.choices(self.names, self.weights)[0]
        return self._tagged(name, self.envs[name].sample(rng))

    def eval_tasks(self, n: int) -> list[Task]:
        return [self._tagged(name, t) for name, env in self.envs.items() for t in env.eval_tasks(n)]

    def demonstration(self, task: Task) -> str:
        return self.for_task(task).demonstration(task)

    def oracle_actions(self, task: Task):
        return self.for_task(task).oracle_actions(task)

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        return await self.for_task(task).verify(task, response)

    def episode(self, task: Task):
        return self.for_task(task).episode(task)

    async def score(self, task: Task, answer: str | None, tools) -> tuple[float, dict]:
        return await self.for_task(task).score(task, answer, tools)

    async def step(self, task: Task, response: str) -> None:
        await self.for_task(task).step(task, response)

    async def aclose(self) -> None:
        for env in self.envs.values():
            await env.aclose()
