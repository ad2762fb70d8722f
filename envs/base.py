"""The protocol every task environment follows.

An environment owns its tasks (a seeded stream for training, a fixed held-out set for
evaluation), the oracle demonstrations for SFT warm starts, the environment step that follows a
model turn, and the verifier. It knows nothing of the learner.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
from dataclasses import dataclass, field

from rayrl.rollout.scaffolds import Action, Tool
from rayrl.sandbox.base import SandboxInfraError


@dataclass
class Task:
    id: str
    prompt: str                        # the user message
    answer: str                        # the reference answer the verifier checks against
    domain: str = ""
    meta: dict = field(default_factory=dict)


class Env(abc.ABC):
    """A task environment. Single-answer domains implement sample/eval_tasks/demonstration/verify;
    agentic ones also name their `tools`, set up an episode's tools (`episode`), score the finished
    episode (`score`, e.g. a checker run in the episode's sandbox) and give the oracle's actions."""

    domain: str = ""
    tools: tuple[Tool, ...] = ()      # tools the agent may call; none: one answer turn

    def __init__(self, latency: str = "none", seed: int = 0):
        self._latency = parse_latency(latency)
        self._latency_rng = random.Random(seed ^ 0x5EED)

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Task:
        """A training task (never one of the held-out tasks)."""

    @abc.abstractmethod
    def eval_tasks(self, n: int) -> list[Task]:
        """The first n tasks of the fixed held-out set."""

    @abc.abstractmethod
    def demonstration(self, task: Task) -> str:
        """An oracle response for SFT."""

    @abc.abstractmethod
    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        """Reward in [0, 1] and its breakdown. Raises SandboxInfraError when the infrastructure
        (not the response) failed, so the sample is not scored as the model's fault."""

    def for_task(self, task: Task) -> "Env":
        """The environment that owns `task` (itself; a mixture returns the task's domain)."""
        return self

    @contextlib.asynccontextmanager
    async def episode(self, task: Task):
        """The tools object of one episode (anything with `async run(action) -> str`), set up for
        `task` and torn down afterwards; None for domains without tools."""
        yield None

    async def score(self, task: Task, answer: str | None, tools) -> tuple[float, dict]:
        """Reward of a finished episode; by default its answer is verified."""
        if answer is None:
            return 0.0, {"reason": "no answer"}
        return await self.verify(task, answer)

    def oracle_actions(self, task: Task) -> list[Action]:
        """What the oracle does, as agent actions (for demonstrations and replay tests)."""
        return [Action("answer", {"answer": self.demonstration(task)})]

    async def aclose(self) -> None:
        """Release what the environment started (a local sandbox pool, a browser)."""

    async def step(self, task: Task, response: str) -> None:
        """The environment's work after a model turn (a tool call, a test run).

        The toy environments have none, but can simulate its wall time (`task.tool_latency`), which
        in agentic RL is long-tailed and is what asynchronous rollouts hide.
        """
        delay = self._latency(self._latency_rng)
        if delay > 0:
            await asyncio.sleep(delay)


class GeneratedEnv(Env):
    """Tasks from a seeded generator (`generate_row`); a hash of the task id holds `eval_fraction`
    of them out, so evaluation tasks are never trained on."""

    eval_fraction: float = 0.2
    eval_seed: int = 0x7E57

    @abc.abstractmethod
    def generate_row(self, rng: random.Random) -> dict: ...

    @abc.abstractmethod
    def to_task(self, row: dict) -> Task: ...

    def sample(self, rng: random.Random) -> Task:
        from envs.rows import held_out
        while True:
            row = self.generate_row(rng)
            if not held_out(row["task_id"], self.eval_fraction):
                return self.to_task(row)

    def eval_tasks(self, n: int) -> list[Task]:
        from envs.rows import held_out
        rng, out = random.Random(self.eval_seed), {}
        if n <= 0:
            return []
        for _ in range(1000 * n):   # bounded: a small task space may not hold n distinct held-out tasks
            row = self.generate_row(rng)
            if held_out(row["task_id"], self.eval_fraction):
                out.setdefault(row["task_id"], self.to_task(row))
                if len(out) == n:
                    return list(out.values())
        raise ValueError(f"{self.domain}: only {len(out)} distinct held-out tasks in {1000 * n} draws, "
                         f"{n} asked (task.eval_size); lower it, or raise task.eval_fraction")


VERIFIER_ERRORS_PRINTED = 5
_verifier_errors = 0


async def guarded_verdict(verdict, task: Task) -> tuple[float, dict]:
    """Await a verifier's `(reward, info)`. Any exception but SandboxInfraError means the verifier
    could not handle this output (nesting too deep for the parser, a number too long to convert):
    a reward of 0 naming the error, so one sample's odd output does not cost its whole group. The
    first few are printed, because a verifier failing on every sample is a bug, not a run of zeros."""
    global _verifier_errors
    try:
        return await verdict
    except SandboxInfraError:
        raise
    except Exception as err:
        why = f"{type(err).__name__}: {str(err)[:200]}"
        _verifier_errors += 1
        if _verifier_errors <= VERIFIER_ERRORS_PRINTED:
            print(f"verifier error on task {task.id!r} ({task.domain or 'no domain'}), scored 0: {why}", flush=True)
        return 0.0, {"reason": f"verifier error: {why}", "verifier_error": why}


def parse_latency(spec: str):
    """`none` | `fixed:S` | `lognormal:MEDIAN:SIGMA[:CAP]` -> a function rng -> seconds."""
    kind, *args = spec.split(":")
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"task.tool_latency={spec!r}: arguments must be numbers") from None
    if kind == "none" and not values:
        return lambda rng: 0.0
    if kind == "fixed" and len(values) == 1:
        return lambda rng: values[0]
    if kind == "lognormal" and len(values) in (2, 3):
        import math
        median, sigma = values[:2]
        cap = values[2] if len(values) == 3 else math.inf
        return lambda rng: min(cap, median * math.exp(sigma * rng.gauss(0.0, 1.0)))
    raise ValueError(f"task.tool_latency={spec!r}: expected none, fixed:S or lognormal:MEDIAN:SIGMA[:CAP]")
