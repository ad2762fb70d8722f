"""Task environments. `make_env(task_cfg, seed)` returns the environment named by `task_cfg.name`."""

from __future__ import annotations

from envs.base import Env, Task


def make_env(task_cfg, seed: int = 0) -> Env:
    if task_cfg.name == "arith":
        from envs.arith import ArithEnv
        return ArithEnv(task_cfg, seed)
    raise ValueError(f"task.name={task_cfg.name!r}: no such environment (known: arith)")


__all__ = ["Env", "Task", "make_env"]
