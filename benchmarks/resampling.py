"""History Resampling (SRPO) versus dynamic sampling (DAPO) versus vanilla GRPO, same training.

The task is recipes/grpo.yaml's integer addition with a finite training set (replay.prompts
tasks, iterated in epochs) and its imperfect warm start (SFT demonstrations off by one on 60% of
the tasks), from which RL soon solves part of the prompts. One warm start is shared; from it each
arm runs the same number of asynchronous GRPO steps on the same prompts and seed, evaluated on
the held-out tasks every `eval_every` steps:

  vanilla   every group is trained on, zero-advantage ones included (the baseline)
  dynamic   DAPO dynamic sampling: all-0 and all-1 groups are dropped and rolled out anew
  hr        SRPO History Resampling: prompts whose latest group was all correct leave the set at
            each epoch boundary; mixed and all-wrong ones stay (no per-step filter)

Per arm: the effective ratio (share of trained samples with a non-zero advantage, mean over the
steps), the rollout yield (the same share over every rolled-out sample, filtered or not), the
shares of rolled-out samples in all-correct and all-wrong groups, History Resampling's drops per
group rolled out (each drop was first seen as an all-correct group, so HR's ratio is at most one
minus this and the all-wrong share), the first step whose held-out reward reaches the target and
the groups rolled out by then, the step at which History Resampling first dropped a prompt
(before it, the arm is vanilla GRPO), and the held-out reward at the start and the end.

With `seeds=N` every arm runs N times (run.seed 0 .. N-1: other training prompts and samples,
the same warm start); shares are then means over the runs and steps medians (a run that never
reached the target counts as later than any that did), and a single run's steps to the target
vary by about ±8 on the default.

    python benchmarks/resampling.py [steps=60] [target=0.8] [prompts=128] [eval_every=2] [seeds=1]
        [warm=CHECKPOINT] [arms=vanilla,dynamic,hr] [any.config.key=value ...]

(`warm`: reuse the warm-start checkpoint of an earlier run; config keys apply to every run, e.g.
rollout.temperature=0.5, or replay.curate_samples=16 replay.curate_min_pass=0.15 to curate each
run's prompts by the warm start's pass rate first: `prompts_trained` is then what it kept.)
Last line: one JSON object with effective_ratio_{hr,dynamic,vanilla}, steps_to_target_{...}
(null if never reached; with seeds, the median, and the runs' own in steps_to_target_{...}_per_seed)
and the targets' checks.
"""

import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._args import parse, scratch_dir  # noqa: E402
from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import GRPOConfig, load  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "grpo.yaml")
ARMS = {"vanilla": ["replay.filter_zero_variance=false", "replay.resampling=none"],
        "dynamic": ["replay.filter_zero_variance=true", "replay.resampling=none"],
        "hr": ["replay.filter_zero_variance=false", "replay.resampling=history"]}
OUTCOMES = ("all_correct", "all_wrong", "mixed")
NAMES = {"vanilla": "vanilla GRPO", "dynamic": "dynamic sampling (DAPO)", "hr": "History Resampling (SRPO)"}
DEFAULTS = {"steps": 60, "target": 0.8, "prompts": 128, "eval_every": 2, "seeds": 1, "warm": "", "arms": tuple(ARMS)}
STEPS = ("steps_to_target", "groups_to_target", "first_drop_step")   # None: never


def config(run_dir: str, overrides: list[str]):
    return load(GRPOConfig, RECIPE, [f"run.dir={run_dir}", "run.progress=false", *overrides])


def arm(model: str, overrides: list[str], args: dict, run_dir: str) -> dict:
    from rayrl.pipeline import run
    cfg = config(run_dir, [*args["config"], f"model.path={model}", "trainer.sft.steps=0",
                           f"trainer.total_steps={args['steps']}", f"trainer.eval.every={args['eval_every']}",
                           f"replay.prompts={args['prompts']}", *overrides])
    summary = run(cfg)
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    reached = [s for s in steps if "eval" in s and s["eval"] >= args["target"]]
    first, last = (reached[0] if reached else None), steps[-1]
    # Until History Resampling first drops a prompt it is vanilla GRPO: a target reached before then
    # says nothing about it (measured: HR "won" at steps 12-18 before its first drop at 21-47).
    dropped = [s for s in steps if any(v > 0 for k, v in s.items() if k.endswith("/solved_dropped"))]
    rolled = max(sum(last[f"buffer/samples_{o}"] for o in OUTCOMES), 1)
    # Every drop was seen as an all-correct group first: HR's ratio is at most 1 - drops / groups.
    drops = sum(v for k, v in last.items() if k.endswith(("/solved_dropped", "/readmitted")))
    return {"effective_ratio": sum(s["effective_ratio"] for s in steps) / len(steps),
            "rollout_yield": last["buffer/rollout_effective"],
            "rollout_all_correct": last["buffer/samples_all_correct"] / rolled,
            "rollout_all_wrong": last["buffer/samples_all_wrong"] / rolled,
            "drops_per_group": drops / max(last["buffer/received"], 1),
            "steps_to_target": int(first["step"]) if first else None,
            "groups_to_target": int(first["buffer/received"]) if first else None,
            "first_drop_step": int(dropped[0]["step"]) if dropped else None,
            "eval_start": summary["eval_before"], "eval_final": summary["eval_after"],
            "groups_rolled_out": int(last["buffer/received"]),
            # replay.curate_samples: the prompts left after the offline difficulty filter
            "prompts_trained": summary["curation"]["kept"] if "curation" in summary else args["prompts"]}


def combine(runs: list[dict]) -> dict:
    """One arm's runs (seeds) as one: shares and scores averaged, steps by their median (never =
    later than any), each run's steps to the target kept as `steps_to_target_per_seed`."""
    def median(values):
        m = statistics.median_low([math.inf if v is None else v for v in values])
        return None if m == math.inf else m
    out = {k: (median([r[k] for r in runs]) if k in STEPS else sum(r[k] for r in runs) / len(runs))
           for k in runs[0]}
    out["steps_to_target_per_seed"] = [r["steps_to_target"] for r in runs]
    return out


def main(argv: list[str]) -> None:
    args = parse(argv, __doc__, DEFAULTS, choices={"arms": ARMS}, config="a key of recipes/grpo.yaml, for every run")
    config_args = args["config"]
    load(GRPOConfig, RECIPE, config_args)   # an unknown key or a bad value: one line, before any work
    from rayrl.pipeline import run
    start = time.time()
    with scratch_dir("resampling") as tmp:
        # The warm start trains no RL step: it has no prompt set to curate.
        warm = args["warm"] or run(config(os.path.join(tmp, "warm"), [*config_args, "trainer.total_steps=0",
                                                                      "replay.curate_samples=0"]))["checkpoint"]
        results = {name: combine([arm(warm, [*ARMS[name], f"run.seed={seed}"], args,
                                      os.path.join(tmp, f"{name}{seed}")) for seed in range(args["seeds"])])
                   for name in args["arms"]}
    import ray
    ray.shutdown()   # no worker log may come after the table and the JSON line
    print(f"\n{args['steps']} GRPO steps from one warm start, {args['prompts']} training prompts, held-out reward "
          f"every {args['eval_every']} steps, target {args['target']}; config {' '.join(config_args) or '-'}"
          + (f"; {args['seeds']} seeds: means, and medians of steps" if args["seeds"] > 1 else ""))
    print(f"{'':<27}{'effective':>10}{'rollout':>9}{'rolled out':>11}{'rolled out':>11}{'drops /':>9}{'steps to':>10}"
          f"{'groups to':>11}{'first':>7}{'held-out':>10}{'held-out':>10}")
    print(f"{'':<27}{'ratio':>10}{'yield':>9}{'all right':>11}{'all wrong':>11}{'group':>9}{'target':>10}"
          f"{'target':>11}{'drop':>7}{'start':>10}{'final':>10}")
    to = lambda v: "-" if v is None else str(v)  # noqa: E731
    for name, r in results.items():
        print(f"{NAMES[name]:<27}{r['effective_ratio']:>10.3f}{r['rollout_yield']:>9.3f}"
              f"{r['rollout_all_correct']:>11.3f}{r['rollout_all_wrong']:>11.3f}{r['drops_per_group']:>9.3f}"
              f"{to(r['steps_to_target']):>10}{to(r['groups_to_target']):>11}{to(r['first_drop_step']):>7}"
              f"{r['eval_start']:>10.3f}{r['eval_final']:>10.3f}")
    if any(r["prompts_trained"] != args["prompts"] for r in results.values()):
        print("training prompts after curation: " + "; ".join(
            f"{name} {r['prompts_trained']:g}" for name, r in results.items()))
    if args["seeds"] > 1:
        print("steps to the target, per seed: " + "; ".join(
            f"{name} {' '.join(map(to, r['steps_to_target_per_seed']))}" for name, r in results.items()))
    out = {f"{k}_{name}": (round(v, 4) if isinstance(v, float) else v)
           for name, r in results.items() for k, v in r.items()}
    out.update({k: args[k] for k in ("target", "steps", "prompts", "seeds", "config")})
    hr, vanilla = results.get("hr"), results.get("vanilla")
    if hr and vanilla:
        faster = hr["steps_to_target"] is not None and (vanilla["steps_to_target"] is None
                                                        or hr["steps_to_target"] < vanilla["steps_to_target"])
        print(f"targets: effective_ratio_hr >= 0.95: {hr['effective_ratio'] >= 0.95}; "
              f"HR reaches the target in fewer steps than vanilla: {faster}"
              + (" (before History Resampling dropped any prompt: no evidence either way)"
                 if faster and (hr["first_drop_step"] is None or hr["first_drop_step"] > hr["steps_to_target"])
                 else ""))
        out.update({"target_effective_ratio_met": hr["effective_ratio"] >= 0.95, "target_faster_met": faster})
    print(f"wall {time.time() - start:.0f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
