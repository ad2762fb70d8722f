"""Grade predictions against SWE tasks, like SWE-bench's harness.

    python -m envs.swe.grade --tasks tasks.jsonl --predictions preds.jsonl [--workers K] [--timeout S]

Predictions are JSONL rows `{"instance_id": ..., "model_patch": ...}`; a task without a prediction
counts as unresolved. Prints one line per task and, last, `{"resolved": n, "total": m}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from envs.swe.harness import grade
from envs.swe.runtime import make_pool
from rayrl.sandbox.client import PoolClient
from envs.swe.tasks import SWETask, load_predictions, load_tasks


async def grade_all(tasks: list[SWETask], predictions: dict[str, str], pool=None, workers: int = 2,
                    timeout: float = 120.0) -> list[tuple[float, dict]]:
    """(reward, info) per task, in order. `pool`: None starts a local one for the call."""
    own = pool is None
    if own:
        pool = make_pool(max_total=max(1, workers))
    client = PoolClient(pool)
    sem = asyncio.Semaphore(max(1, workers))

    async def one(task: SWETask):
        if task.instance_id not in predictions:
            return 0.0, {"instance_id": task.instance_id, "resolved": False, "reason": "no prediction"}
        async with sem:
            return await grade(client, task, predictions[task.instance_id], timeout=timeout)

    try:
        return list(await asyncio.gather(*(one(t) for t in tasks)))
    finally:
        if own:
            await pool.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.swe.grade", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--predictions", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per test run")
    ap.add_argument("--report", help="also write per-task details as JSONL here")
    args = ap.parse_args(argv)
    tasks = load_tasks(args.tasks)
    predictions = load_predictions(args.predictions)
    unknown = sorted(set(predictions) - {t.instance_id for t in tasks})
    t0 = time.perf_counter()
    results = asyncio.run(grade_all(tasks, predictions, workers=args.workers, timeout=args.timeout))
    resolved = 0
    for task, (reward, info) in zip(tasks, results):
        resolved += reward == 1.0
        if reward == 1.0:
            line = "RESOLVED"
        else:
            line = f"failed: {info.get('reason', 'unresolved')}"
            if "FAIL_TO_PASS" in info:
                line += (f" (FAIL_TO_PASS {info['f2p_passed']}/{len(task.FAIL_TO_PASS)}, "
                         f"PASS_TO_PASS {info['p2p_passed']}/{len(task.PASS_TO_PASS)})")
        print(f"{task.instance_id:<60} {line}")
    if unknown:
        print(f"ignored {len(unknown)} prediction(s) for unknown instance ids: {', '.join(unknown[:5])}")
    print(f"resolved {resolved}/{len(tasks)} in {time.perf_counter() - t0:.1f}s")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            for _, info in results:
                f.write(json.dumps(info) + "\n")
    print(json.dumps({"resolved": int(resolved), "total": len(tasks)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
