"""CodeEnv: the Code domain as an `Env` (SRPO stage 2, the General/Code experts)."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass

from envs.base import Env, Task
from envs.code import generator
from envs.code.tasks import MAX_TIMEOUT_S, SAMPLES_PATH, CodeTask, load_tasks
from envs.code.verify import DEFAULT_TIMEOUT_S, PoolClient, code_profile, grade_completion

log = logging.getLogger(__name__)


@dataclass
class CodeConfig:
    """The fields CodeEnv reads (any object with these attributes works; missing ones default)."""

    source: str = "generated"        # generated | samples | a path to a tasks JSONL file
    difficulty: int = 1              # generated: expression size (see envs.code.generator)
    show_formula: bool = True        # generated: the docstring states the formula
    eval_size: int = 20              # held-out tasks (generated); files: at most this many
    eval_fraction: float = 0.2       # share of the task space held out for evaluation
    timeout_s: float = DEFAULT_TIMEOUT_S   # per test run
    sandbox_profile: str = "default"  # the pool profile to lease
    tool_latency: str = "none"


def _cfg(cfg, name: str):
    for key in (f"code_{name}", name):   # a shared TaskConfig may prefix the fields with code_
        if hasattr(cfg, key):
            return getattr(cfg, key)
    return getattr(CodeConfig, name)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S)


def extract_code(task: CodeTask, response: str) -> str:
    """A chat model's answer may wrap its code in a ``` fence: take the first fenced block. For a
    function task whose block redefines the whole function, start it on a new line (the prompt's
    own function, docstring only, stays valid and is replaced)."""
    match = _FENCE.search(response)
    if not match:
        return response
    code = match.group(1)
    if task.kind == "function" and re.search(rf"^\s*def\s+{re.escape(task.entry_point)}\s*\(", code, re.M):
        return "\n    pass\n" + code if not task.prompt.rstrip().endswith(("\"\"\"", "'''")) else "\n" + code
    return code


class CodeEnv(Env):
    domain = "code"

    def __init__(self, cfg=None, seed: int = 0, pool=None):
        cfg = cfg if cfg is not None else CodeConfig()
        super().__init__(_cfg(cfg, "tool_latency"), seed)
        self.source = str(_cfg(cfg, "source"))
        self.difficulty = int(_cfg(cfg, "difficulty"))
        self.show_formula = bool(_cfg(cfg, "show_formula"))
        self.eval_size = int(_cfg(cfg, "eval_size"))
        self.eval_fraction = float(_cfg(cfg, "eval_fraction"))
        self.timeout_s = float(_cfg(cfg, "timeout_s"))
        self.profile = str(_cfg(cfg, "sandbox_profile"))
        if self.difficulty < 1:
            raise ValueError(f"task.difficulty={self.difficulty}: must be >= 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"task.eval_fraction={self.eval_fraction}: must be in (0, 1)")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"task.timeout_s={self.timeout_s}: must be in (0, {MAX_TIMEOUT_S:g}]")
        self._pool = PoolClient(pool) if pool is not None else None
        self._own_pool = None
        self._pool_lock = asyncio.Lock()
        self._train: list[CodeTask] = []
        self._eval: list[CodeTask] = []
        if self.source != "generated":
            path = SAMPLES_PATH if self.source == "samples" else self.source
            tasks = load_tasks(path)
            for t in tasks:
                (self._eval if generator.unit_hash("split:" + t.task_id) < self.eval_fraction
                 else self._train).append(t)
            if not (self._train and self._eval):   # too few tasks to split: all of them on both sides, as SWEEnv
                log.warning("%s: no %s task among %d at eval_fraction=%g: training and evaluating on all of them",
                            path, "training" if self._eval else "held-out", len(tasks), self.eval_fraction)
                self._train, self._eval = list(tasks), list(tasks)

    # -- tasks ------------------------------------------------------------------------------
    def _task(self, ct: CodeTask) -> Task:
        return Task(id=ct.task_id, prompt=ct.prompt, answer=ct.canonical_solution or "", domain=self.domain,
                    meta=ct.to_meta())

    def sample(self, rng: random.Random) -> Task:
        if self.source == "generated":
            return self._task(generator.draw(rng, self.difficulty, self.eval_fraction, "train", self.show_formula))
        return self._task(rng.choice(self._train))

    def eval_tasks(self, n: int) -> list[Task]:
        if self.source == "generated":
            return [self._task(t) for t in generator.generate(n, 0xE7A1, self.difficulty, split="eval",
                                                              eval_fraction=self.eval_fraction,
                                                              show_formula=self.show_formula)]
        return [self._task(t) for t in self._eval[:n]]

    def demonstration(self, task: Task) -> str:
        return task.answer

    # -- verification -------------------------------------------------------------------------
    async def _client(self) -> PoolClient:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:   # no pool given: a local one, owned by this env
                    from rayrl.sandbox.pool import SandboxPool
                    self._own_pool = SandboxPool([code_profile(self.profile, self.timeout_s)], min_idle=1,
                                                 max_total=8, export_metrics=False)
                    self._pool = PoolClient(self._own_pool)
        return self._pool

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        ct = CodeTask.from_meta(task.meta)
        reward, info = await grade_completion(await self._client(), ct, extract_code(ct, response),
                                   timeout_s=self.timeout_s if ct.timeout_s is None else None, profile=self.profile)
        info["correct"] = reward
        return reward, info

    async def aclose(self) -> None:
        """Shut down the local pool, if this env started one."""
        if self._own_pool is not None:
            await self._own_pool.shutdown()
            self._own_pool, self._pool = None, None
