"""Synthesize SWE tasks from a local Python repository with a pytest suite.

    python -m envs.swe.synthesize --repo DIR --out tasks.jsonl [--max-tasks N] [--seed S] [--workers K]

The suite runs once unmutated in a sandbox (the tests that pass there are the candidates for
FAIL_TO_PASS / PASS_TO_PASS). Then each mutation of the source files (see `mutate.py`), in an
order fixed by the seed, is run on its own: one that breaks at least one test while every other
test still passes (and nothing fails to collect) becomes a task whose gold patch is the inverse
diff (mutated -> original). With `verify` (the default) every task is also graded with its gold
patch, which must resolve it. Candidates run concurrently on `workers` sandboxes; the result does
not depend on the number of workers. The last line printed is `{"tasks": n}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from envs.swe.harness import REPO_DIR, apply_patch, decide, node_files, run_pytest, setup_repo
from envs.swe.mutate import Mutation, mutations
from envs.swe.runtime import PROFILE_NAME, make_pool
from rayrl.sandbox.client import PoolClient
from envs.swe.tasks import SWETask, content_hash, is_test_file, read_repo, repo_ref, unified_diff, write_tasks


def source_files(files: dict[str, bytes]) -> list[str]:
    return [p for p in sorted(files) if p.endswith(".py") and not is_test_file(p)
            and Path(p).name not in ("setup.py", "noxfile.py", "conftest.py")]


def problem_statement(repo_name: str, broken: list[str], messages: dict[str, str]) -> str:
    lines = [f"Some behaviour of `{repo_name}` regressed: {len(broken)} test(s) of its suite fail.", "",
             "Failing tests and their errors:"]
    for node in broken:
        msg = " ".join((messages.get(node) or "").split())[:300]
        lines.append(f"- `{node}`" + (f": {msg}" if msg else ""))
    lines += ["", "Fix the library code so that these tests pass again, without breaking any other test. "
              "Do not change the tests."]
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def synthesize(repo: str | Path, pool=None, max_tasks: int = 50, seed: int = 0, workers: int = 2,
                     verify: bool = True, timeout: float = 120.0, progress: bool = True) -> tuple[list[SWETask], dict]:
    """Tasks from `repo`, plus stats. `pool`: a SandboxPool with the SWE profile (or a Ray handle of
    one); None starts a local one for the call."""
    own = pool is None
    if own:
        pool = make_pool(max_total=max(1, workers))
    client = PoolClient(pool)
    t0 = time.perf_counter()
    try:
        return await _synthesize(Path(repo), client, max_tasks, seed, max(1, workers), verify, timeout,
                                 progress, t0)
    finally:
        if own:
            await pool.shutdown()


async def _run_suite(client: PoolClient, files: dict[str, bytes], timeout: float):
    async with client.session(PROFILE_NAME) as session:
        await setup_repo(session, files)
        return await run_pytest(session, [], timeout)


async def _synthesize(repo: Path, client, max_tasks, seed, workers, verify, timeout, progress, t0):
    files = read_repo(repo)
    base_commit = content_hash(files)
    repo_name = repo.resolve().name
    baseline = await _run_suite(client, files, timeout)
    passing = sorted(n for n, s in baseline.status.items() if s == "passed")
    if not passing:
        raise RuntimeError(f"no test of {repo} passes unmutated in the sandbox:\n{baseline.output[-2000:]}")
    if progress:
        log(f"[synthesize] {repo_name}: {len(passing)} tests pass unmutated "
            f"({len(baseline.status) - len(passing)} others ignored), {baseline.duration_s:.2f}s per run")

    candidates: list[Mutation] = []
    for path in source_files(files):
        candidates += mutations(path, files[path].decode("utf-8", "replace"))
    candidates.sort(key=lambda m: m.key)
    random.Random(seed).shuffle(candidates)
    if progress:
        log(f"[synthesize] {len(candidates)} candidate mutations; looking for {max_tasks} tasks on {workers} sandboxes")

    results: dict[int, SWETask | None] = {}
    next_idx = 0
    done = asyncio.Event()
    stats = {"candidates": len(candidates), "tried": 0, "rejected_no_break": 0, "rejected_collateral": 0,
             "rejected_verify": 0}

    def enough() -> bool:
        found = 0
        for i in range(len(candidates)):
            if i not in results:
                return False
            found += results[i] is not None
            if found >= max_tasks:
                return True
        return True

    async def try_one(session, i: int) -> SWETask | None:
        """Run candidate i in the worker's sandbox (the repository is already there, unmutated)."""
        m = candidates[i]
        original = files[m.path].decode("utf-8", "replace")
        repo_path = f"{REPO_DIR}/{m.path}"
        await session.write_file(repo_path, m.source.encode("utf-8"))
        try:
            run = await run_pytest(session, [], timeout)
            broken = [n for n in passing if run.status.get(n) != "passed"]
            if run.collect_errors or run.timed_out or len(broken) == len(passing):
                stats["rejected_collateral"] += 1
                return None
            if not broken:
                stats["rejected_no_break"] += 1
                return None
            still = [n for n in passing if n not in broken]
            stem = Path(m.path).with_suffix("").as_posix().replace("/", ".")
            task = SWETask(
                instance_id=f"{repo_name}__{stem}.{m.function}-{m.kind}-{i:04d}",
                problem_statement=problem_statement(repo_name, broken, run.messages),
                patch=unified_diff(m.path, m.source, original), test_patch="",
                FAIL_TO_PASS=broken, PASS_TO_PASS=still, repo=repo_ref(repo), base_commit=base_commit,
                base_files={m.path: m.source},
                meta={"mutation": m.kind, "description": m.description, "file": m.path, "function": m.function,
                      "line": m.lineno, "seed": seed})
            if verify:   # the grader's own steps: apply the gold patch, run the named tests, decide
                applied, _ = await apply_patch(session, task.patch, "gold")
                resolved = False
                if applied:
                    check = await run_pytest(session, node_files(task.test_nodes), timeout)
                    resolved, _ = decide(task, check.status)
                if not resolved:
                    stats["rejected_verify"] += 1
                    return None
            return task
        finally:
            await session.write_file(repo_path, files[m.path])

    async def worker() -> None:
        nonlocal next_idx
        async with client.session(PROFILE_NAME) as session:
            await setup_repo(session, files)
            while not done.is_set() and next_idx < len(candidates):
                i = next_idx
                next_idx += 1
                results[i] = await try_one(session, i)
                _progress(i)

    def _progress(i: int) -> None:
        stats["tried"] += 1
        if progress:
            n = sum(t is not None for t in results.values())
            log(f"[synthesize] {stats['tried']}/{len(candidates)} tried, {n} tasks "
                f"({time.perf_counter() - t0:.1f}s)" + (f"  + {results[i].instance_id}" if results[i] else ""))
        if enough():
            done.set()

    await asyncio.gather(*(worker() for _ in range(workers)))
    tasks = [results[i] for i in sorted(results) if results[i] is not None][:max_tasks]
    stats.update(tasks=len(tasks), seconds=round(time.perf_counter() - t0, 2), tests=len(passing))
    return tasks, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.swe.synthesize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="a Python repository with a pytest suite")
    ap.add_argument("--out", required=True, help="where to write the tasks (JSONL)")
    ap.add_argument("--max-tasks", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="sandboxes running candidates concurrently")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per test-suite run")
    ap.add_argument("--no-verify", action="store_true", help="skip grading each task with its gold patch")
    args = ap.parse_args(argv)
    if args.max_tasks < 1:
        ap.error("--max-tasks must be at least 1")
    if not Path(args.repo).is_dir():
        ap.error(f"--repo {args.repo!r} is not a directory")
    tasks, stats = asyncio.run(synthesize(args.repo, max_tasks=args.max_tasks, seed=args.seed,
                                          workers=args.workers, verify=not args.no_verify, timeout=args.timeout))
    write_tasks(args.out, tasks)
    print(f"repository      {args.repo}")
    print(f"tests passing   {stats['tests']}")
    print(f"candidates      {stats['candidates']} ({stats['tried']} tried)")
    print(f"rejected        no test broken {stats['rejected_no_break']}, collateral {stats['rejected_collateral']}, "
          f"gold patch failed {stats['rejected_verify']}")
    print(f"tasks           {len(tasks)} -> {args.out}  ({stats['seconds']}s)")
    by_kind: dict[str, int] = {}
    for t in tasks:
        by_kind[t.meta["mutation"]] = by_kind.get(t.meta["mutation"], 0) + 1
    print("by mutation     " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    print(json.dumps({"tasks": len(tasks)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
