"""Typed configs for every role. Importable without torch or Ray.

`load(yaml_path, argv)` merges the dataclass defaults, the recipe's YAML and `key.sub=value`
overrides; an unknown key or an ill-typed value raises `ConfigError` naming the key, before any
actor starts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    dir: str = "runs/grpo"            # run directory: metrics.jsonl, summary.json, checkpoints
    seed: int = 0
    ray_num_cpus: int = 8             # logical CPUs of a local Ray instance (ignored on a cluster)
    torch_threads: int = 1            # intra-op threads per actor; the roles share the cores
    progress: bool = True


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
    swe_source: str = "generated"     # swe: generated (small repos made per task) | sample_repo (mutations) | a JSONL path
    swe_difficulty: int = 1           # swe: generated tasks; 0 = tiny mode (see envs/swe)


@dataclass
class RolloutConfig:
    engine: str = "torch"
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


@dataclass
class RewardConfig:
    num_graders: int = 1


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
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class SFTConfig:
    steps: int = 0                    # warm-start steps on oracle demonstrations (0 = none)
    lr: float = 3e-3
    batch_size: int = 64


@dataclass
class EvalConfig:
    every: int = 0                    # evaluate every N RL steps (0 = only before and after)
    temperature: float = 0.0          # 0 = greedy
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
    rl_weight: float = 0.0            # weight of the environment-reward advantage added to the teacher's
    teacher_cpus: float = 0.25        # Ray CPUs reserved per teacher
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
    "rollout.engine": ("torch",),
    "rollout.scaffold": ("none", "xml", "json"),
    "learner.backend": ("auto", "gloo", "nccl"),
    "learner.loss.aggregation": ("token_mean", "seq_mean", "constant"),
    "learner.loss.advantage": ("grpo", "dr_grpo"),
    "learner.loss.off_policy": ("none", "decoupled", "tis", "icepop"),
    "learner.loss.ratio_level": ("token", "sequence", "turn"),
    "learner.loss.mcla.side": ("engine", "learner", "both"),
    "replay.resampling": ("none", "history"),
}
_MINIMUM = {  # key: smallest allowed value
    "rollout.num_generators": 1, "rollout.group_size": 1, "rollout.max_new_tokens": 1,
    "rollout.temperature": 0.0, "rollout.max_batch": 1, "reward.num_graders": 1,
    "replay.max_staleness": 0, "replay.capacity": 1, "learner.num_workers": 1,
    "learner.micro_batch_tokens": 1, "trainer.total_steps": 0, "trainer.groups_per_step": 1,
    "trainer.sft.steps": 0, "trainer.sft.batch_size": 1, "trainer.lr": 0.0, "task.eval_size": 1,
    "rollout.max_turns": 1, "rollout.max_episode_tokens": 1, "distill.steps": 0, "distill.lr": 0.0,
    "unify.base_sft_steps": 0,
    "replay.prompts": 0, "learner.loss.mcla.k": 0, "model.tiny.router_noise": 0.0, "srpo.eval_every": 0,
    "model.tiny.num_experts": 1, "model.tiny.experts_per_token": 1, "model.tiny.expert_size": 1,
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


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


def validate(cfg) -> None:
    _check_domains("task.name", [n.strip() for n in cfg.task.name.split(",") if n.strip()])
    _validate_schedule(cfg)
    if hasattr(cfg, "unify"):
        _check_domains("unify.domains", list(cfg.unify.domains))
        for name in cfg.unify.experts:
            _check_domains("unify.experts", [name])
    for key, choices in _CHOICES.items():
        try:
            value = _get(cfg, key)
        except AttributeError:
            continue
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    for key, low in _MINIMUM.items():
        try:
            value = _get(cfg, key)
        except AttributeError:
            continue
        if value < low:
            raise ConfigError(f"{key}={value!r} must be >= {low}")
    try:
        zero = _get(cfg, "learner.zero_stage")
        if zero not in (0, 1, 2, 3):
            raise ConfigError(f"learner.zero_stage={zero!r} must be 0, 1, 2 or 3")
        top_p = _get(cfg, "rollout.top_p")
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(f"rollout.top_p={top_p!r} must be in (0, 1]")
    except AttributeError:
        pass


_MISSING = object()


def load_recipe(schema: type, yaml_path: str | list[str], argv: list[str]):
    """`load` for a recipe's main(): a bad config prints its cause and exits with status 2."""
    try:
        return load(schema, yaml_path, argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


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
            key, parsed = arg.split("=", 1)[0], OmegaConf.from_dotlist([arg])
            if any(part.isdigit() for part in key.split(".")):
                in_lists.append((key, parsed))
            else:
                layers.append(parsed)
        merged = OmegaConf.merge(base, *layers)
        for key, parsed in in_lists:
            if OmegaConf.select(merged, key, default=_MISSING) is _MISSING:
                raise ConfigError(f"config key {key!r}: no such key or list element")
            OmegaConf.update(merged, key, OmegaConf.select(parsed, key), merge=True)
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        reason = str(err).splitlines()[0]
        where = f" (in {yaml_path})" if yaml_path else ""
        raise ConfigError(f"config key {key!r}: {reason}{where}") from None
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
