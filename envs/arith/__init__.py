"""A verifiable toy task: integer arithmetic with exact-match answers.

The task space is every `a op b` with operands in [0, max_operand]; a fixed hash splits it into
training and held-out tasks, so evaluation prompts are never trained on.
"""

from __future__ import annotations

import hashlib
import random
import re

from envs.base import Env, Task

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithEnv(Env):
    domain = "arith"

    def __init__(self, cfg, seed: int = 0):
        super().__init__(cfg.tool_latency, seed)
        bad = set(cfg.ops) - set(_OPS)
        if not cfg.ops or bad:
            raise ValueError(f"task.ops={cfg.ops!r}: operators must be drawn from {''.join(_OPS)}")
        self.ops = list(cfg.ops)
        self.max_operand = cfg.max_operand
        self.eval_fraction = cfg.eval_fraction
        self.demo_error = cfg.demo_error
        space = (cfg.max_operand + 1) ** 2 * len(self.ops)
        if space * cfg.eval_fraction < cfg.eval_size:
            raise ValueError(f"task.eval_size={cfg.eval_size} exceeds the held-out share of the "
                             f"{space} arith tasks (task.eval_fraction={cfg.eval_fraction})")

    @staticmethod
    def _unit_hash(text: str) -> float:
        digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little") / 2**32

    def _held_out(self, a: int, op: str, b: int) -> bool:
        return self._unit_hash(f"{a}{op}{b}") < self.eval_fraction

    def _task(self, a: int, op: str, b: int) -> Task:
        return Task(id=f"{a}{op}{b}", prompt=f"{a}{op}{b}", answer=str(_OPS[op](a, b)), domain=self.domain)

    def sample(self, rng: random.Random) -> Task:
        while True:
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            op = rng.choice(self.ops)
            if not self._held_out(a, op, b):
                return self._task(a, op, b)

    def eval_tasks(self, n: int) -> list[Task]:
        rng = random.Random(0xE7A1)
        tasks: dict[str, Task] = {}
        while len(tasks) < n:
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            op = rng.choice(self.ops)
            if self._held_out(a, op, b):
                task = self._task(a, op, b)
                tasks.setdefault(task.id, task)
        return list(tasks.values())

    def demonstration(self, task: Task) -> str:
        """The teacher's answer: wrong by one on a fixed `task.demo_error` share of the tasks."""
        if self._unit_hash("demo:" + task.id) < self.demo_error:
            return str(int(task.answer) + 1)
        return task.answer

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        text = response.strip()
        match = re.fullmatch(r"-?\d+", text)
        if not match:
            return 0.0, {"correct": 0.0, "format": 0.0}
        correct = float(int(text) == int(task.answer))
        return correct, {"correct": correct, "format": 1.0}
