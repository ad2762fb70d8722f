"""SWE domain: SWE-bench-format tasks, a sandboxed pytest grader and task synthesis by mutation.

    tasks.py       the JSONL task format, loader (errors name file:line and field), repository state
    runtime.py     pytest inside bubblewrap sandboxes (profile + backend options), pool client
    harness.py     grading: apply patch -> apply test patch -> run named tests -> resolved?
    mutate.py      source mutations located with `ast`
    synthesize.py  tasks from any local Python repo with a pytest suite (CLI)
    generated.py   a seeded stream of tiny generated repositories (difficulty 0 = tiny mode; see there)
    grade.py       predictions grader (CLI)
    sample_repo/   a tiny package with a 40-test suite, for tests and demos

`make_swe_env(task_cfg, seed, pool)` (what `envs.make_env` calls for `task.name=swe`) picks the
tasks by `task.swe_source`: `generated` (GeneratedSWEEnv, `task.swe_difficulty`), `sample_repo`
(tasks synthesized from sample_repo/ once, then cached as JSONL under ~/.cache/rayrl/swe/ keyed by
a hash of the repository's contents) or the path of a tasks JSONL file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import random
import re
import sys
from pathlib import Path

from envs.base import Env, GeneratedEnv, Task
from envs.swe import harness
from envs.swe.harness import grade as grade_patch   # (`envs.swe.grade` is the CLI module)
from envs.swe.runtime import make_pool, swe_backend_options, swe_profile
from rayrl.sandbox.client import PoolClient
from envs.swe.tasks import SAMPLE_REPO, SWETask, TaskFormatError, load_tasks, task_from_row

__all__ = ["SWEEnv", "GeneratedSWEEnv", "make_swe_env", "sample_repo_tasks", "SWETask", "TaskFormatError", "load_tasks", "grade_patch", "make_pool", "swe_profile",
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
        self.pool, self.client, self.profile = pool, PoolClient(pool), profile
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
        from envs.swe.tasks import is_test_file, task_files
        if "generated" in t.meta:   # a generated task (envs.swe.generated), e.g. loaded from JSONL
            from envs.swe.generated import tiny_prompt
            return tiny_prompt(t)
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
        return await _verify(self, self._swe(task), response)


async def _verify(env, swe: SWETask, response: str) -> tuple[float, dict]:
    """Grade the diff in `response` against `swe` in a sandbox of `env`'s pool."""
    patch = extract_patch(response)
    if not patch.strip():
        return 0.0, {"resolved": False, "reason": "no diff in the response"}
    if env.pool is None:
        raise ValueError(f"{type(env).__name__} needs a sandbox pool to grade (make_env(task_cfg, seed, pool=...) "
                         "with a SandboxPool serving swe_profile() with backend_options=swe_backend_options())")
    return await harness.grade(env.client, swe, patch, timeout=env.timeout_s, profile=env.profile)


class GeneratedSWEEnv(GeneratedEnv):
    """Generated tiny repositories (envs.swe.generated), one task each, graded like SWEEnv's tasks:
    the response's diff applied and the named tests run with pytest in a sandbox of `pool` (a pool
    serving `swe_profile()` with `swe_backend_options()`). The GeneratedEnv hash split of the task
    ids holds `task.eval_fraction` of the tasks out."""

    domain = "swe"

    def __init__(self, cfg=None, seed: int = 0, pool=None, timeout_s: float = 60.0, profile: str = "swe"):
        super().__init__(getattr(cfg, "tool_latency", "none"), seed)
        self.difficulty = getattr(cfg, "swe_difficulty", 1)
        self.eval_fraction = getattr(cfg, "eval_fraction", 0.2)
        self.pool, self.client, self.profile = pool, PoolClient(pool), profile
        self.timeout_s = timeout_s

    def generate_row(self, rng: random.Random) -> dict:
        from envs.swe.generated import generate
        t = generate(rng, self.difficulty)
        return {"task_id": t.instance_id, "swe": t}

    def to_task(self, row: dict) -> Task:
        from envs.swe.generated import tiny_prompt
        t: SWETask = row["swe"]
        return Task(id=t.instance_id, prompt=tiny_prompt(t), answer=t.patch, domain=self.domain,
                    meta={"swe": t.to_row()})

    def demonstration(self, task: Task) -> str:
        return task.answer

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        return await _verify(self, task_from_row(task.meta["swe"], f"task {task.id}"), response)


# -- make_env ---------------------------------------------------------------------------------------
SAMPLE_REPO_TASKS = 160     # tasks synthesized from sample_repo/ (about 150 s on 2 cores, once)


def _task_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "rayrl" / "swe"


def _run_coroutine(make_coro):
    """Run a coroutine to completion from sync code, even inside a running event loop (in a thread
    with a loop of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(lambda: asyncio.run(make_coro())).result()


def sample_repo_tasks(pool=None, max_tasks: int = SAMPLE_REPO_TASKS, seed: int = 0, repo=SAMPLE_REPO,
                      cache_dir: str | os.PathLike | None = None) -> list[SWETask]:
    """Tasks synthesized from `repo` (the shipped sample repository), made once and cached as
    JSONL under ~/.cache/rayrl/swe/, keyed by a hash of the repository's contents (and the task
    count and seed): an edited repository is synthesized again. `pool` is used only when it is a
    Ray pool (usable from any event loop); otherwise a private local pool synthesizes."""
    from envs.swe.tasks import content_hash, read_repo, write_tasks
    key = content_hash(read_repo(repo)).split(":", 1)[1][:16]
    root = Path(cache_dir) if cache_dir is not None else _task_cache_dir()
    path = root / f"{Path(repo).resolve().name}-{key}-n{max_tasks}-s{seed}.jsonl"
    if path.exists():
        print(f"[swe] {Path(repo).name}: {path} (cached tasks)", file=sys.stderr, flush=True)
        return load_tasks(path)
    print(f"[swe] {Path(repo).name}: synthesizing {max_tasks} tasks once (a few minutes); "
          f"they will be cached in {path}", file=sys.stderr, flush=True)
    from envs.swe.synthesize import synthesize
    remote = pool is not None and PoolClient(pool).remote
    tasks, stats = _run_coroutine(lambda: synthesize(repo, pool=pool if remote else None, max_tasks=max_tasks,
                                                     seed=seed, workers=2, progress=True))
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    write_tasks(tmp, tasks)
    os.replace(tmp, path)
    print(f"[swe] {len(tasks)} tasks in {stats['seconds']}s, cached in {path}", file=sys.stderr, flush=True)
    return tasks


def make_swe_env(task_cfg, seed: int = 0, pool=None) -> Env:
    """The SWE environment of `task_cfg.swe_source` (generated | sample_repo | a JSONL path).
    `pool`: a SandboxPool (or Ray handle / router) serving `swe_profile()` with
    `swe_backend_options()`; None builds the environment, but grading raises."""
    source = getattr(task_cfg, "swe_source", "generated")
    latency, frac = getattr(task_cfg, "tool_latency", "none"), getattr(task_cfg, "eval_fraction", 0.2)
    if source == "generated":
        return GeneratedSWEEnv(task_cfg, seed, pool=pool)
    if source == "sample_repo":
        tasks = sample_repo_tasks(pool)
    else:
        if not Path(source).is_file():
            raise ValueError(f"task.swe_source={source!r}: expected generated, sample_repo or a tasks JSONL file")
        tasks = load_tasks(source)
        if not tasks:
            raise TaskFormatError(f"{source}: no tasks in the file (task.swe_source)")
    return SWEEnv(tasks, pool, eval_fraction=frac, latency=latency, seed=seed)
