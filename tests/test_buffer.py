"""ReplayBuffer: staleness bound, pacing of generators, filtering and exactly-once hand-off."""

import asyncio

import pytest

from rayrl.replay.buffer import ReplayBuffer


def meta(i, version, rewards=(1.0, 0.0)):
    return {"id": i, "min_version": version, "rewards": list(rewards), "infra_failures": 0,
            "num_paths": len(rewards), "num_tokens": 10, "loss_tokens": 4}


async def fill(buf, items):
    for m in items:
        buf.version = max(buf.version, m["min_version"])
        assert await buf.acquire_ticket(timeout=0.1)
        await buf.put(m, [m["id"]])


async def test_each_group_is_handed_out_exactly_once():
    buf = ReplayBuffer(groups_per_step=4, max_staleness=100)
    await fill(buf, [meta(i, 0) for i in range(12)])
    seen = []
    for version in range(3):
        batch = await buf.get(4, version, timeout=0.1)
        seen += [ref for _, ref in batch]
    assert sorted(seen) == list(range(12))
    assert await buf.get(1, 3, timeout=0.05) is None
    assert buf.stats()["consumed"] == 12


async def test_stale_groups_are_dropped_and_counted():
    buf = ReplayBuffer(groups_per_step=2, max_staleness=1)
    # groups sampled by version 0 and 2; the learner is at version 2
    for m in [meta(0, 0), meta(1, 0), meta(2, 2), meta(3, 2)]:
        buf._outstanding += 1
        await buf.put(m, [m["id"]])
    batch = await buf.get(2, learner_version=2, timeout=0.1)
    assert [ref for _, ref in batch] == [2, 3]
    assert buf.dropped["stale"] == 2


async def test_staleness_bound_within_limit_keeps_group():
    buf = ReplayBuffer(groups_per_step=1, max_staleness=2)
    buf._outstanding += 1
    await buf.put(meta(0, 3), [0])
    batch = await buf.get(1, learner_version=5, timeout=0.1)
    assert [ref for _, ref in batch] == [0]


async def test_zero_variance_and_infra_failed_groups_are_filtered():
    buf = ReplayBuffer(groups_per_step=2, max_staleness=0)
    await fill(buf, [meta(0, 0, (1.0, 1.0)), meta(1, 0, (0.0, 0.0))])
    infra = dict(meta(2, 0), infra_failures=2)
    assert await buf.acquire_ticket(timeout=0.1)
    assert await buf.put(infra, [2]) == "infra_failure"
    assert buf.dropped == {"zero_variance": 2, "infra_failure": 1}
    assert buf.stats()["size"] == 0
    # dropped groups free their slots, so generators can refill the step
    assert buf.may_start()


async def test_zero_variance_filter_can_be_disabled():
    buf = ReplayBuffer(groups_per_step=1, max_staleness=0, filter_zero_variance=False)
    await fill(buf, [meta(0, 0, (1.0, 1.0))])
    assert (await buf.get(1, 0, timeout=0.1))[0][1] == 0


async def test_synchronous_pacing_admits_one_step_per_version():
    buf = ReplayBuffer(groups_per_step=2, max_staleness=0)
    assert await buf.acquire_ticket(timeout=0.05)
    assert await buf.acquire_ticket(timeout=0.05)
    # a third group sampled with version 0 would be trained at version 1: refused
    assert not await buf.acquire_ticket(timeout=0.05)
    await buf.put(meta(0, 0), [0])
    await buf.put(meta(1, 0), [1])
    assert len(await buf.get(2, 0, timeout=0.1)) == 2
    assert not await buf.acquire_ticket(timeout=0.05)   # generators still hold version 0
    await buf.set_version(1)
    assert await buf.acquire_ticket(timeout=0.05)       # new weights: admitted


async def test_async_pacing_allows_max_staleness_steps_ahead():
    buf = ReplayBuffer(groups_per_step=2, max_staleness=2)
    admitted = 0
    while await buf.acquire_ticket(timeout=0.02):
        admitted += 1
    assert admitted == 2 * 3


@pytest.mark.parametrize("event", ["new_version", "dropped_group"])
async def test_waiting_acquire_wakes_on_new_version_or_freed_slot(event):
    buf = ReplayBuffer(groups_per_step=1, max_staleness=1)
    await fill(buf, [meta(0, 0), meta(1, 0, (1.0, 1.0))])
    assert buf.stats()["size"] == 1   # the zero-variance group freed its slot
    assert await buf.acquire_ticket(timeout=0.05)
    waiter = asyncio.create_task(buf.acquire_ticket(timeout=2.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    if event == "new_version":
        await buf.get(1, 0, timeout=0.1)   # the learner trains on version 0 ...
        assert not waiter.done()
        await buf.set_version(1)           # ... and publishes version 1
    else:
        await buf.put(meta(3, 0, (0.0, 0.0)), [3])
    assert await asyncio.wait_for(waiter, 1.0)


async def test_close_releases_waiters():
    buf = ReplayBuffer(groups_per_step=1, max_staleness=0)
    getter = asyncio.create_task(buf.get(1, 0, timeout=5.0))
    await asyncio.sleep(0.02)
    await buf.close()
    assert await asyncio.wait_for(getter, 1.0) is None
    assert not await buf.acquire_ticket(timeout=0.05)


async def test_capacity_overflow_is_counted():
    buf = ReplayBuffer(groups_per_step=1, max_staleness=10, capacity=2)
    await fill(buf, [meta(i, 0) for i in range(3)])
    assert buf.dropped["overflow"] == 1 and buf.stats()["size"] == 2


@pytest.mark.parametrize("staleness", [0, 1, 3])
async def test_paced_rollouts_are_never_dropped_as_stale(staleness):
    """Generators that follow the pacing and pick up each new version never produce stale groups."""
    buf = ReplayBuffer(groups_per_step=3, max_staleness=staleness)
    version = 0

    async def generator(k):
        n = 0
        while True:
            if not await buf.acquire_ticket(timeout=0.05):
                if buf._closed:
                    return
                continue
            v = buf.version   # weights are applied before sampling
            await asyncio.sleep(0.001 * (n % 4))
            await buf.put(meta(f"{k}-{n}", v), [n])
            n += 1

    gens = [asyncio.create_task(generator(k)) for k in range(2)]
    for _ in range(6):
        batch = await buf.get(3, version, timeout=2.0)
        assert batch is not None
        assert all(version - m["min_version"] <= staleness for m, _ in batch)
        version += 1
        await buf.set_version(version)
    await buf.close()
    await asyncio.gather(*gens)
    assert buf.dropped["stale"] == 0
