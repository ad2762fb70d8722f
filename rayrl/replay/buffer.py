"""ReplayBuffer: holds graded trees by reference and hands each to the learner exactly once.

It also paces the generators: a new group may start only if the learner step that will consume
it is at most `max_staleness` versions ahead of the weights it will be sampled with (the newest
version handed to the generators, `set_version`). With `max_staleness=0` this makes the loop
synchronous; nothing else changes.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque

from rayrl.algo.advantages import is_zero_variance


class ReplayBuffer:
    def __init__(self, groups_per_step: int, max_staleness: int = 1, filter_zero_variance: bool = True,
                 capacity: int = 4096):
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.filter_zero_variance = filter_zero_variance
        self.capacity = capacity
        self._items: deque[tuple[dict, object]] = deque()
        self._outstanding = 0       # groups admitted and neither handed out nor dropped
        self._consumed = 0          # groups handed to the learner
        self.version = 0            # newest weights version the generators have been given
        self._learner_next = 0      # version the learner trains at next, once a batch was taken
        self.dropped: Counter = Counter()
        self.received = 0
        self._changed = asyncio.Condition()
        self._closed = False

    # -- generators ---------------------------------------------------------------------------
    def may_start(self) -> bool:
        # The learner version at which a new group would be trained, given those ahead of it.
        target = max(self.version, self._learner_next) + self._outstanding // self.groups_per_step
        return target <= self.version + self.max_staleness

    async def set_version(self, version: int) -> None:
        """Called once every generator holds weights `version` (they apply them before sampling)."""
        async with self._changed:
            self.version = version
            self._changed.notify_all()

    async def acquire(self, timeout: float = 1.0) -> bool:
        """Admit one new group; False on timeout or after close."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._closed or self.may_start()), timeout)
            except asyncio.TimeoutError:
                return False
            if self._closed:
                return False
            self._outstanding += 1
            return True

    async def put(self, meta: dict, tree_ref: list) -> str:
        """Store a graded group (`tree_ref` is a one-element list, so Ray keeps it a reference)."""
        async with self._changed:
            self.received += 1
            reason = self._reject_reason(meta)
            if reason:
                self._drop(reason)
            else:
                self._items.append((meta, tree_ref[0]))
            self._changed.notify_all()
            return reason or "kept"

    def _reject_reason(self, meta: dict) -> str | None:
        valid = [r for r in meta["rewards"] if r is not None]
        if meta["infra_failures"] == meta["num_paths"]:
            return "infra_failure"
        if self.filter_zero_variance and is_zero_variance(valid):
            return "zero_variance"
        if len(self._items) >= self.capacity:
            return "overflow"
        return None

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self._outstanding -= 1

    # -- learner ------------------------------------------------------------------------------
    def _take_fresh(self, n: int, learner_version: int) -> list | None:
        while self._items and learner_version - self._items[0][0]["min_version"] > self.max_staleness:
            self._items.popleft()
            self._drop("stale")
        if len(self._items) < n:
            return None
        batch = [self._items.popleft() for _ in range(n)]
        self._outstanding -= n
        self._consumed += n
        self._learner_next = learner_version + 1
        return batch

    async def get(self, n: int, learner_version: int, timeout: float = 1.0) -> list | None:
        """n fresh groups as [(meta, tree_ref)], each handed out once; None on timeout."""
        async with self._changed:
            batch = None

            def ready():
                nonlocal batch
                batch = self._take_fresh(n, learner_version)
                return batch is not None or self._closed

            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except asyncio.TimeoutError:
                return None
            return batch

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    def stats(self) -> dict:
        return {"size": len(self._items), "outstanding": self._outstanding, "consumed": self._consumed,
                "version": self.version,
                "received": self.received, **{f"dropped_{k}": v for k, v in self.dropped.items()}}
