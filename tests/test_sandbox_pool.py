"""SandboxPool and SandboxRouter over real bubblewrap sandboxes."""

import asyncio
import os

import pytest

from rayrl.sandbox.base import Limits, Profile, SandboxInfraError
from rayrl.sandbox.pool import LeaseExpired, PoolSaturated, SandboxPool

PROFILE = Profile(name="default", limits=Limits(cpu_seconds=5, memory_mb=256),
                  files=(("hello.txt", b"hi\n"),))


def pool(**kw):
    kw.setdefault("min_idle", 1)
    kw.setdefault("max_total", 4)
    return SandboxPool([PROFILE], export_metrics=False, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


async def test_warm_pool_keeps_min_idle():
    p = pool(min_idle=2)
    try:
        assert (await p.warm())["idle"] == 2
        lease = await p.lease("default")
        for _ in range(100):
            await asyncio.sleep(0.02)
            if p.stats()["idle"] == 2:
                break
        assert p.stats()["idle"] == 2 and p.stats()["leased"] == 1
        await p.release(lease)
    finally:
        await p.shutdown()


async def test_lease_exec_release_resets_and_reuses():
    p = pool(min_idle=0)
    try:
        lease = await p.lease("default")
        result = await p.exec(lease, "cat hello.txt && echo new > mine.txt")
        assert result.ok and result.stdout == b"hi\n"
        assert await p.read_file(lease, "mine.txt") == b"new\n"
        await p.release(lease)
        again = await p.lease("default")
        result = await p.exec(again, "ls")
        assert b"mine.txt" not in result.stdout and b"hello.txt" in result.stdout
        assert p.stats()["started"] == 1                 # the same sandbox, reset and reused
    finally:
        await p.shutdown()


async def test_saturation_queues_then_fails_clearly():
    p = pool(min_idle=0, max_total=2, max_queue=1)
    try:
        a, b = await p.lease(), await p.lease()
        waiter = asyncio.create_task(p.lease())
        await asyncio.sleep(0.1)
        assert not waiter.done() and p.stats()["queued"] == 1
        with pytest.raises(PoolSaturated, match="max_queue=1"):
            await p.lease()
        await p.release(a)
        c = await asyncio.wait_for(waiter, 5)
        assert (await p.exec(c, "echo ok")).stdout == b"ok\n"
        await p.release(b)
        await p.release(c)
    finally:
        await p.shutdown()


async def test_expired_lease_is_reclaimed_and_heartbeat_keeps_it():
    p = pool(min_idle=0)
    try:
        # A TTL ten heartbeats long: a loaded machine that delays one heartbeat must not expire `kept`.
        kept = await p.lease(ttl_s=1.5)
        lost = await p.lease(ttl_s=1.5)
        pids = p._leases[lost].sandbox.pids()
        for _ in range(14):
            await asyncio.sleep(0.15)
            p.heartbeat(kept, ttl_s=1.5)
        with pytest.raises(LeaseExpired):
            await p.exec(lost, "true")
        assert (await p.exec(kept, "echo alive")).stdout == b"alive\n"
        assert p.stats()["expired"] == 1
        assert not any(alive(pid) for pid in pids)
    finally:
        await p.shutdown()


async def test_infrastructure_failure_is_raised_counted_and_pool_recovers():
    p = pool(min_idle=0)
    try:
        lease = await p.lease()
        sandbox = p._leases[lease].sandbox
        os.kill(sandbox.agent_pid, 9)                    # the sandbox dies under the episode
        with pytest.raises(SandboxInfraError):
            await p.exec(lease, "echo never")
        assert p.stats()["infra_failures"] == 1 and p.stats()["leased"] == 0
        fresh = await p.lease()
        assert (await p.exec(fresh, "echo next")).stdout == b"next\n"
    finally:
        await p.shutdown()


async def test_health_check_replaces_dead_idle_sandboxes():
    p = pool(min_idle=2, health_interval_s=0.1)
    try:
        await p.warm()
        victim = p._idle["default"][0]
        os.kill(victim.agent_pid, 9)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if p.stats()["infra_failures"] and p.stats()["idle"] == 2:
                break
        assert p.stats()["infra_failures"] == 1 and p.stats()["idle"] == 2
        assert victim not in p._idle["default"]
    finally:
        await p.shutdown()


async def test_a_health_check_outlived_by_its_sandbox_in_the_queue_leaves_the_queue_alone():
    """A sandbox leased, or a pool shut down, while the health check awaits the sandbox's answer:
    the check must not fail on a queue that no longer holds it (the pool's background task died of
    a ValueError at the end of a unify run)."""
    p = pool(min_idle=1)
    try:
        await p.warm()
        sandbox = p._idle["default"][0]
        answered = asyncio.Event()

        async def dead_after_a_while():
            await answered.wait()
            return False
        sandbox.alive = dead_after_a_while
        check = asyncio.ensure_future(p._check_idle())
        await asyncio.sleep(0.05)
        p._idle["default"].clear()          # what a lease or a shutdown does meanwhile
        answered.set()
        await check                         # raised ValueError before
        assert p.stats()["infra_failures"] == 0
        p._idle["default"].append(sandbox)  # back, for the shutdown to close
    finally:
        await p.shutdown()
    assert all(t.done() for t in p._tasks)


async def test_shutdown_leaves_no_process_behind():
    p = pool(min_idle=2)
    await p.warm()
    lease = await p.lease()
    await p.exec(lease, "sleep 100 > /dev/null 2>&1 &")
    pids = [pid for s in [p._leases[lease].sandbox, *p._idle["default"]] for pid in s.pids()]
    assert all(alive(pid) for pid in pids)
    await p.shutdown()
    await asyncio.sleep(0.2)
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(SandboxInfraError):
        await p.lease()


async def test_unknown_profile_names_the_choices():
    p = pool(min_idle=0)
    try:
        with pytest.raises(KeyError, match="default"):
            await p.lease("gpu")
    finally:
        await p.shutdown()


def test_router_spreads_leases_over_node_pools():
    """A local two-node cluster: one pool per node, leases go to the least-loaded pool."""
    import ray
    from ray.cluster_utils import Cluster

    from rayrl.sandbox.router import SandboxRouter, spawn_pools
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        pools = spawn_pools([PROFILE], min_idle=0, max_total=8, export_metrics=True)
        assert len(pools) == 2
        router = SandboxRouter(pools)

        async def lease_four():
            held = [await router.lease("default") for _ in range(4)]
            outs = [await pool.exec.remote(lease, "echo $((6*7))") for pool, lease in held]
            return held, outs

        held, outs = asyncio.run(lease_four())
        assert all(o.stdout == b"42\n" for o in outs)
        by_pool = [sum(1 for pool, _ in held if pool == p) for p in pools]
        assert by_pool == [2, 2]
        nodes = {ray.get(p.stats.remote())["leased"] for p in pools}
        assert nodes == {2}
        for stats in router.shutdown():
            assert stats["live"] == 0
    finally:
        ray.shutdown()
        cluster.shutdown()


async def test_generators_and_graders_close_the_pools_they_made_and_leave_shared_ones():
    """Roles.shutdown closes them before the kill (rayrl.pipeline.kill_closed): a pool's background
    task and a generator's serving task then end cleanly, and the sandboxes are gone."""
    from rayrl.config import GRPOConfig
    from rayrl.models import resolve_model_path
    from rayrl.reward.grader import RewardGrader
    from rayrl.rollout.generator import RolloutGenerator
    cfg = GRPOConfig()
    cfg.task.name = "terminal"
    path = resolve_model_path(cfg.model)
    gen, grader = RolloutGenerator(path, cfg.rollout, cfg.task), RewardGrader(cfg.task, path)
    assert grader.env is not None   # built on first use, with its pool
    own = [gen.own_pool, grader._own_pool]
    shared = pool(min_idle=0)
    beside = RolloutGenerator(path, cfg.rollout, cfg.task, sandbox_pool=shared)
    for p in [*own, shared]:
        await p.release(await p.lease())       # a warm sandbox, and the pool's background task
        assert p.stats()["live"] == 1 and not p._tasks[0].done()
    gen._ensure_serving()                      # the engine's serving task, as after any rollout
    serving = gen._serve_task
    await gen.close()
    assert serving.done() and gen._serve_task is None
    await grader.close()
    await beside.close()
    await asyncio.sleep(0)
    for p in own:
        assert p.stats()["live"] == 0 and all(t.done() for t in p._tasks)
    assert shared.stats()["live"] == 1 and not shared._tasks[0].done()   # the cluster's: not theirs to close
    await shared.shutdown()
    for g in (gen, beside):
        if g._serve_task is not None:
            g._serve_task.cancel()
