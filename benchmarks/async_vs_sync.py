"""Asynchronous versus synchronous GRPO on episodes with long-tailed environment steps.

The same pipeline runs twice on the same seed: synchronously (`replay.max_staleness=0`: every
step waits for its slowest episode, then the learner trains while generators idle) and
asynchronously (`replay.max_staleness=K`). Each episode's environment step sleeps for a
log-normal time, as tool calls and test runs do in agentic RL. The synchronous baseline is the
strongest form of the alternative: all episodes of a step run concurrently, so it waits only for
the slowest one, never for a queue.

    python benchmarks/async_vs_sync.py [steps=12] [staleness=4] [latency=lognormal:0.3:1.0:6]

Last line: one JSON object with `speedup` (async over sync trained samples/s) and `learner_busy`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._args import parse, scratch_dir  # noqa: E402
from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import GRPOConfig, load  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "grpo.yaml")
DEFAULTS = {"steps": 12, "staleness": 4, "latency": "lognormal:0.3:1.0:6"}


def measure(max_staleness: int, steps: int, latency: str, run_dir: str) -> dict:
    from rayrl.pipeline import run
    cfg = load(GRPOConfig, RECIPE, [
        f"replay.max_staleness={max_staleness}", f"trainer.total_steps={steps}", f"task.tool_latency={latency}",
        "trainer.sft.steps=0", "trainer.eval.every=0", "task.eval_size=16",
        # Throughput only: keep every group, so both modes train the same number of samples per step.
        "replay.filter_zero_variance=false", f"run.dir={run_dir}", "run.progress=false"])
    summary = run(cfg)
    return {k: summary[k] for k in ("samples_per_s", "learner_busy", "staleness_mean")}


def main(argv: list[str]) -> None:
    args = parse(argv, __doc__, DEFAULTS)
    steps, staleness, latency = args["steps"], args["staleness"], args["latency"]
    with scratch_dir("async_vs_sync") as tmp:
        sync = measure(0, steps, latency, os.path.join(tmp, "sync"))
        asyn = measure(staleness, steps, latency, os.path.join(tmp, "async"))
    speedup = asyn["samples_per_s"] / sync["samples_per_s"]
    print(f"\nenvironment step latency: {latency}; {steps} steps of 16 groups x 8 samples; first step excluded")
    print(f"{'mode':<22}{'samples/s':>12}{'learner busy':>15}{'mean staleness':>17}")
    for name, r in (("sync (staleness 0)", sync), (f"async (staleness {staleness})", asyn)):
        print(f"{name:<22}{r['samples_per_s']:>12.1f}{r['learner_busy']:>15.2f}{r['staleness_mean']:>17.2f}")
    print(f"speedup async/sync: {speedup:.2f}x (target >= 2.5)")
    print(json.dumps({"speedup": round(speedup, 3), "learner_busy": round(asyn["learner_busy"], 3),
                      "learner_busy_sync": round(sync["learner_busy"], 3),
                      "samples_per_s_async": round(asyn["samples_per_s"], 2),
                      "samples_per_s_sync": round(sync["samples_per_s"], 2),
                      "staleness_mean_async": round(asyn["staleness_mean"], 3),
                      "staleness_mean_sync": round(sync["staleness_mean"], 3),
                      "max_staleness": staleness, "latency": latency, "steps": steps}))


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
