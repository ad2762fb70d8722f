"""The driver: wires the roles and runs the asynchronous GRPO loop.

Generators roll out continuously, graders score, the buffer paces both and hands fresh groups to
the learner, the learner publishes each new version through the object store. Synchronous
training is this same loop with `replay.max_staleness=0`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, replace

import msgpack
import numpy as np
import ray

from envs.pools import node_pools
from rayrl.algo.distill import domain_reverse_kl
from rayrl.algo.mismatch import check_served_versions
from rayrl.algo.resampling import curate, effective_fraction
from rayrl.algo.schedule import lr_at
from rayrl.config import ConfigError, check_paths, check_resume, checkpoint_state, expand, role_demands, to_dict
from rayrl.learner.group import LearnerGroup
from rayrl.metrics import MetricsLogger
from rayrl.models import load_tokenizer, resolve_model_path
from rayrl.replay.buffer import ReplayBuffer
from rayrl.replay.prompts import domains_left_empty, prompt_key
from rayrl.reward.grader import RewardGrader
from rayrl.rollout.generator import RolloutGenerator
from rayrl.tree import decode, encode


def init_ray(run_cfg) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local instance. Either way every worker
    process of the job runs rayrl.worker_setup first (merged with a submitted job's runtime env)."""
    if ray.is_initialized():
        return
    env = {"worker_process_setup_hook": "rayrl.worker_setup.setup_worker"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=env)
    else:
        ray.init(address="local", num_cpus=run_cfg.ray_num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env=env)


def kill_closed(actors: list) -> None:
    """Kill generators or graders once they have closed their environments (browsers, sandbox
    pools of their own: a kill alone leaves a pool's background task to die mid-await). Bounded:
    after a failure an actor may be dead or stuck, and it is killed regardless."""
    closing = [actor.close.remote() for actor in actors]
    ray.wait(closing, num_returns=len(closing), timeout=30)
    for actor in actors:
        ray.kill(actor)


@dataclass
class Roles:
    generators: list
    graders: list
    buffer: object
    learner: LearnerGroup
    sandboxes: object = None   # the sandbox nodes' pools (a SandboxRouter), with config sandbox.node_resource

    def shutdown(self) -> None:
        self.learner.shutdown()
        kill_closed([*self.generators, *self.graders])
        ray.kill(self.buffer)
        if self.sandboxes is not None:
            self.sandboxes.shutdown()
            for pool in self.sandboxes.pools:
                ray.kill(pool)


def role_options(num_cpus: float, num_gpus: float = 0.0, resources: dict | None = None) -> dict:
    """Ray actor options reserving a role's CPUs, GPUs and custom resources (its config's num_cpus,
    num_gpus and resources: custom resources put a role on the nodes that offer them)."""
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources or {})}


def check_resources(cfg, copies: int = 1, copies_key: str = "") -> None:
    """Some alive node must be able to hold one actor of each role (its CPUs, GPUs and custom
    resources), and sandbox.node_resource must mark a node. In a local Ray instance a shortfall is
    an error naming the config keys; on a cluster (RAY_ADDRESS) the actors wait for nodes that fit
    them (an autoscaler adds them), and the wait is announced. `copies`: that many runs' roles at
    once (as the config key `copies_key` asks)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    demands = role_demands(cfg)
    missing = [f"{', '.join(f'{name} {v:g}' for name, v in need.items())} per actor ({keys})"
               for keys, _, need in demands
               if not any(all(node.get(name, 0) >= v for name, v in need.items()) for node in nodes)]
    marker = cfg.sandbox.node_resource
    if marker and not any(node.get(marker, 0) > 0 for node in nodes):
        missing.append(f"sandbox.node_resource: {marker}")
    # All the roles at once, too (the learner waits for a placement group of all its workers).
    for name in sorted({name for _, _, need in demands for name in need}):
        wanted = copies * sum(count * need.get(name, 0) for _, count, need in demands)
        total = sum(node.get(name, 0) for node in nodes)
        if wanted > total:
            runs = f" of {copies} runs ({copies_key}={copies})" if copies > 1 else ""
            missing.append(f"{name} {wanted:g} for all the roles{runs} at once, of {total:g} in all")
    if not missing:
        return
    message = f"no node of this Ray cluster can hold {'; '.join(missing)}"
    if not os.environ.get("RAY_ADDRESS"):
        offered = {name: v for name, v in (nodes[0] if nodes else {}).items()
                   if name not in ("memory", "object_store_memory") and not name.startswith("node:")}
        raise ConfigError(f"{message}. This local Ray instance offers {offered}: lower these settings, "
                          "or run on a cluster whose nodes offer them")
    print(f"{message} yet: these roles wait until such nodes join", flush=True)


def spawn(cfg, model_path: str) -> Roles:
    """The roles, each placed by its config's Ray resources (see `role_options`); on a cluster
    they spread over the nodes that offer those resources."""
    check_resources(cfg)
    threads = cfg.run.torch_threads
    sandboxes = node_pools(cfg.task, cfg.sandbox.node_resource, cfg.sandbox.max_per_node) \
        if cfg.sandbox.node_resource else None
    generators = [ray.remote(RolloutGenerator)
                  .options(**role_options(cfg.rollout.num_cpus, cfg.rollout.num_gpus, cfg.rollout.resources),
                           max_concurrency=1000)
                  .remote(model_path, cfg.rollout, cfg.task, cfg.run.seed * 1000 + i, threads, cfg.learner.loss.mcla,
                          sandbox_pool=sandboxes)
                  for i in range(cfg.rollout.num_generators)]
    graders = [ray.remote(RewardGrader).options(**role_options(cfg.reward.num_cpus, 0.0, cfg.reward.resources))
               .remote(cfg.task, model_path, cfg.learner.loss.advantage, sandbox_pool=sandboxes)
               for _ in range(cfg.reward.num_graders)]
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0, max_concurrency=1000).remote(
        cfg.trainer.groups_per_step, cfg.replay.max_staleness, cfg.replay.filter_zero_variance, cfg.replay.capacity,
        seed=cfg.run.seed)
    learner = LearnerGroup(model_path, cfg.learner, cfg.trainer.lr, cfg.rollout.temperature, cfg.run.seed, threads)
    return Roles(generators, graders, buffer, learner, sandboxes)


def sft_batches(generators: list, batch_size: int, steps: int, seed: int, start: int = 0):
    """Oracle demonstrations from the generators (which own the environments and their tools),
    one batch per step from step `start` on (a resumed SFT gets the batches it had not trained
    on), the next batch made while the learner trains on the current one."""
    def request(i: int):
        return generators[i % len(generators)].demonstrations.remote(batch_size, seed + i)

    refs = [request(i) for i in range(start, min(start + 2, steps))]
    for step in range(start, steps):
        batch = ray.get(refs.pop(0))
        if step + 2 < steps:
            refs.append(request(step + 2))
        yield batch


class EvaluationError(RuntimeError):
    """A domain has no held-out score: the infrastructure failed under every one of its episodes."""


def sample_rewards(gens: list, tasks: list[dict], samples: int, temperature: float) -> list[list[float | str]]:
    """`samples` rewards per task under the generators' current weights (a str where the
    infrastructure failed under the episode: why), the episodes spread over the generators."""
    episodes = [i for i in range(len(tasks)) for _ in range(samples)]
    shards = [episodes[g::len(gens)] for g in range(len(gens))]
    values = ray.get([g.evaluate.remote([tasks[i] for i in shard], temperature) for g, shard in zip(gens, shards)])
    out: list[list[float | str]] = [[] for _ in tasks]
    for shard, shard_values in zip(shards, values):
        for i, value in zip(shard, shard_values):
            out[i].append(value)
    return out


def evaluate_domains(gens: list, tasks: list[dict], eval_cfg) -> dict[str, float]:
    """Held-out score per domain: the mean reward of `eval_cfg.samples` samples per task, spread
    over the generators. Episodes the infrastructure failed under are left out; a domain left
    with none raises EvaluationError (a score from nothing would bias every mean it enters)."""
    if not tasks:
        raise EvaluationError("no held-out task to evaluate on (the environment's held-out set is empty)")
    by_domain: dict[str, list[float]] = {}
    failures: dict[str, list[str]] = {}
    for task, values in zip(tasks, sample_rewards(gens, tasks, eval_cfg.samples, eval_cfg.temperature)):
        for value in values:
            target = failures if isinstance(value, str) else by_domain
            target.setdefault(task["domain"], []).append(value)
    unscored = sorted(set(failures) - set(by_domain))
    if unscored:
        raise EvaluationError("; ".join(
            f"the infrastructure failed under all {len(failures[d])} held-out episodes of domain {d} "
            f"(first: {failures[d][0]})" for d in unscored))
    return {d: float(np.mean(v)) for d, v in sorted(by_domain.items())}


class StepGuard:
    """SIGINT (Ctrl-C) and SIGTERM (`ray job stop`) as KeyboardInterrupt in the driver, held back
    inside `step()`: a learner update, its record and its checkpoint happen together or not at
    all, so the run can be saved on the way out (`Trainer.save_on_failure`). A second signal while
    one is held stops at once. Off the main thread, where Python takes no signals, it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.holding, self.pending, self.previous = False, None, {}
        self.received = None   # the last signal's name

    def __enter__(self) -> StepGuard:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        name = self.received = signal.Signals(signum).name
        if self.holding and self.pending is None:
            self.pending = name
            print(f"{name}: finishing this step, then saving a checkpoint ({name} again stops at once)", flush=True)
            return
        raise KeyboardInterrupt(name)

    @contextlib.contextmanager
    def step(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise KeyboardInterrupt(self.pending)


class Trainer:
    def __init__(self, cfg, roles: Roles, model_path: str):
        self.cfg, self.roles, self.model_path = cfg, roles, model_path
        self.version = 0
        self.step = 0       # RL steps done (what a checkpoint records)
        self.sft_step = 0   # SFT updates done, likewise
        self.whole = True   # the learner's state is that of the last step counted (see `guarded`)
        self.evals: dict = {}   # the run's evaluations before RL, kept with checkpoints for the summary
        self.batch_request = None   # the learner's request to the buffer while it waits for a batch
        self.curation: dict | None = None   # what curate_prompts kept and dropped
        self.eval_tasks = ray.get(roles.generators[0].eval_tasks.remote(cfg.task.eval_size))
        self.train_tasks: list[dict] = []
        if cfg.replay.prompts:   # a finite training set, handed out by the buffer (epochs, History Resampling)
            self.train_tasks = ray.get(roles.generators[0].train_tasks.remote(cfg.replay.prompts, cfg.run.seed))
            ray.get(roles.buffer.set_prompts.remote(self.train_tasks, cfg.replay.resampling,
                                                    cfg.replay.success_reward, cfg.run.seed,
                                                    cfg.replay.resampling_floor))

    def publish(self) -> None:
        ref = self.roles.learner.publish()
        # Each generator swaps the weights in between engine calls and reports the version it serves.
        check_served_versions(ray.get([g.update_weights.remote(self.version, [ref]) for g in self.roles.generators]),
                              self.version)
        ray.get(self.roles.buffer.set_version.remote(self.version))

    def evaluate_domains(self) -> dict[str, float]:
        return evaluate_domains(self.roles.generators, self.eval_tasks, self.cfg.trainer.eval)

    def evaluate(self) -> float:
        """Mean held-out score over the domains."""
        return float(np.mean(list(self.evaluate_domains().values())))

    def curate_prompts(self) -> dict:
        """The offline difficulty filter (replay.curate_samples, curate_drop, curate_min_pass):
        samples every training prompt with the current weights and narrows the buffer's set to the
        prompts kept. Returns the counts (also kept as `self.curation`, and with checkpoints)."""
        from tqdm import tqdm

        replay, tasks = self.cfg.replay, self.train_tasks
        unsolved = f"pass rate <= {replay.curate_min_pass}"
        print(f"curating {len(tasks)} training prompts: {replay.curate_samples} samples each at temperature "
              f"{self.cfg.rollout.temperature}, dropping the {replay.curate_drop} ones"
              + (f" (unsolved: {unsolved})" if replay.curate_drop != "solved" else ""), flush=True)
        # In chunks, for progress on a large set; each chunk still fills every generator's engine batches.
        gens = self.roles.generators
        chunk = max(1, -(-4 * len(gens) * self.cfg.rollout.max_batch // replay.curate_samples))
        samples = []
        with tqdm(total=len(tasks), desc="curation", unit="prompt", disable=not self.cfg.run.progress) as bar:
            for i in range(0, len(tasks), chunk):
                samples += sample_rewards(gens, tasks[i:i + chunk], replay.curate_samples, self.cfg.rollout.temperature)
                bar.update(len(tasks[i:i + chunk]))
        keys = [prompt_key(t["domain"], t["id"]) for t in tasks]
        kept, counts = curate({k: [None if isinstance(r, str) else r for r in rs] for k, rs in zip(keys, samples)},
                              replay.curate_drop, replay.success_reward, replay.curate_min_pass)
        emptied = domains_left_empty({k: t["domain"] for k, t in zip(keys, tasks)}, kept)
        if emptied:
            raise ValueError(f"replay.curate_samples: curation leaves no training prompt of domain "
                             f"{', '.join(emptied)} ({counts['dropped_unsolved']} unsolved at {unsolved}, "
                             f"{counts['dropped_solved']} solved in all); lower replay.curate_min_pass, change "
                             "replay.curate_drop, or curate from a better starting policy")
        ray.get(self.roles.buffer.keep_prompts.remote(kept))
        self.curation = counts
        print(f"curated: kept {counts['kept']} prompts ({counts['kept_ungraded']} without a graded sample), dropped "
              f"{counts['dropped_unsolved']} unsolved and {counts['dropped_solved']} solved", flush=True)
        return counts

    def monitor_evaluation(self, step: int) -> dict:
        """A held-out score during training, {"eval": mean, "eval/<domain>": score, ...}. It only
        monitors the run, so one that the infrastructure failed is printed and logged as
        {"eval_error": why}, and training goes on."""
        try:
            scores = self.evaluate_domains()
            return {"eval": float(np.mean(list(scores.values()))), **{f"eval/{d}": v for d, v in scores.items()}}
        except EvaluationError as err:
            print(f"step {step}: held-out evaluation failed, training goes on: {err}", flush=True)
            return {"eval_error": str(err)}

    def next_batch(self, runs: list) -> list:
        """Wait for a fresh batch; a generator that died raises here instead of hanging the run,
        and a long wait says what the buffer has seen (e.g. every group dropped for zero variance)."""
        start = notice = time.monotonic()
        while True:
            # Kept until answered: a stop that cuts the wait short gives its groups back (save_on_failure).
            self.batch_request = self.roles.buffer.get.remote(self.cfg.trainer.groups_per_step, self.version)
            batch = ray.get(self.batch_request)
            self.batch_request = None
            if batch is not None:
                return batch
            if time.monotonic() - notice > 60:
                notice = time.monotonic()
                stats = ray.get(self.roles.buffer.stats.remote())
                print(f"still waiting for {self.cfg.trainer.groups_per_step} groups after {notice - start:.0f} s; "
                      f"buffer: {stats}", flush=True)
                if stats["received"] and stats.get("dropped_zero_variance") == stats["received"]:
                    print(f"every one of the {stats['received']} groups so far had equal rewards (all 0 or all 1) "
                          "and was dropped (replay.filter_zero_variance=true): is the model untrained "
                          "(trainer.sft.steps=0), or the task all too hard or too easy for it?", flush=True)
            done, _ = ray.wait(runs, timeout=0)
            if done:
                ray.get(done)
                raise RuntimeError("a rollout generator stopped unexpectedly")

    @contextlib.contextmanager
    def guarded(self, phase: str | None):
        """The body under a StepGuard (yielded, for its steps); on the way out by any exception the
        last whole step is saved (save_on_failure) before the exception goes on. A step marks
        itself part way with `self.whole = False`. `phase`: "rl" saves checkpoints/step_<N>,
        "sft" checkpoints/sft_<N>, None nothing (a phase no recipe resumes)."""
        self.whole = True
        with StepGuard() as guard:
            try:
                yield guard
            except BaseException as err:
                self.save_on_failure(err, phase)
                raise

    def warm_start(self, log: MetricsLogger, progress, steps: int | None = None, batches=None, start: int = 0,
                   phase: str | None = "sft") -> list[dict]:
        """SFT on oracle demonstrations (or on given `batches`), updates `start` + 1 .. `steps`
        (`start` > 0: a resumed SFT); publishes the result as a new version; returns the logged
        steps. A stop or failure saves the last whole update as `phase` (see `guarded`)."""
        sft = self.cfg.trainer.sft
        steps = sft.steps if steps is None else steps
        batches = batches or sft_batches(self.roles.generators, sft.batch_size, steps, self.cfg.run.seed * 7919 + 1,
                                         start)
        history = []
        with self.guarded(phase) as guard:
            for step, batch in enumerate(batches, start + 1):
                with guard.step():
                    self.whole = False
                    lr = lr_at(step, steps, sft.lr, sft.schedule, sft.warmup_steps, sft.final_lr_ratio)
                    stats = self.roles.learner.train_step(batch, "sft", lr)
                    history.append(log.log(-steps + step, {"phase": "sft", "sft_nll": stats["nll"], "lr": lr}))
                    self.sft_step, self.whole = step, True
                progress.update(1)
                progress.set_postfix(nll=f"{stats['nll']:.3f}")
            self.version += 1
            self.publish()
        return history

    def train_rl(self, log: MetricsLogger, progress, steps: int | None = None, lr: float | None = None,
                 teachers: dict | None = None, rl_weight: float = 0.0, on_step=None, start: int = 0) -> list[dict]:
        """The asynchronous loop, steps `start` + 1 .. `steps` (`start` > 0: a resumed run). With
        replay.max_staleness=0 the buffer makes it synchronous, and with run.deterministic too the
        groups' samples do not depend on timing.
        With `teachers` ({domain: Teacher actor}) it is on-policy distillation: the teachers score
        the student's samples and the learner's advantages come from them. `on_step(step, record)`,
        if given, runs after each step (it may add to the record before it is logged, e.g. switch
        a schedule's stage) and ends the loop early by returning True."""
        cfg, roles = self.cfg, self.roles
        steps = cfg.trainer.total_steps if steps is None else steps
        lr, kind = cfg.trainer.lr if lr is None else lr, "distill" if teachers else "rl"
        if cfg.replay.curate_samples and self.curation is None:   # before a generator takes a prompt
            with self.guarded("rl"):   # a stop in it saves step_<start>; resumed, it curates anew
                self.curate_prompts()
        # Enough episodes in flight to fill every step the staleness bound lets generators run ahead.
        concurrency = -(-cfg.trainer.groups_per_step * (cfg.replay.max_staleness + 1) // len(roles.generators))
        runs = [g.run.remote(roles.buffer, roles.graders, concurrency, teachers, seeded=cfg.run.deterministic)
                for g in roles.generators]
        history, self._gen_tokens = [], self.generator_stats()["gen_tokens"]
        with self.guarded("rl") as guard:
            for step in range(start + 1, steps + 1):
                tick = time.perf_counter()
                batch = self.next_batch(runs)                  # fresh groups, each handed out once
                got = time.perf_counter()
                with guard.step():
                    self.whole = False
                    stats = roles.learner.train_step(batch, kind, lr, rl_weight, version=self.version,
                                                     max_mismatch_kl=cfg.rollout.max_mismatch_kl,   # weight-sync
                                                     mismatch_check_tokens=cfg.rollout.mismatch_check_tokens)
                    learned = time.perf_counter()
                    self.version += 1
                    self.publish()                             # generators swap it in between episodes
                    timing = {"wait_s": got - tick, "learner_step_s": learned - got,
                              "step_s": time.perf_counter() - tick}
                    record = self.step_record(batch, stats, timing)
                    if cfg.trainer.eval.every and step % cfg.trainer.eval.every == 0:
                        record.update(self.monitor_evaluation(step))
                    stop = bool(on_step and on_step(step, record))
                    history.append(log.log(step, record))
                    self.step, self.whole = step, True
                    if cfg.trainer.ckpt_every and step % cfg.trainer.ckpt_every == 0:
                        self.checkpoint(f"step_{step}")
                progress.update(1)
                progress.set_postfix(reward=f"{record['reward_mean']:.3f}",
                                     stale=f"{record['staleness_mean']:.2f}")
                if stop:
                    break
        for g in roles.generators:
            g.stop.remote()
        ray.get(roles.buffer.close.remote())
        ray.get(runs)
        return history

    def save_on_failure(self, err: BaseException, phase: str | None) -> None:
        """On the way out of a failed or interrupted phase, checkpoint its last whole step (see
        `guarded`), unless a learner step was part way: its state is then not a step's."""
        why = f"{type(err).__name__}{': ' + str(err) if str(err) else ''}"
        if phase is None:
            print(f"stopped ({why}): this phase is not saved", flush=True)
            return
        done, label, prefix = (self.sft_step, "SFT step", "sft") if phase == "sft" else (self.step, "step", "step")
        if not self.whole:
            print(f"stopped in the middle of {label} {done + 1} ({why}): no checkpoint saved, the learner's "
                  "state may be part way through an update", flush=True)
            return
        run_dir = expand(self.cfg.run.dir)
        path = os.path.join(run_dir, "checkpoints", f"{prefix}_{done}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            print(f"stopped after {label} {done} ({why}); its checkpoint is {path}", flush=True)
            return
        print(f"stopped after {label} {done} ({why}): saving {path}", flush=True)
        try:
            if self.batch_request is not None:   # the buffer may yet hand out a batch no step will train on
                batch, self.batch_request = ray.get(self.batch_request), None
                if batch:
                    ray.get(self.roles.buffer.give_back.remote(batch, self.version))
            self.checkpoint(os.path.basename(path))
        except BaseException as save_err:   # a second Ctrl-C, or the failure took a role with it
            print(f"could not save it: {type(save_err).__name__}: {save_err}", flush=True)
            return
        print(f"saved; `run.resume={run_dir}` continues it (grpo, train_expert; unify_distill resumes its own run "
              "directory)", flush=True)

    def step_record(self, batch: list, stats: dict, timing: dict) -> dict:
        rewards = [r for m, _ in batch for r in m["rewards"] if r is not None]
        staleness = [self.version - 1 - m["min_version"] for m, _ in batch]
        gen = self.generator_stats()
        gen_tokens, self._gen_tokens = gen["gen_tokens"] - self._gen_tokens, gen["gen_tokens"]
        return {
            **domain_stats([m for m, _ in batch]),
            "reward_mean": float(np.mean(rewards)), "staleness_mean": float(np.mean(staleness)),
            # share of the trained samples with a non-zero GRPO advantage (rayrl.algo.resampling)
            "effective_ratio": effective_fraction(m["rewards"] for m, _ in batch),
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
        """Everything a run needs to continue exactly (`restore`): HF weights and tokenizer, the
        learner's DeepSpeed state (optimizer partitions, RNG states), the generators' random
        streams, the buffer's record, tickets and held groups, and, written last so that only a
        complete checkpoint has it, trainer_state.json (step, version, config, evaluations)."""
        run_dir = expand(self.cfg.run.dir)
        path = os.path.join(run_dir, "checkpoints", name)
        state_path = os.path.join(path, "trainer_state.json")
        if os.path.exists(state_path):   # rewritten: not a checkpoint until complete again
            os.remove(state_path)
        self.roles.learner.save(path)
        load_tokenizer(self.model_path).save_pretrained(path)
        snapshot = ray.get(self.roles.buffer.snapshot.remote())
        with open(os.path.join(path, "replay_state.json"), "w") as f:   # History Resampling's record, epochs, tickets
            json.dump(snapshot["state"], f)
        save_held(os.path.join(path, "replay_held.msgpack"), snapshot["held"])
        state = {"step": self.step, "sft_step": self.sft_step, "version": self.version, "evals": self.evals,
                 "curation": self.curation,
                 "generators": ray.get([g.rng_state.remote() for g in self.roles.generators]),
                 "metrics_lines": len(metrics_lines(run_dir)), "config": to_dict(self.cfg)}
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f, indent=2)
        os.replace(state_path + ".tmp", state_path)
        return path

    def restore(self, path: str) -> dict:
        """Continue from checkpoint `path` of a run with this config: the learner's weights,
        optimizer and RNG states, the generators' random streams, the buffer's record, tickets
        and held groups, the step, the version (whose weights it publishes) and the evaluations.
        Returns the checkpoint's trainer state."""
        state = checkpoint_state(path)
        self.roles.learner.load_state(path)
        ray.get([g.set_rng_state.remote(s) for g, s in zip(self.roles.generators, state["generators"])])
        with open(os.path.join(path, "replay_state.json")) as f:
            ray.get(self.roles.buffer.load_state_dict.remote(json.load(f)))
        held = load_held(os.path.join(path, "replay_held.msgpack"))
        ray.get(self.roles.buffer.restore_held.remote([(meta, [ray.put(tree)]) for meta, tree in held]))
        self.step, self.version, self.evals = state["step"], state["version"], state["evals"]
        self.curation = state.get("curation")
        # Checkpoints from before SFT could be resumed were all written after it.
        self.sft_step = state.get("sft_step", self.cfg.trainer.sft.steps)
        self.publish()
        return state


def metrics_lines(run_dir: str) -> list[str]:
    """The lines of the run's metrics.jsonl (none before its first record)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.readlines()


def save_held(path: str, held: list) -> None:
    """The buffer's held groups, [(meta, [tree ref])], as one msgpack file of [meta, encoded tree]."""
    trees = ray.get([ref[0] for _, ref in held])
    with open(path, "wb") as f:
        f.write(msgpack.packb([[meta, bytes(encode(tree))] for (meta, _), tree in zip(held, trees)]))


def load_held(path: str) -> list[tuple[dict, object]]:
    with open(path, "rb") as f:
        return [(meta, decode(data)) for meta, data in msgpack.unpackb(f.read())]


def domain_stats(metas: list[dict]) -> dict:
    """Per-domain reward, sampled tokens and (for teacher-scored groups) reverse KL to the teacher;
    plus the batch's reverse KL. Empty for a single-domain batch without teachers."""
    domains = sorted({m["domain"] for m in metas})
    scored = [m for m in metas if m["teacher_tokens"]]
    if len(domains) < 2 and not scored:
        return {}
    out = {}
    for d in domains:
        mine = [m for m in metas if m["domain"] == d]
        rewards = [r for m in mine for r in m["rewards"] if r is not None]
        out[f"domain/{d}/reward"] = float(np.mean(rewards)) if rewards else float("nan")
        out[f"domain/{d}/tokens"] = sum(m["loss_tokens"] for m in mine)
    out.update({f"domain/{d}/reverse_kl": kl for d, kl in domain_reverse_kl(scored).items()})
    if scored:
        out["reverse_kl"] = sum(m["reverse_kl_sum"] for m in scored) / sum(m["teacher_tokens"] for m in scored)
    return out


def archive_previous_run(run_dir: str) -> str | None:
    """A run directory that already holds a run is moved aside (never overwritten or mixed);
    returns where it went."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(run_dir)))
        target = f"{run_dir}.{stamp}"
        os.rename(run_dir, target)
        print(f"run.dir {run_dir} held an earlier run: moved it to {target}")
        return target
    return None


def rewind_metrics(run_dir: str, keep: int) -> int:
    """Cut metrics.jsonl back to its first `keep` lines (what had been logged when the checkpoint a
    run resumes from was written); the records after them (steps whose effect the interruption
    lost, about to run again) go to the end of metrics.lost.jsonl. Returns how many moved."""
    lines = metrics_lines(run_dir)
    if len(lines) > keep:
        with open(os.path.join(run_dir, "metrics.lost.jsonl"), "a") as f:
            f.writelines(lines[keep:])
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(lines[:keep])
        print(f"resuming {run_dir}: {len(lines) - keep} records logged after the point it continues from "
              "moved to metrics.lost.jsonl")
    return len(lines) - keep


def start_run(cfg, keep_lines: int | None = None) -> tuple[str, MetricsLogger, str | None]:
    """A fresh run directory (an earlier run in it is moved aside), Ray, the metrics log and the
    config as run: (run dir, log, where the earlier run went). `keep_lines` (a resumed run): the
    directory stays, its metrics cut back to that many lines."""
    check_paths(cfg)
    run_dir = expand(cfg.run.dir)
    if cfg.run.resume and keep_lines is None:
        raise ValueError(f"run.resume={cfg.run.resume!r}, but this entry point does not resume runs")
    if keep_lines is not None:
        rewind_metrics(run_dir, keep_lines)
    moved = None if keep_lines is not None else archive_previous_run(run_dir)
    init_ray(cfg.run)
    log = MetricsLogger(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    return run_dir, log, moved


def run(cfg) -> dict:
    """SFT warm start, evaluation, asynchronous GRPO, evaluation; returns the summary. With
    run.resume, the run in that directory continues from its last checkpoint instead."""
    from tqdm import tqdm

    resume = check_resume(cfg)   # the checkpoint to continue from, or None
    if resume:
        cfg = replace(cfg, run=replace(cfg.run, dir=cfg.run.resume))
    run_dir, log, _ = start_run(cfg, checkpoint_state(resume)["metrics_lines"] if resume else None)
    # Resumed: the RL steps logged before the checkpoint, for the summary.
    history = [r for r in map(json.loads, metrics_lines(run_dir)) if r["step"] > 0]
    model_path = resolve_model_path(cfg.model)
    start = time.time()
    roles = spawn(cfg, model_path)
    try:
        trainer = Trainer(cfg, roles, model_path)
        if resume:
            trainer.restore(resume)
        else:
            trainer.evals["eval_init"] = trainer.evaluate() if cfg.trainer.eval.initial else None
        if not resume or trainer.sft_step < cfg.trainer.sft.steps:   # a fresh run, or one stopped in SFT
            with tqdm(total=cfg.trainer.sft.steps, initial=trainer.sft_step, desc="sft",
                      disable=not cfg.run.progress) as progress:
                trainer.warm_start(log, progress, start=trainer.sft_step)
        if "eval_before" not in trainer.evals:
            with trainer.guarded("sft"):
                trainer.evals["eval_before"] = trainer.evaluate()
        with tqdm(total=cfg.trainer.total_steps, initial=trainer.step, desc="grpo",
                  disable=not cfg.run.progress) as progress:
            history += trainer.train_rl(log, progress, start=trainer.step)
        checkpoint = trainer.checkpoint("final")   # before the evaluation, which may fail
        eval_after = trainer.evaluate()
    finally:
        roles.shutdown()
        log.close()
    eval_init, eval_before = trainer.evals["eval_init"], trainer.evals["eval_before"]
    summary = {
        "eval_init": eval_init, "eval_before": eval_before, "eval_after": eval_after,
        "eval_gain": eval_after - eval_before, "steps": cfg.trainer.total_steps,
        "reward_first": history[0]["reward_mean"] if history else None,
        "reward_last": history[-1]["reward_mean"] if history else None,
        **throughput(history),
        "wall_s": time.time() - start, "checkpoint": checkpoint, "model": model_path,
        **({"curation": trainer.curation} if trainer.curation else {}),
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
    rows = [("held-out accuracy, initial model", "-" if summary["eval_init"] is None else summary["eval_init"]),
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
