"""Typed configs for every role. Importable without torch or Ray.

`load(yaml_path, argv)` merges the dataclass defaults, the recipe's YAML and `key.sub=value`
overrides; an unknown key or an ill-typed value raises `ConfigError` naming the key, before any
actor starts.
"""

from __future__ import annotations

import os
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
    family: str = "llama"             # llama | qwen2
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256


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
    filter_zero_variance: bool = True  # drop groups whose rewards are all equal (no GRPO signal)
    capacity: int = 4096              # groups held at most


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


@dataclass
class LearnerConfig:
    num_workers: int = 2
    zero_stage: int = 2
    backend: str = "auto"             # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    micro_batch_tokens: int = 8192    # per-worker token budget of one forward/backward
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
    student_sft_steps: int = 40       # the student's warm start on mixed-domain demonstrations


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
class UnifyConfig(GRPOConfig):
    """Specialize-then-Unify: the GRPO sections configure each expert's training; `unify` and
    `distill` the student."""
    unify: UnifySpec = field(default_factory=UnifySpec)
    distill: DistillConfig = field(default_factory=DistillConfig)


DOMAIN_NAMES = ("arith", "code", "terminal", "websearch", "math", "general", "webcoding", "swe")
_CHOICES = {
    "model.tiny.family": ("llama", "qwen2"),
    "rollout.engine": ("torch",),
    "rollout.scaffold": ("none", "xml", "json"),
    "learner.backend": ("auto", "gloo", "nccl"),
    "learner.loss.aggregation": ("token_mean", "seq_mean", "constant"),
    "learner.loss.advantage": ("grpo", "dr_grpo"),
    "learner.loss.off_policy": ("none", "decoupled", "tis", "icepop"),
}
_MINIMUM = {  # key: smallest allowed value
    "rollout.num_generators": 1, "rollout.group_size": 1, "rollout.max_new_tokens": 1,
    "rollout.temperature": 0.0, "rollout.max_batch": 1, "reward.num_graders": 1,
    "replay.max_staleness": 0, "replay.capacity": 1, "learner.num_workers": 1,
    "learner.micro_batch_tokens": 1, "trainer.total_steps": 0, "trainer.groups_per_step": 1,
    "trainer.sft.steps": 0, "trainer.sft.batch_size": 1, "trainer.lr": 0.0, "task.eval_size": 1,
    "rollout.max_turns": 1, "rollout.max_episode_tokens": 1, "distill.steps": 0, "distill.lr": 0.0,
    "unify.student_sft_steps": 0,
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


def validate(cfg) -> None:
    _check_domains("task.name", [n.strip() for n in cfg.task.name.split(",") if n.strip()])
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


def load(schema: type, yaml_path: str | list[str] | None = None, argv: list[str] | None = None):
    """Defaults of `schema` <- YAML file(s), in order <- `key=value` overrides; returns the typed object."""
    base = OmegaConf.structured(schema)
    layers = []
    yaml_paths = [yaml_path] if isinstance(yaml_path, str) else list(yaml_path or [])
    yaml_path = ", ".join(yaml_paths)
    try:
        for path in yaml_paths:
            layers.append(OmegaConf.load(path))
        for arg in argv or []:
            if "=" not in arg:
                raise ConfigError(f"argument {arg!r} is not key=value (example: trainer.total_steps=20)")
            layers.append(OmegaConf.from_dotlist([arg]))
        merged = OmegaConf.merge(base, *layers)
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
