"""A verifiable toy task: integer arithmetic with exact-match answers.

The task space is every `a op b` with operands in [0, max_operand]; a fixed hash splits it into
training and held-out tasks, so evaluation prompts are never trained on. With `task.easy_share`
that share of the draws has one-digit operands (the held-out set takes each task once, so at most
its 20% of the 10 x 10 one-digit tasks per operator).
"""

from __future__ import annotations

import hashlib
import random
import re

from envs.base import Env, Task

EASY_MAX = 9   # task.easy_share: one-digit operands, whose demonstrations are always right

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
        if not 0.0 <= cfg.easy_share <= 1.0:
            raise ValueError(f"task.easy_share={cfg.easy_share}: a share of the tasks, from 0 to 1")
        self.easy_share = cfg.easy_share
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

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        # No extra draw without easy tasks: a seed gives the tasks it always gave.
        top = EASY_MAX if self.easy_share and rng.random() < self.easy_share else self.max_operand
        a, b = rng.randint(0, top), rng.randint(0, top)
        return a, rng.choice(self.ops), b

    def sample(self, rng: random.Random) -> Task:
        while True:
            a, op, b = self._draw(rng)
            if not self._held_out(a, op, b):
                return self._task(a, op, b)

    def eval_tasks(self, n: int) -> list[Task]:
        rng = random.Random(0xE7A1)
        tasks: dict[str, Task] = {}
        while len(tasks) < n:
            a, op, b = self._draw(rng)
            if self._held_out(a, op, b):
                task = self._task(a, op, b)
                tasks.setdefault(task.id, task)
        return list(tasks.values())

    def demonstration(self, task: Task) -> str:
        """The teacher's answer: wrong by one on a fixed `task.demo_error` share of the tasks (with
        `task.easy_share`, of the tasks with a two-digit operand)."""
        # Without easy tasks every demonstration is as it always was: the 400-update warm start is
        # that sensitive (changing 0.7% of them moved its held-out accuracy from 0.325 to 0.075).
        if self.easy_share and max(int(x) for x in re.findall(r"\d+", task.id)) <= EASY_MAX:
            return task.answer
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
