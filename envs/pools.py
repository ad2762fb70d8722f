"""The local sandbox pool of a process whose environments run code (terminal, swe, code)."""

from __future__ import annotations

SANDBOX_DOMAINS = ("terminal", "swe", "code")


def task_domains(task_cfg) -> list[str]:
    """The domains named by `task.name` (one, or several separated by commas)."""
    return [n.strip() for n in task_cfg.name.split(",") if n.strip()]


def _pool_setup() -> dict:
    """The profiles and backend options every pool of the domains is made with."""
    from envs.swe.runtime import swe_backend_options, swe_profile
    from rayrl.sandbox.base import Profile
    return {"profiles": [Profile(), swe_profile()], "backend_options": swe_backend_options()}


def local_pool(task_cfg, max_total: int = 8):
    """A SandboxPool with the default and SWE profiles, or None if no domain of `task_cfg` needs one."""
    if not set(task_domains(task_cfg)) & set(SANDBOX_DOMAINS):
        return None
    from rayrl.sandbox.pool import SandboxPool
    return SandboxPool(**_pool_setup(), min_idle=0, max_total=max_total, export_metrics=False)


async def close_env(env, own_pool) -> None:
    """Release what an actor's environment started (a browser) and the pool it made for itself
    (`local_pool`; None for none, or for the cluster's shared pools, which outlive it)."""
    if env is not None:
        await env.aclose()
    if own_pool is not None:
        await own_pool.shutdown()


def node_pools(task_cfg, node_resource: str, max_per_node: int):
    """A SandboxRouter over one SandboxPool actor on each alive Ray node that offers the custom
    resource `node_resource` (sandbox nodes of a cluster), or None if no domain of `task_cfg`
    needs sandboxes. The pools export their metrics to the dashboard."""
    if not set(task_domains(task_cfg)) & set(SANDBOX_DOMAINS):
        return None
    import ray

    from rayrl.sandbox.router import SandboxRouter, spawn_pools
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(node_resource, 0) > 0]
    if not nodes:
        raise RuntimeError(f"sandbox.node_resource={node_resource!r}: no alive Ray node offers this resource")
    setup = _pool_setup()
    return SandboxRouter(spawn_pools(setup.pop("profiles"), nodes, **setup, min_idle=0, max_total=max_per_node))
