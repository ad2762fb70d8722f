"""SWE domain: SWE-bench-format tasks, a sandboxed pytest grader and task synthesis by mutation.

    tasks.py       the JSONL task format, loader (errors name file:line and field), repository state
    runtime.py     pytest inside bubblewrap sandboxes (profile + backend options), pool client
    harness.py     grading: apply patch -> apply test patch -> run named tests -> resolved?
    mutate.py      source mutations located with `ast`
    synthesize.py  tasks from any local Python repo with a pytest suite (CLI)
    grade.py       predictions grader (CLI)
    sample_repo/   a tiny package with a 40-test suite, for tests and demos
"""

from __future__ import annotations

import hashlib
import random
import re

from envs.base import Env, Task
from envs.swe import harness
from envs.swe.harness import grade as grade_patch   # (`envs.swe.grade` is the CLI module)
from envs.swe.runtime import make_pool, swe_backend_options, swe_profile
from rayrl.sandbox.client import PoolClient
from envs.swe.tasks import SAMPLE_REPO, SWETask, TaskFormatError, load_tasks, task_from_row

__all__ = ["SWEEnv", "SWETask", "TaskFormatError", "load_tasks", "grade_patch", "make_pool", "swe_profile",
           "swe_backend_options", "PoolClient", "extract_patch", "SAMPLE_REPO"]

_FENCE = re.compile(r"```(?:diff|patch)?[ \t]*\n(.*?)```", re.S)


def extract_patch(response: str) -> str:
    """The unified diff in a model response: a fenced ```diff block, or the text from the first
    `diff --git` / `--- ` header on; "" when there is none."""
    for block in _FENCE.findall(response):
        if "@@" in block:
            return block
    for marker in ("diff --git ", "--- "):
        i = response.find(marker)
        if i == 0 or (i > 0 and response[i - 1] == "\n"):
            return response[i:]
    return ""


class SWEEnv(Env):
    """SWE tasks over a sandbox pool (a local `SandboxPool` or a Ray actor handle of one) whose
    profiles include `swe_profile()` and whose bwrap backend binds `swe_backend_options()`.

    A fixed hash of each instance id puts `eval_fraction` of the tasks in the held-out set. The
    response is a unified diff (bare or in a ```diff fence)."""

    domain = "swe"

    def __init__(self, tasks: list[SWETask], pool, eval_fraction: float = 0.2, timeout_s: float = 120.0,
                 latency: str = "none", seed: int = 0, profile: str = "swe", include_files: int = 12000):
        super().__init__(latency, seed)
        if not tasks:
            raise ValueError("SWEEnv needs at least one task")
        self.tasks = {t.instance_id: t for t in tasks}
        self.client, self.profile = PoolClient(pool), profile
        self.timeout_s = timeout_s
        self.include_files = include_files
        held = [t for t in tasks if self._unit_hash(t.instance_id) < eval_fraction]
        train = [t for t in tasks if self._unit_hash(t.instance_id) >= eval_fraction]
        if not train:   # too few tasks to split: train on all, evaluate on all
            train, held = list(tasks), list(tasks)
        self.train, self.held_out = train, held or list(tasks)

    @staticmethod
    def _unit_hash(text: str) -> float:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") / 2**32

    def prompt(self, t: SWETask) -> str:
        from envs.swe.synthesize import is_test_file
        from envs.swe.tasks import task_files
        parts = [t.problem_statement, "", "Answer with a unified diff (git format, paths a/... b/...) "
                 "that fixes the repository."]
        if self.include_files > 0:
            budget = self.include_files
            for path, data in sorted(task_files(t).items()):
                if not path.endswith(".py") or is_test_file(path):
                    continue
                text = data.decode("utf-8", "replace")
                if len(text) > budget:
                    break
                budget -= len(text)
                parts += ["", f"--- {path} ---", text]
        return "\n".join(parts)

    def _task(self, t: SWETask) -> Task:
        return Task(id=t.instance_id, prompt=self.prompt(t), answer=t.patch, domain=self.domain,
                    meta={"swe": t.to_row()})

    def sample(self, rng: random.Random) -> Task:
        return self._task(rng.choice(self.train))

    def eval_tasks(self, n: int) -> list[Task]:
        return [self._task(t) for t in self.held_out[:n]]

    def demonstration(self, task: Task) -> str:
        return self._swe(task).patch

    def _swe(self, task: Task) -> SWETask:
        if task.id in self.tasks:
            return self.tasks[task.id]
        row = (task.meta or {}).get("swe")
        if row is None:
            raise KeyError(f"unknown SWE task {task.id!r}")
        return task_from_row(row, f"task {task.id}")

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        patch = extract_patch(response)
        if not patch.strip():
            return 0.0, {"resolved": False, "reason": "no diff in the response"}
        return await harness.grade(self.client, self._swe(task), patch, timeout=self.timeout_s, profile=self.profile)
