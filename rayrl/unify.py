"""Specialize-then-Unify (KAT-Coder-V2): one expert per domain, merged into one student by
on-policy distillation, with off-policy distillation as the baseline in the same run.

0. Base: the common starting point of every expert and of the student. A real run starts from a
   pretrained checkpoint (model.path); the tiny default model gets a brief SFT on mixed-domain
   demonstrations instead (`unify.base_sft_steps`), which stands in for pretraining.
1. Experts: for each domain, from the base, SFT on the domain's oracle demonstrations then GRPO in
   its environment (rayrl.pipeline.run), or a checkpoint reused from `unify.experts` / an earlier run.
2. Student: the base, evaluated per domain.
3. On-policy distillation: the student samples on mixed-domain prompts, the expert of each
   sample's domain scores the student's tokens (a Teacher actor), the learner follows the
   per-token reverse-KL advantage (rayrl.algo.distill) with the RL surrogate.
4. Baseline: the base trained by SFT on the experts' own samples instead, for the same number of
   updates on the same number of samples.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import ray

from rayrl.config import GRPOConfig, check_resume, checkpoint_state, complete_checkpoints, expand, latest_checkpoint
from rayrl.metrics import MetricsLogger
from rayrl.models import resolve_model_path
from rayrl.pipeline import (StepGuard, Trainer, check_resources, evaluate_domains, kill_closed, metrics_lines,
                            rewind_metrics, role_options, run, spawn, start_run)
from rayrl.rollout.generator import RolloutGenerator
from rayrl.rollout.teacher import Teacher


def domain_task(cfg, domain: str):
    task = copy.deepcopy(cfg.task)
    task.name = domain
    return task


def expert_config(cfg, domain: str, run_dir: str, base: str) -> GRPOConfig:
    """A GRPO run of the domain from the base, in run_dir/experts/<domain>; it continues the
    checkpoint found there if the unify run is a resumed one."""
    sub = GRPOConfig(**{name: copy.deepcopy(getattr(cfg, name)) for name in GRPOConfig.__dataclass_fields__})
    sub.task = domain_task(cfg, domain)
    sub.run.dir = os.path.join(run_dir, "experts", domain)
    sub.run.resume = sub.run.dir if cfg.run.resume and complete_checkpoints(sub.run.dir) else ""
    sub.model.path = base
    sub.trainer.eval.initial = False    # the base's score is the student's "before", measured once
    return sub


def furthest_checkpoint(run_dir: str, prefixes: tuple[str, ...], counter: str = "step") -> str | None:
    """Of the run's complete checkpoints named with one of `prefixes`, the one furthest in by its
    trainer state's `counter`, if any."""
    found = [(checkpoint_state(c)[counter], c)
             for c in complete_checkpoints(run_dir) if os.path.basename(c).startswith(prefixes)]
    return max(found)[1] if found else None


def distillation_checkpoint(run_dir: str) -> str | None:
    """The on-policy distillation's checkpoint furthest in (step_<N>, student_final), if any."""
    return furthest_checkpoint(run_dir, ("step_", "student_final"))


def base_sft_checkpoint(run_dir: str) -> str | None:
    """The base's SFT stopped part way: its checkpoint furthest in (sft_<N>), if any."""
    return furthest_checkpoint(run_dir, ("sft_",), "sft_step")


def resume_point(run_dir: str) -> str | None:
    """The checkpoint of the last whole phase of the run in run_dir (the distillation's, else the
    base's, else the base's SFT part way): a resumed run's metrics are cut back to it."""
    return (distillation_checkpoint(run_dir) or next(iter(complete_checkpoints(run_dir, ("base",))), None)
            or base_sft_checkpoint(run_dir))


def reused_expert(cfg, domain: str, reuse_dir: str | None) -> dict | None:
    """An expert given by path, or found in an earlier run directory; None if there is none."""
    if domain in cfg.unify.experts:
        path = expand(cfg.unify.experts[domain])
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"unify.experts.{domain}={path}: not a model checkpoint (no config.json)")
        return {"path": path, "eval": None}
    if reuse_dir:
        expert_dir = os.path.join(reuse_dir, "experts", domain)
        path = os.path.join(expert_dir, "checkpoints", "final")
        if complete_checkpoints(expert_dir, ("final",)):
            summary = os.path.join(expert_dir, "summary.json")
            score = json.load(open(summary)).get("eval_after") if os.path.isfile(summary) else None
            return {"path": path, "eval": score if same_evaluation(cfg, expert_dir) else None}
    return None


def same_evaluation(cfg, run_dir: str) -> bool:
    """Whether the run in run_dir scored its held-out tasks as cfg would (same tasks, same decoding);
    a score measured otherwise is not comparable and is measured again."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return False
    saved = json.load(open(path))
    ev = saved.get("trainer", {}).get("eval", {})
    return (saved.get("task", {}).get("eval_size") == cfg.task.eval_size
            and ev.get("temperature", 0.0) == cfg.trainer.eval.temperature
            and ev.get("samples", 1) == cfg.trainer.eval.samples)


def train_base(cfg, run_dir: str, reuse_dir: str | None, log: MetricsLogger) -> str:
    """The base checkpoint: reused from an earlier run, the model as given, or the model after
    `unify.base_sft_steps` of SFT on the domain mixture. A stop saves the SFT's last whole update
    (checkpoints/sft_<N>), which a resumed run continues."""
    from tqdm import tqdm

    if reuse_dir and complete_checkpoints(reuse_dir, ("base",)):
        path = os.path.join(reuse_dir, "checkpoints", "base")
        print(f"base: reusing {path}", flush=True)
        return path
    model = resolve_model_path(cfg.model)
    if not cfg.unify.base_sft_steps:
        return model
    partial = base_sft_checkpoint(run_dir) if cfg.run.resume else None
    print(f"base: SFT {cfg.unify.base_sft_steps} steps on {', '.join(cfg.unify.domains)}"
          + (f", resumed from {partial}" if partial else ""), flush=True)
    scfg = student_config(cfg)
    roles = spawn(scfg, model)
    try:
        trainer = Trainer(scfg, roles, model)
        if partial:
            trainer.restore(partial)
        with tqdm(total=cfg.unify.base_sft_steps, initial=trainer.sft_step, desc="base",
                  disable=not cfg.run.progress) as bar:
            trainer.warm_start(log, bar, steps=cfg.unify.base_sft_steps, start=trainer.sft_step)
        return trainer.checkpoint("base")
    finally:
        roles.shutdown()


def train_experts(cfg, run_dir: str, reuse_dir: str | None, base: str) -> dict[str, dict]:
    """Each domain's expert: reused where one is given or found, else trained from the base, one
    after another in the driver or `unify.parallel_experts` at a time (`train_in_parallel`)."""
    experts, todo, n = {}, [], len(cfg.unify.domains)
    for i, domain in enumerate(cfg.unify.domains, 1):
        found = reused_expert(cfg, domain, reuse_dir)
        if found:
            print(f"[{i}/{n}] expert {domain}: reusing {found['path']}", flush=True)
            experts[domain] = found
        else:
            todo.append((f"[{i}/{n}] expert {domain}", domain, expert_config(cfg, domain, run_dir, base)))
    if cfg.unify.parallel_experts > 1 and len(todo) > 1:
        experts.update(train_in_parallel(cfg, todo))
    else:
        for title, domain, sub in todo:
            announce_expert(title, sub)
            experts[domain] = trained_expert(domain, run(sub))
    return {d: experts[d] for d in cfg.unify.domains}


def announce_expert(title: str, sub) -> None:
    print(f"{title}: SFT {sub.trainer.sft.steps} steps, GRPO {sub.trainer.total_steps} steps"
          + (f", resumed from {latest_checkpoint(sub.run.dir)}" if sub.run.resume else ""), flush=True)


def trained_expert(domain: str, summary: dict) -> dict:
    print(f"expert {domain}: held-out {summary['eval_before']:.3f} after SFT, {summary['eval_after']:.3f} "
          f"after GRPO ({summary['wall_s']:.0f} s)", flush=True)
    return {"path": summary["checkpoint"], "eval": summary["eval_after"], "eval_sft": summary["eval_before"],
            "wall_s": summary["wall_s"]}


def expert_progress(sub) -> int:
    """Updates (SFT, then GRPO steps) the expert in sub.run.dir has logged."""
    lines = [line for line in metrics_lines(sub.run.dir) if line.endswith("\n")]
    return max(0, sub.trainer.sft.steps + json.loads(lines[-1])["step"]) if lines else 0


class ExpertsFailed(RuntimeError):
    """Experts trained in parallel failed (the others finished)."""


def train_in_parallel(cfg, todo: list) -> dict[str, dict]:
    """The experts of `todo` ((title, domain, config)), `unify.parallel_experts` at a time: each is
    `run` in a Ray task of its own, which drives that expert's roles (on a cluster they spread over
    the nodes, as every role does). An expert that fails has saved its last whole step; the others
    go on, and ExpertsFailed names the failed ones at the end. A stop of the driver (SIGINT,
    SIGTERM: `ray job stop`) cancels the running ones: each task gets it as the driver would the
    signal, saves its last whole step, and the stop goes on once they have all ended. A resumed run
    continues every expert from what it saved."""
    from tqdm import tqdm

    width = min(cfg.unify.parallel_experts, len(todo))
    check_resources(todo[0][2], copies=width, copies_key="unify.parallel_experts")
    train = ray.remote(num_cpus=0, max_retries=0)(run)
    queue, running, experts, failed, bars = list(todo), {}, {}, {}, {}
    with StepGuard() as guard:
        try:
            while queue or running:
                while queue and len(running) < width:
                    title, domain, sub = queue.pop(0)
                    announce_expert(title, sub)
                    sub.run.progress = False   # one bar per expert here instead
                    running[train.options(name=f"expert_{domain}").remote(sub)] = (domain, sub)
                    bars[domain] = tqdm(total=sub.trainer.sft.steps + sub.trainer.total_steps,
                                        desc=f"expert {domain}", disable=not cfg.run.progress)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
                for domain, sub in running.values():
                    bars[domain].update(expert_progress(sub) - bars[domain].n)
                for ref in ready:
                    domain, _ = running.pop(ref)
                    bars.pop(domain).close()
                    try:
                        experts[domain] = trained_expert(domain, ray.get(ref))
                    except ray.exceptions.RayTaskError as err:
                        failed[domain] = err.cause
                        print(f"expert {domain} failed: {type(err.cause).__name__}: {err.cause}"
                              + ("; the other experts go on" if queue or running else ""), flush=True)
        except BaseException:
            for ref in running:   # not its actors' calls: the task itself ends them
                ray.cancel(ref, recursive=False)
            if running:
                print(f"waiting for the experts {', '.join(d for d, _ in running.values())} to save their last "
                      "whole step", flush=True)
                ray.wait(list(running), num_returns=len(running))
            if guard.received:   # as the signal's own KeyboardInterrupt (ray.wait re-raises a bare one)
                raise KeyboardInterrupt(guard.received) from None
            raise
        finally:
            for bar in bars.values():
                bar.close()
    if failed:
        raise ExpertsFailed("; ".join(f"expert {d} failed: {type(e).__name__}: {e}" for d, e in failed.items())
                            + f" (the experts {', '.join(experts) or 'none'} finished; run.resume continues the "
                            "failed ones from their last saved step)") from next(iter(failed.values()))
    return experts


def student_config(cfg):
    """The GRPO sections on the domain mixture; every group counts (the teacher's signal does not
    need reward variance)."""
    sub = copy.deepcopy(cfg)
    sub.task.name = ",".join(cfg.unify.domains)
    sub.replay.filter_zero_variance = False
    return sub


def evaluate_experts(cfg, experts: dict[str, dict], base: str) -> None:
    """Held-out score of the experts that came without one (reused checkpoints)."""
    for domain, expert in experts.items():
        if expert["eval"] is None:
            sub = expert_config(cfg, domain, expand(cfg.run.dir), base)
            options = role_options(0, sub.rollout.num_gpus, sub.rollout.resources)
            gen = ray.remote(RolloutGenerator).options(**options).remote(
                expert["path"], sub.rollout, sub.task, sub.run.seed, sub.run.torch_threads)
            tasks = ray.get(gen.eval_tasks.remote(sub.task.eval_size))
            expert["eval"] = evaluate_domains([gen], tasks, sub.trainer.eval)[domain]
            print(f"expert {domain}: held-out {expert['eval']:.3f}", flush=True)
            kill_closed([gen])


def offpolicy_batches(cfg, experts: dict[str, dict], seed: int, start: int = 0):
    """Per step after `start`, the experts' own samples on their domains' training prompts:
    groups_per_step groups split evenly over the domains (the mixture the student samples from)."""
    if start >= cfg.distill.steps:
        return
    domains = list(cfg.unify.domains)
    gens = {d: ray.remote(RolloutGenerator).options(**role_options(0, cfg.rollout.num_gpus, cfg.rollout.resources),
                                                    max_concurrency=1000).remote(
        experts[d]["path"], cfg.rollout, domain_task(cfg, d), seed + i,
        cfg.run.torch_threads) for i, d in enumerate(domains)}
    per_domain = [cfg.trainer.groups_per_step // len(domains) + (i < cfg.trainer.groups_per_step % len(domains))
                  for i in range(len(domains))]

    def request(step: int) -> list:
        # Unscored: the SFT takes every sample and never a reward (webcoding's Chromium check alone
        # would cost about 0.4 s a sample).
        return [gens[d].sample_groups.remote(n, seed * 100003 + step, score=False)
                for d, n in zip(domains, per_domain) if n]

    try:
        pending = request(start)
        for step in range(start, cfg.distill.steps):
            batch = [g for part in ray.get(pending) for g in part]
            if step + 1 < cfg.distill.steps:
                pending = request(step + 1)
            yield batch
    finally:
        kill_closed(list(gens.values()))


def continued_trainer(cfg, roles, base: str, checkpoint: str | None, phase: str) -> Trainer:
    """A Trainer of `phase` on `roles`, continued from `checkpoint` if one is given."""
    trainer = Trainer(cfg, roles, base)
    if checkpoint:
        trainer.restore(checkpoint)
        print(f"{phase}: resumed from {checkpoint}", flush=True)
    return trainer


def offpolicy_baseline(cfg, scfg, run_dir: str, experts: dict[str, dict], base: str,
                       resume: bool) -> tuple[dict[str, float], list[dict]]:
    """The baseline: the base trained by SFT on the experts' own samples for as many updates as the
    distillation, in run_dir/offpolicy; (held-out scores, logged updates). A stop saves its last
    whole update (offpolicy/checkpoints/sft_<N>), which a resumed run continues."""
    from tqdm import tqdm

    bcfg = copy.deepcopy(scfg)
    bcfg.trainer.sft.lr = cfg.distill.baseline_lr
    bcfg.run.dir = os.path.join(run_dir, "offpolicy")
    stopped = base_sft_checkpoint(bcfg.run.dir) if resume else None
    if resume:   # its metrics are cut back to the checkpoint it continues from, or all moved aside
        rewind_metrics(bcfg.run.dir, checkpoint_state(stopped)["metrics_lines"] if stopped else 0)
    roles = spawn(bcfg, base)
    try:
        trainer = continued_trainer(bcfg, roles, base, stopped, "off-policy baseline")
        with MetricsLogger(bcfg.run.dir) as log, tqdm(total=cfg.distill.steps, initial=trainer.sft_step,
                                                       desc="off-policy baseline",
                                                       disable=not cfg.run.progress) as bar:
            trainer.warm_start(log, bar, steps=cfg.distill.steps, start=trainer.sft_step,
                               batches=offpolicy_batches(cfg, experts, cfg.run.seed + 17, trainer.sft_step))
        history = [json.loads(line) for line in metrics_lines(bcfg.run.dir)]   # with those before a stop
        scores = trainer.evaluate_domains()
        print(f"student after off-policy distillation, held-out: {format_scores(scores)}", flush=True)
    finally:
        roles.shutdown()
    return scores, history


def unify(cfg) -> dict:
    resume = check_resume(cfg)   # a resumed run's directory: what it holds whole is kept, the rest redone
    if resume:
        cfg = copy.deepcopy(cfg)
        cfg.run.dir = resume
        distilled, kept = distillation_checkpoint(resume), resume_point(resume)
        run_dir, log, _ = start_run(cfg, checkpoint_state(kept)["metrics_lines"] if kept else 0)
        reuse_dir = run_dir
        print(f"resuming {run_dir}: whole checkpoints are reused or continued, the rest is done again", flush=True)
    else:
        distilled = None
        run_dir, log, moved = start_run(cfg)
        reuse_dir = expand(cfg.unify.reuse) if cfg.unify.reuse else None
        if reuse_dir == run_dir:
            reuse_dir = moved
    with log:   # closed however the run ends
        return unify_phases(cfg, run_dir, log, reuse_dir, distilled, bool(resume))


def unify_phases(cfg, run_dir: str, log: MetricsLogger, reuse_dir: str | None, distilled: str | None,
                 resumed: bool) -> dict:
    """unify's phases in an open run directory: base, experts, on-policy distillation, baseline, summary."""
    from tqdm import tqdm

    start = time.time()
    base = train_base(cfg, run_dir, reuse_dir, log)
    base_s = time.time() - start
    experts = train_experts(cfg, run_dir, reuse_dir, base)
    evaluate_experts(cfg, experts, base)
    experts_s = time.time() - start - base_s

    scfg = student_config(cfg)
    teachers = {d: ray.remote(Teacher).options(**role_options(cfg.distill.teacher_cpus, cfg.distill.teacher_gpus,
                                                              cfg.distill.teacher_resources)).remote(
        e["path"], cfg.distill.teacher_temperature or cfg.rollout.temperature, cfg.rollout.max_batch,
        cfg.run.torch_threads, cfg.rollout.engine, cfg.distill.topk)
        for d, e in experts.items()}
    roles = spawn(scfg, base)
    try:
        trainer = continued_trainer(scfg, roles, base, distilled, "on-policy distillation")
        if not distilled:
            trainer.evals["student_before"] = trainer.evaluate_domains()   # kept with the checkpoints
        before = trainer.evals["student_before"]
        print(f"student (the base), held-out: {format_scores(before)}", flush=True)
        history = [r for r in map(json.loads, metrics_lines(run_dir)) if r["step"] > 0]   # resumed: steps before
        with tqdm(total=cfg.distill.steps, initial=trainer.step, desc="on-policy distillation",
                  disable=not cfg.run.progress) as bar:
            if trainer.step < cfg.distill.steps:
                history += trainer.train_rl(log, bar, steps=cfg.distill.steps, lr=cfg.distill.lr, teachers=teachers,
                                            rl_weight=cfg.distill.rl_weight, start=trainer.step)
        student = trainer.checkpoint("student_final")   # before the evaluation, which may fail
        after = trainer.evaluate_domains()
        print(f"student after on-policy distillation, held-out: {format_scores(after)}", flush=True)
    finally:
        roles.shutdown()
        for t in teachers.values():
            ray.kill(t)
    distill_s = time.time() - start - base_s - experts_s

    baseline, baseline_history = (offpolicy_baseline(cfg, scfg, run_dir, experts, base, resumed)
                                  if cfg.distill.baseline else (None, []))

    domains = {d: {"expert": experts[d]["eval"], "student_before": before.get(d), "student_after": after.get(d),
                   **({"student_after_offpolicy": baseline.get(d)} if baseline else {})}
               for d in cfg.unify.domains}
    kl = [h["reverse_kl"] for h in history if "reverse_kl" in h]
    summary = {
        "domains": domains,
        "onpolicy": {"mean_after": float(np.mean(list(after.values()))), "steps": cfg.distill.steps,
                     "reverse_kl_first": kl[0] if kl else None, "reverse_kl_last": kl[-1] if kl else None},
        "offpolicy": ({"mean_after": float(np.mean(list(baseline.values()))), "steps": cfg.distill.steps}
                      if baseline else None),
        "mean_student_before": float(np.mean(list(before.values()))),
        "mean_expert": float(np.mean([e["eval"] for e in experts.values()])),
        "experts": {d: e["path"] for d, e in experts.items()},
        "student_checkpoint": student,
        "base": base,
        "wall_s": {"base": base_s, "experts": experts_s, "distill": distill_s, "total": time.time() - start},
    }
    summary["plot"] = plot(os.path.join(run_dir, "unify.png"), history, baseline_history, domains)
    log.summary(summary)
    return summary


def plot(path: str, history: list[dict], baseline_history: list[dict], domains: dict) -> str | None:
    """Training curves (reverse KL and reward per domain) and the held-out table as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    steps = [h["step"] for h in history]
    for d in domains:
        axes[0].plot(steps, [h.get(f"domain/{d}/reverse_kl", np.nan) for h in history], label=d)
        axes[1].plot(steps, [h.get(f"domain/{d}/reward", np.nan) for h in history], label=d)
    axes[0].set(title="on-policy distillation: reverse KL to the teacher", xlabel="student update")
    axes[1].set(title="on-policy distillation: train reward", xlabel="student update")
    if baseline_history:
        ax = axes[1].twinx()
        ax.plot([h["step"] + len(baseline_history) for h in baseline_history],
                [h["sft_nll"] for h in baseline_history], "k--", alpha=0.5, label="off-policy SFT NLL")
        ax.set_ylabel("off-policy baseline: SFT NLL")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    names = list(domains)
    x = np.arange(len(names))
    columns = [c for c in ("expert", "student_before", "student_after", "student_after_offpolicy")
               if all(c in domains[d] for d in names)]
    for i, c in enumerate(columns):
        axes[2].bar(x + (i - len(columns) / 2 + 0.5) * 0.2, [domains[d][c] or 0.0 for d in names], 0.2, label=c)
    axes[2].set(title="held-out score per domain", xticks=x, ylim=(0, 1))
    axes[2].set_xticklabels(names, rotation=20)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{d} {v:.3f}" for d, v in scores.items())


def print_table(summary: dict) -> None:
    rows = summary["domains"]
    columns = ["expert", "student_before", "student_after"] + \
        (["student_after_offpolicy"] if summary.get("offpolicy") else [])
    header = ["domain", "expert", "student before", "on-policy after"] + \
        (["off-policy after"] if summary.get("offpolicy") else [])
    widths = [max(10, len(h)) for h in header]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for d, r in rows.items():
        cells = [d] + [f"{r[c]:.3f}" if r.get(c) is not None else "-" for c in columns]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    on, off = summary["onpolicy"], summary.get("offpolicy")
    print(f"mean: expert {summary['mean_expert']:.3f}, student before {summary['mean_student_before']:.3f}, "
          f"on-policy {on['mean_after']:.3f}" + (f", off-policy {off['mean_after']:.3f}" if off else ""))
    if on["reverse_kl_first"] is not None:
        print(f"reverse KL to the teachers: {on['reverse_kl_first']:.3f} -> {on['reverse_kl_last']:.3f}")
    w = summary["wall_s"]
    print(f"wall time: base {w['base']:.0f} s, experts {w['experts']:.0f} s, distillation {w['distill']:.0f} s, "
          f"total {w['total']:.0f} s")
    if summary.get("plot"):
        print(f"plot: {summary['plot']}")
