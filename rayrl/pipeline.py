"""The driver: wires the roles and runs the asynchronous GRPO loop.

Generators roll out continuously, graders score, the buffer paces both and hands fresh groups to
the learner, the learner publishes each new version through the object store. Synchronous
training is this same loop with `replay.max_staleness=0`.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import ray

from envs import make_env
from rayrl.config import expand, to_dict
from rayrl.learner.group import LearnerGroup
from rayrl.metrics import MetricsLogger
from rayrl.models import chat_prompt_ids, load_tokenizer, resolve_model_path
from rayrl.replay.buffer import ReplayBuffer
from rayrl.reward.grader import RewardGrader
from rayrl.rollout.generator import RolloutGenerator
from rayrl.tree import TrajectoryTree, summarize


def init_ray(run_cfg) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local instance."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=run_cfg.ray_num_cpus, include_dashboard=False, log_to_driver=True)


@dataclass
class Roles:
    generators: list
    graders: list
    buffer: object
    learner: LearnerGroup

    def shutdown(self) -> None:
        self.learner.shutdown()
        for actor in [*self.generators, *self.graders, self.buffer]:
            ray.kill(actor)


def spawn(cfg, model_path: str) -> Roles:
    threads = cfg.run.torch_threads
    generators = [ray.remote(RolloutGenerator).options(num_cpus=cfg.rollout.num_cpus, max_concurrency=1000)
                  .remote(model_path, cfg.rollout, cfg.task, cfg.run.seed * 1000 + i, threads)
                  for i in range(cfg.rollout.num_generators)]
    graders = [ray.remote(RewardGrader).options(num_cpus=0).remote(cfg.task, model_path, cfg.learner.loss.advantage)
               for _ in range(cfg.reward.num_graders)]
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0, max_concurrency=1000).remote(
        cfg.trainer.groups_per_step, cfg.replay.max_staleness, cfg.replay.filter_zero_variance, cfg.replay.capacity)
    learner = LearnerGroup(model_path, cfg.learner, cfg.trainer.lr, cfg.rollout.temperature, cfg.run.seed, threads)
    return Roles(generators, graders, buffer, learner)


def sft_batches(env, tokenizer, cfg, rng: random.Random):
    """Oracle demonstrations as trees: the prompt at the root, the answer as a loss-masked child."""
    for _ in range(cfg.trainer.sft.steps):
        batch = []
        for _ in range(cfg.trainer.sft.batch_size):
            task = env.sample(rng)
            prompt = chat_prompt_ids(tokenizer, task.prompt)
            answer = tokenizer.encode(env.demonstration(task), add_special_tokens=False) + [tokenizer.eos_token_id]
            tree = TrajectoryTree(prompt)
            tree.add(0, answer, loss_mask=np.ones(len(answer), np.uint8))
            batch.append((summarize(tree), ray.put(tree)))
        yield batch


class Trainer:
    def __init__(self, cfg, roles: Roles, model_path: str):
        self.cfg, self.roles, self.model_path = cfg, roles, model_path
        self.version = 0
        self.eval_tasks = [vars(t) for t in make_env(cfg.task).eval_tasks(cfg.task.eval_size)]

    def publish(self) -> None:
        ref = self.roles.learner.publish()
        ray.get([g.set_weights.remote(self.version, [ref]) for g in self.roles.generators])
        ray.get(self.roles.buffer.set_version.remote(self.version))

    def evaluate(self) -> float:
        gens = self.roles.generators
        shards = [self.eval_tasks[i::len(gens)] for i in range(len(gens))]
        scores = ray.get([g.evaluate.remote(s, self.cfg.trainer.eval.temperature) for g, s in zip(gens, shards)])
        return float(np.mean([x for s in scores for x in s]))

    def next_batch(self, runs: list) -> list:
        """Wait for a fresh batch; a generator that died raises here instead of hanging the run."""
        while True:
            batch = ray.get(self.roles.buffer.get.remote(self.cfg.trainer.groups_per_step, self.version))
            if batch is not None:
                return batch
            done, _ = ray.wait(runs, timeout=0)
            if done:
                ray.get(done)
                raise RuntimeError("a rollout generator stopped unexpectedly")

    def warm_start(self, log: MetricsLogger, progress) -> None:
        """SFT on oracle demonstrations; publishes the result as a new version."""
        cfg = self.cfg
        env, tokenizer = make_env(cfg.task, cfg.run.seed), load_tokenizer(self.model_path)
        for step, batch in enumerate(sft_batches(env, tokenizer, cfg, random.Random(cfg.run.seed + 1)), 1):
            stats = self.roles.learner.train_step(batch, "sft", cfg.trainer.sft.lr)
            log.log(-cfg.trainer.sft.steps + step, {"phase": "sft", "sft_nll": stats["nll"]})
            progress.update(1)
            progress.set_postfix(nll=f"{stats['nll']:.3f}")
        self.version += 1
        self.publish()

    def train_rl(self, log: MetricsLogger, progress) -> list[dict]:
        """The asynchronous loop. With replay.max_staleness=0 the buffer makes it synchronous."""
        cfg, roles = self.cfg, self.roles
        # Enough episodes in flight to fill every step the staleness bound lets generators run ahead.
        concurrency = -(-cfg.trainer.groups_per_step * (cfg.replay.max_staleness + 1) // len(roles.generators))
        runs = [g.run.remote(roles.buffer, roles.graders, concurrency) for g in roles.generators]
        history, self._gen_tokens = [], self.generator_stats()["gen_tokens"]
        for step in range(1, cfg.trainer.total_steps + 1):
            tick = time.perf_counter()
            batch = self.next_batch(runs)                  # fresh groups, each handed out once
            got = time.perf_counter()
            stats = roles.learner.train_step(batch, "rl", cfg.trainer.lr)
            learned = time.perf_counter()
            self.version += 1
            self.publish()                                 # generators swap it in between episodes
            timing = {"wait_s": got - tick, "learner_step_s": learned - got, "step_s": time.perf_counter() - tick}
            record = self.step_record(batch, stats, timing)
            if cfg.trainer.eval.every and step % cfg.trainer.eval.every == 0:
                record["eval"] = self.evaluate()
            history.append(log.log(step, record))
            if cfg.trainer.ckpt_every and step % cfg.trainer.ckpt_every == 0:
                self.checkpoint(f"step_{step}")
            progress.update(1)
            progress.set_postfix(reward=f"{record['reward_mean']:.3f}", stale=f"{record['staleness_mean']:.2f}")
        for g in roles.generators:
            g.stop.remote()
        ray.get(roles.buffer.close.remote())
        ray.get(runs)
        return history

    def step_record(self, batch: list, stats: dict, timing: dict) -> dict:
        rewards = [r for m, _ in batch for r in m["rewards"] if r is not None]
        staleness = [self.version - 1 - m["min_version"] for m, _ in batch]
        gen = self.generator_stats()
        gen_tokens, self._gen_tokens = gen["gen_tokens"] - self._gen_tokens, gen["gen_tokens"]
        return {
            "reward_mean": float(np.mean(rewards)), "staleness_mean": float(np.mean(staleness)),
            "staleness_max": max(staleness), "samples": len(rewards), **timing,
            "infra_failures": sum(m["infra_failures"] for m, _ in batch),   # samples kept out of the loss
            "samples_per_s": len(rewards) / timing["step_s"],
            "learner_tokens_per_s": stats["loss_tokens"] / timing["learner_step_s"],
            "rollout_tokens_per_s": gen_tokens / timing["step_s"],
            **{f"learner/{k}": v for k, v in stats.items()},
            **{f"buffer/{k}": v for k, v in ray.get(self.roles.buffer.stats.remote()).items()},
        }

    def generator_stats(self) -> dict:
        stats = ray.get([g.stats.remote() for g in self.roles.generators])
        return {k: sum(s[k] for s in stats) for k in ("gen_tokens", "gen_busy_s", "env_s", "infra_failures")}

    def checkpoint(self, name: str) -> str:
        path = os.path.join(expand(self.cfg.run.dir), "checkpoints", name)
        self.roles.learner.save(path)
        load_tokenizer(self.model_path).save_pretrained(path)
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"version": self.version, "config": to_dict(self.cfg)}, f, indent=2)
        return path


def archive_previous_run(run_dir: str) -> None:
    """A run directory that already holds a run is moved aside (never overwritten or mixed)."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(run_dir)))
        target = f"{run_dir}.{stamp}"
        os.rename(run_dir, target)
        print(f"run.dir {run_dir} held an earlier run: moved it to {target}")


def run(cfg) -> dict:
    """SFT warm start, evaluation, asynchronous GRPO, evaluation; returns the summary."""
    from tqdm import tqdm

    run_dir = expand(cfg.run.dir)
    archive_previous_run(run_dir)
    init_ray(cfg.run)
    log = MetricsLogger(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    model_path = resolve_model_path(cfg.model)
    start = time.time()
    roles = spawn(cfg, model_path)
    try:
        trainer = Trainer(cfg, roles, model_path)
        eval_init = trainer.evaluate()
        with tqdm(total=cfg.trainer.sft.steps, desc="sft", disable=not cfg.run.progress) as progress:
            trainer.warm_start(log, progress)
        eval_before = trainer.evaluate()
        with tqdm(total=cfg.trainer.total_steps, desc="grpo", disable=not cfg.run.progress) as progress:
            history = trainer.train_rl(log, progress)
        eval_after = trainer.evaluate()
        checkpoint = trainer.checkpoint("final")
    finally:
        roles.shutdown()
        log.close()
    summary = {
        "eval_init": eval_init, "eval_before": eval_before, "eval_after": eval_after,
        "eval_gain": eval_after - eval_before, "steps": cfg.trainer.total_steps,
        "reward_first": history[0]["reward_mean"] if history else None,
        "reward_last": history[-1]["reward_mean"] if history else None,
        **throughput(history),
        "wall_s": time.time() - start, "checkpoint": checkpoint, "model": model_path,
    }
    log.summary(summary)
    return summary


def throughput(history: list[dict]) -> dict:
    """Trained samples per second, learner busy fraction and staleness over the RL steps.

    The first step is left out: it includes the generators' start-up.
    """
    steady = history[1:] or history
    if not steady:
        return {"samples_per_s": 0.0, "learner_busy": 0.0, "staleness_mean": 0.0}
    wall = sum(h["step_s"] for h in steady)
    return {"samples_per_s": sum(h["samples"] for h in steady) / wall,
            "learner_busy": sum(h["learner_step_s"] for h in steady) / wall,
            "staleness_mean": float(np.mean([h["staleness_mean"] for h in steady]))}


def print_summary(summary: dict) -> None:
    rows = [("held-out accuracy, initial model", summary["eval_init"]),
            ("held-out accuracy, before RL (after SFT)", summary["eval_before"]),
            ("held-out accuracy, after RL", summary["eval_after"]),
            ("gain from RL", summary["eval_gain"]),
            ("train reward, first -> last step", f"{summary['reward_first']:.3f} -> {summary['reward_last']:.3f}"
             if summary["reward_first"] is not None else "-"),
            ("trained samples / s", summary["samples_per_s"]),
            ("wall time, s", summary["wall_s"])]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value:.3f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    print(f"checkpoint: {summary['checkpoint']}")
