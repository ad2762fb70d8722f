"""SRPO (two-staged history-resampling policy optimization) on the GRPO loop.

1. Roles as for GRPO (rayrl.pipeline.spawn). The generators hold every domain of the schedule
   (task.name = math,code), so held-out evaluation covers all of them at every stage; the buffer
   hands out a finite prompt set (replay.prompts per domain), with History Resampling when
   replay.resampling=history (rayrl.replay.prompts).
2. A warm start (SFT on demonstrations of every domain; a tiny model solves nothing without it).
3. The stages in one asynchronous loop (Trainer.train_rl with a step hook): each stage sets the
   buffer's domain mix (SRPO: stage 1 math, stage 2 math plus code) and ends after its steps or
   when its held-out reward plateaus (`stage_done`); held-out accuracy per domain is measured at
   every stage's end. The HR record and epochs are saved with the checkpoint.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from rayrl.models import resolve_model_path
from rayrl.pipeline import Trainer, spawn, start_run


def plateaued(scores: list[float], patience: int, delta: float) -> bool:
    """True when none of the last `patience` scores beats the best one before them by `delta`."""
    if patience <= 0 or len(scores) <= patience:
        return False
    return max(scores[-patience:]) < max(scores[:-patience]) + delta


def stage_done(stage, steps: int, scores: list[float]) -> str | None:
    """Why the stage ends after `steps` of its steps with held-out `scores` so far: "steps",
    "plateau", or None (it goes on)."""
    if steps >= stage.steps:
        return "steps"
    return "plateau" if plateaued(scores, stage.plateau_patience, stage.plateau_delta) else None


class StageHook:
    """`Trainer.train_rl`'s step hook: evaluates, switches the buffer's domain mix between stages
    and ends the loop after the last one. `rows` holds each finished stage's figures."""

    def __init__(self, trainer: Trainer, spec):
        self.trainer, self.stages, self.eval_every = trainer, spec.stages, spec.eval_every
        self.index, self.steps, self.scores, self.rows = 0, 0, [], []
        ray.get(trainer.roles.buffer.set_stage.remote(self.stages[0].domains))

    def __call__(self, step: int, record: dict) -> bool:
        stage = self.stages[self.index]
        self.steps += 1
        record["stage"] = self.index + 1
        if self.steps < stage.steps and not (self.eval_every and self.steps % self.eval_every == 0):
            return False
        # A stage evaluation the infrastructure failed is logged as eval_error and scores nothing:
        # the stage still ends after its steps, and srpo() measures a missing final score again.
        result = self.trainer.monitor_evaluation(step)
        record.update(result)
        evals = {k[len("eval/"):]: v for k, v in result.items() if k.startswith("eval/")} or None
        if evals:
            self.scores.append(float(np.mean([evals[d] for d in stage.domains])))
        reason = stage_done(stage, self.steps, self.scores)
        if reason is None:
            return False
        self.rows.append({"name": stage.name, "domains": dict(stage.domains), "steps": self.steps,
                          "end_step": step, "ended_by": reason, "eval": evals})
        self.index, self.steps, self.scores = self.index + 1, 0, []
        if self.index == len(self.stages):
            return True
        ray.get(self.trainer.roles.buffer.set_stage.remote(self.stages[self.index].domains))
        return False


def srpo(cfg) -> dict:
    """Warm start, then the stage schedule; returns the summary (also written to summary.json)."""
    from tqdm import tqdm

    run_dir, log, _ = start_run(cfg)
    model_path = resolve_model_path(cfg.model)
    start = time.time()
    roles = spawn(cfg, model_path)
    try:
        trainer = Trainer(cfg, roles, model_path)
        initial = trainer.evaluate_domains()
        with tqdm(total=cfg.trainer.sft.steps, desc="warm start", disable=not cfg.run.progress) as progress:
            trainer.warm_start(log, progress)
        warm = trainer.evaluate_domains()
        hook = StageHook(trainer, cfg.srpo)
        total = sum(s.steps for s in cfg.srpo.stages)
        with tqdm(total=total, desc="srpo", disable=not cfg.run.progress) as progress:
            history = trainer.train_rl(log, progress, steps=total, on_step=hook)
        checkpoint = trainer.checkpoint("final")   # before an evaluation that may fail
        if hook.rows[-1]["eval"] is None:
            hook.rows[-1]["eval"] = trainer.evaluate_domains()
        buffer = ray.get(roles.buffer.stats.remote())
    finally:
        roles.shutdown()
        log.close()
    final = hook.rows[-1]["eval"]
    summary = {
        "stages": [{"name": "initial", "steps": 0, "eval": initial},
                   {"name": "warm start", "steps": cfg.trainer.sft.steps, "eval": warm}, *hook.rows],
        "eval_init": initial, "eval_before": warm, "eval_after": final,
        "eval_gain": {d: final[d] - warm[d] for d in final},
        "effective_ratio": float(np.mean([h["effective_ratio"] for h in history])),
        "rollout_effective": buffer["rollout_effective"],
        "prompts": {k: v for k, v in buffer.items() if k.startswith("prompts/")},
        "rl_steps": len(history), "wall_s": time.time() - start, "checkpoint": checkpoint, "model": model_path,
        **({"curation": trainer.curation} if trainer.curation else {}),
    }
    log.summary(summary)
    return summary


def print_table(summary: dict) -> None:
    domains = list(summary["eval_after"])
    print()
    print(f"{'after':<28}{'steps':>7}  " + "".join(f"{d:>10}" for d in domains) + "  ended by")
    for row in summary["stages"]:
        cells = "".join(f"{row['eval'][d]:>10.3f}" if d in (row["eval"] or {}) else f"{'-':>10}" for d in domains)
        print(f"{row['name']:<28}{row['steps']:>7}  {cells}  {row.get('ended_by', '')}")
    gain = ", ".join(f"{d} {g:+.3f}" for d, g in summary["eval_gain"].items())
    print(f"held-out gain over the warm start: {gain}")
    print(f"trained samples with a GRPO signal: {summary['effective_ratio']:.3f} "
          f"(of all rolled-out samples: {summary['rollout_effective']:.3f})")
    solved = {k.split("/")[1]: v for k, v in summary["prompts"].items() if k.endswith("solved_dropped")}
    if solved:
        print("prompts dropped as solved (History Resampling): " + ", ".join(f"{d} {n}" for d, n in solved.items()))
    print(f"wall time {summary['wall_s']:.0f} s; checkpoint: {summary['checkpoint']}")
