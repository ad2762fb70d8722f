"""SandboxRouter: one SandboxPool per node, each lease sent to the least-loaded pool."""

from __future__ import annotations

import asyncio

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayrl.sandbox.pool import SandboxPool


def spawn_pools(profiles: list, nodes: list[str] | None = None, **pool_kwargs) -> list:
    """A pool actor pinned to each alive node (or to the given node ids)."""
    if nodes is None:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    actor = ray.remote(SandboxPool)
    return [actor.options(num_cpus=0, max_concurrency=10_000,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(profiles, **pool_kwargs) for node in nodes]


class SandboxRouter:
    """Picklable: pass it to generators and graders; leases go to the pool with the lowest load."""

    def __init__(self, pools: list):
        if not pools:
            raise ValueError("a sandbox router needs at least one pool")
        self.pools = pools

    async def lease(self, profile: str = "default", ttl_s: float = 600.0):
        """(pool, lease id) on the least-loaded pool; use the pool for exec, files and release."""
        loads = await asyncio.gather(*(p.load.remote() for p in self.pools)) if len(self.pools) > 1 else [0.0]
        pool = self.pools[loads.index(min(loads))]
        return pool, await pool.lease.remote(profile, ttl_s)

    def shutdown(self) -> list[dict]:
        return ray.get([p.shutdown.remote() for p in self.pools])
