"""The local sandbox pool of a process whose environments run code (terminal, swe, code)."""

from __future__ import annotations

SANDBOX_DOMAINS = ("terminal", "swe", "code")


def task_domains(task_cfg) -> list[str]:
    """The domains named by `task.name` (one, or several separated by commas)."""
    return [n.strip() for n in task_cfg.name.split(",") if n.strip()]


def local_pool(task_cfg, max_total: int = 8):
    """A SandboxPool with the default and SWE profiles, or None if no domain of `task_cfg` needs one."""
    if not set(task_domains(task_cfg)) & set(SANDBOX_DOMAINS):
        return None
    from envs.swe.runtime import swe_backend_options, swe_profile
    from rayrl.sandbox.base import Profile
    from rayrl.sandbox.pool import SandboxPool
    return SandboxPool([Profile(), swe_profile()], min_idle=0, max_total=max_total, export_metrics=False,
                       backend_options=swe_backend_options())
