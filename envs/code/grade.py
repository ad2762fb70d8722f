"""Grade solutions to code tasks in local sandboxes, like the public harnesses.

    python -m envs.code.grade --tasks T.jsonl --solutions S.jsonl [--timeout S] [--concurrency N]

Solutions are JSONL rows `{"task_id": ..., "completion": ...}`: for function tasks the completion
is appended to the prompt; for stdin/stdout tasks it is the whole program. Several rows may name
the same task (samples for pass@k); each is graded. Prints one line per solution and, as its last
line, `{"passed": n, "total": m}` (total = solution rows, malformed ones counted as failed). No
Ray needed: a local SandboxPool (bubblewrap) runs the programs. Exit status 0 whatever the score;
2 when the tasks file itself is malformed (the message names file, line and field).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from envs.code.tasks import MAX_TIMEOUT_S, TaskFormatError, load_tasks
from envs.rows import jsonl_rows
from envs.code.verify import DEFAULT_TIMEOUT_S, PoolClient, code_profile, grade_completion
from rayrl.sandbox.base import SandboxInfraError


def _solutions(path: str, tasks: dict) -> list[dict]:
    """One entry per solution row: {"where", "task_id", "completion"} or with an "error"."""
    rows = []
    try:
        lines = list(jsonl_rows(path))
    except TaskFormatError as e:   # unreadable file or a line of bad JSON: report it as one failed row
        return [{"where": path, "task_id": "?", "error": str(e)}]
    for lineno, row in lines:
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            rows.append({"where": where, "task_id": "?", "error": "a solution must be a JSON object"})
            continue
        task_id = row.get("task_id")
        if task_id is None:
            rows.append({"where": where, "task_id": "?", "error": "field 'task_id' is missing"})
        elif str(task_id) not in tasks:
            rows.append({"where": where, "task_id": str(task_id), "error": f"unknown task_id {task_id!r}"})
        elif "completion" not in row:
            rows.append({"where": where, "task_id": str(task_id), "error": "field 'completion' is missing"})
        elif not isinstance(row["completion"], str):
            rows.append({"where": where, "task_id": str(task_id),
                         "error": f"field 'completion' must be str, got {type(row['completion']).__name__}"})
        else:
            rows.append({"where": where, "task_id": str(task_id), "completion": row["completion"]})
    return rows


async def grade_all(tasks: dict, rows: list[dict], timeout_s: float | None, concurrency: int) -> list[dict]:
    from rayrl.sandbox.pool import SandboxPool
    profile = code_profile("code", timeout_s or DEFAULT_TIMEOUT_S)
    pool = SandboxPool([profile], min_idle=min(concurrency, 2), max_total=concurrency, export_metrics=False)
    client = PoolClient(pool)
    gate = asyncio.Semaphore(concurrency)

    async def one(row: dict) -> dict:
        if "error" in row:
            return {**row, "reward": 0.0, "info": {"failure": "bad_row", "detail": row["error"]}}
        async with gate:
            for attempt in range(2):   # an infrastructure failure is retried once on a fresh sandbox
                try:
                    reward, info = await grade_completion(client, tasks[row["task_id"]], row["completion"],
                                                          timeout_s=timeout_s, profile="code")
                    return {**row, "reward": reward, "info": info}
                except SandboxInfraError as e:
                    err = str(e)
            return {**row, "reward": 0.0, "info": {"failure": "infra_error", "detail": err}}

    try:
        return await asyncio.gather(*(one(r) for r in rows))
    finally:
        await pool.shutdown()


def _line(result: dict) -> str:
    info = result["info"]
    status = "PASS" if result["reward"] == 1.0 else "FAIL"
    text = f"{status}  {result['task_id']}  ({result['where']})"
    if "passed" in info:
        text += f"  {info['passed']}/{info['total']} tests"
    if result["reward"] != 1.0:
        text += f"  {info.get('failure')}: {info.get('detail', '')}"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.code.grade", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", required=True, help="tasks JSONL (function and/or stdin/stdout tasks)")
    ap.add_argument("--solutions", required=True, help="solutions JSONL: task_id, completion")
    ap.add_argument("--timeout", type=float, default=None,
                    help=f"seconds per test run (default: the task's timeout_s, else {DEFAULT_TIMEOUT_S})")
    ap.add_argument("--concurrency", type=int, default=4, help="sandboxes graded at once")
    ap.add_argument("--verbose", action="store_true", help="print the stderr tail of failed solutions")
    args = ap.parse_args(argv)
    if args.timeout is not None and not 0 < args.timeout <= MAX_TIMEOUT_S:
        ap.error(f"--timeout {args.timeout}: must be in (0, {MAX_TIMEOUT_S:g}]")
    try:
        tasks = {t.task_id: t for t in load_tasks(args.tasks)}
    except TaskFormatError as e:
        print(f"error: bad tasks file: {e}", file=sys.stderr)
        print(json.dumps({"passed": 0, "total": 0}))
        return 2
    rows = _solutions(args.solutions, tasks)
    start = time.perf_counter()
    results = asyncio.run(grade_all(tasks, rows, args.timeout, max(1, args.concurrency)))
    elapsed = time.perf_counter() - start
    for r in results:
        print(_line(r))
        if args.verbose and r["reward"] != 1.0 and r["info"].get("stderr"):
            print("    " + r["info"]["stderr"].rstrip().replace("\n", "\n    "))
    passed = sum(r["reward"] == 1.0 for r in results)
    missing = sorted(set(tasks) - {r["task_id"] for r in results})
    kinds: dict[str, int] = {}
    for r in results:
        if r["reward"] != 1.0:
            kinds[r["info"].get("failure") or "?"] = kinds.get(r["info"].get("failure") or "?", 0) + 1
    print(f"\n{passed}/{len(results)} solutions passed in {elapsed:.1f}s"
          + (f"; failures: {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}" if kinds else ""))
    if missing:
        print(f"{len(missing)} task(s) without a solution (not counted): {', '.join(missing[:10])}"
              + (" ..." if len(missing) > 10 else ""))
    print(json.dumps({"passed": passed, "total": len(results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
