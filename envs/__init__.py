"""Task environments. `make_env(task_cfg, seed)` returns the environment named by `task_cfg.name`."""

from __future__ import annotations

from envs.base import Env, Task


def make_env(task_cfg, seed: int = 0, pool=None) -> Env:
    """`pool`: the sandboxes (a SandboxPool, its Ray actor handle or a SandboxRouter) for the
    environments that run code; those given none start a local pool of their own.
    Several names separated by commas make a mixture (envs.mix.MixedEnv) sharing the pool."""
    if "," in task_cfg.name:
        import copy

        from envs.mix import MixedEnv
        from envs.pools import task_domains
        envs = {}
        for name in task_domains(task_cfg):
            sub = copy.copy(task_cfg)
            sub.name = name
            envs[name] = make_env(sub, seed, pool)
        return MixedEnv(envs, seed=seed)
    if task_cfg.name == "arith":
        from envs.arith import ArithEnv
        return ArithEnv(task_cfg, seed)
    if task_cfg.name == "code":
        from envs.code import CodeEnv
        return CodeEnv(task_cfg, seed, pool=pool)
    if task_cfg.name == "terminal":
        from envs.terminal import TerminalEnv
        return TerminalEnv(task_cfg, seed, pool=pool)
    if task_cfg.name == "websearch":
        from envs.websearch import WebSearchEnv
        return WebSearchEnv(task_cfg, seed)
    if task_cfg.name == "math":
        from envs.math import MathEnv
        return MathEnv(task_cfg, seed)
    if task_cfg.name == "general":
        from envs.general import GeneralEnv
        return GeneralEnv(task_cfg, seed)
    if task_cfg.name == "webcoding":
        from envs.webcoding import WebCodingEnv
        return WebCodingEnv(task_cfg, seed)
    if task_cfg.name == "swe":
        from envs.swe import make_swe_env
        return make_swe_env(task_cfg, seed, pool=pool)
    raise ValueError(f"task.name={task_cfg.name!r}: no such environment (known: {', '.join(DOMAINS)})")


DOMAINS = ("arith", "code", "terminal", "websearch", "math", "general", "webcoding", "swe")


__all__ = ["Env", "Task", "make_env"]
