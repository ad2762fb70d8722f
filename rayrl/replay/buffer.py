"""ReplayBuffer: holds graded trees by reference and hands each to the learner exactly once.

It also paces the generators: a new group may start only if the learner step that will consume
it is at most `max_staleness` versions ahead of the weights it will be sampled with (the newest
version handed to the generators, `set_version`). With `max_staleness=0` this makes the loop
synchronous; nothing else changes.

With a finite prompt set (`set_prompts`), admission also hands the generator its task, so the
buffer owns the epochs, the stage's domain mix and SRPO History Resampling (rayrl.replay.prompts);
every graded group it receives is recorded against its prompt. `state_dict` / `load_state_dict`
carry that record (and the drop counters) through checkpoints.

Every admission is a numbered ticket (`acquire_ticket`) with a seed derived from (seed, number),
from which the generator draws the group's task when the buffer hands out none. A checkpoint holds
the tickets whose groups had not come back (`state_dict`; re-issued first after `load_state_dict`,
so they are rolled out again with the same task and seed) and the groups held but not yet handed
out (`snapshot` takes both at once; `restore_held` puts the groups back). Batches go to the learner
in ticket order, whatever order their groups finished in.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque

from rayrl.algo.resampling import ALL_CORRECT, ALL_WRONG, MIXED, group_outcome, keep_group, valid_rewards
from rayrl.replay.prompts import PromptSet


class ReplayBuffer:
    def __init__(self, groups_per_step: int, max_staleness: int = 1, filter_zero_variance: bool = True,
                 capacity: int = 4096, seed: int = 0):
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
        self.samples = Counter()    # valid samples received, those with a non-zero advantage, by outcome
        self.success = 1.0          # the reward at which a sample counts as correct
        self.prompts: PromptSet | None = None
        self._changed = asyncio.Condition()
        self._closed = False
        self.seed = seed
        self._next_ticket = 0
        self._in_flight: dict[int, dict] = {}   # admitted tickets whose group has not come back
        self._reissue: list[dict] = []          # a checkpoint's in-flight tickets, handed out first

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

    def set_prompts(self, tasks: list[dict], resampling: str = "none", success: float = 1.0, seed: int = 0,
                    floor: float = 0.0) -> None:
        """Hand out these tasks (dicts of envs.Task's fields) in epochs from now on; resampling
        none | history (SRPO, keeping at least `floor` of each domain's prompts active)."""
        self.success = success
        self.prompts = PromptSet(tasks, history=resampling == "history", success=success, seed=seed, floor=floor)

    def keep_prompts(self, keys: list[str]) -> None:
        """Narrow the prompt set to these of its prompts (see PromptSet.keep)."""
        self.prompts.keep(keys)

    def set_stage(self, weights: dict[str, float]) -> None:
        """The domain mix of the prompts handed out from now on (a schedule's stage)."""
        self.prompts.set_weights(weights)

    async def acquire_ticket(self, timeout: float = 1.0) -> dict | None:
        """Admit one new group: its ticket {"index", "seed", "task"} (task: a dict when the buffer
        hands out prompts, else None); None on timeout or after close. `put` the group with the
        ticket's index."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._closed or self.may_start()), timeout)
            except asyncio.TimeoutError:
                return None
            if self._closed:
                return None
            self._outstanding += 1
            if self._reissue:
                ticket = self._reissue.pop(0)
            else:
                index, self._next_ticket = self._next_ticket, self._next_ticket + 1
                ticket = {"index": index, "seed": random.Random(f"{self.seed}:{index}").getrandbits(63),
                          "task": self.prompts.next() if self.prompts else None}
            self._in_flight[ticket["index"]] = ticket
            return ticket

    async def put(self, meta: dict, tree_ref: list, ticket: int | None = None) -> str:
        """Store a graded group (`tree_ref` is a one-element list, so Ray keeps it a reference);
        `ticket`: the index of the ticket it was admitted with."""
        async with self._changed:
            if ticket is not None:
                self._in_flight.pop(ticket, None)
                meta = {**meta, "ticket": ticket}
            self.received += 1
            valid = valid_rewards(meta["rewards"])
            self.samples["received"] += len(valid)
            self.samples["useful"] += len(valid) if keep_group(valid) else 0
            self.samples[group_outcome(valid, self.success)] += len(valid)
            if self.prompts and meta.get("task_id") is not None:
                self.prompts.record(meta["domain"], meta["task_id"], meta["rewards"])
            reason = self._reject_reason(meta)
            if reason:
                self._drop(reason)
            else:
                self._items.append((meta, tree_ref[0]))
            self._changed.notify_all()
            return reason or "kept"

    def _reject_reason(self, meta: dict) -> str | None:
        if meta["infra_failures"] == meta["num_paths"]:
            return "infra_failure"
        if self.filter_zero_variance and not keep_group(meta["rewards"]):   # DAPO dynamic sampling
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
        # In ticket order: the learner's result must not depend on which group finished first.
        batch = sorted((self._items.popleft() for _ in range(n)), key=lambda item: item[0].get("ticket", -1))
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

    async def give_back(self, batch: list, learner_version: int) -> None:
        """Undo a `get` whose batch will not be trained on (the run stopped while it waited, and is
        being saved): its groups are held again, first, as if never handed out."""
        async with self._changed:
            self._items.extendleft(reversed(batch))
            self._outstanding += len(batch)
            self._consumed -= len(batch)
            self._learner_next = learner_version
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    def stats(self) -> dict:
        return {"size": len(self._items), "outstanding": self._outstanding, "consumed": self._consumed,
                "version": self.version,
                "received": self.received, **{f"dropped_{k}": v for k, v in self.dropped.items()},
                # share of the rolled-out samples that carried a GRPO signal (before any filter)
                "rollout_effective": self.samples["useful"] / max(self.samples["received"], 1),
                # rolled-out samples by their group's outcome (History Resampling avoids all_correct ones)
                **{f"samples_{k}": self.samples[k] for k in (ALL_CORRECT, ALL_WRONG, MIXED)},
                **(self.prompts.stats() if self.prompts else {})}

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able: the prompt set's epochs and outcome record, the counters, and the tickets:
        the next number and those whose groups have not come back (in order)."""
        in_flight = sorted(self._in_flight.values(), key=lambda t: t["index"]) + self._reissue
        return {"prompts": self.prompts.state_dict() if self.prompts else None, "dropped": dict(self.dropped),
                "received": self.received, "samples": dict(self.samples), "next_ticket": self._next_ticket,
                "in_flight": in_flight, "consumed": self._consumed, "learner_next": self._learner_next}

    def load_state_dict(self, state: dict) -> None:
        """Restore after `set_prompts` with the same tasks (the record is checked against them).
        The tickets that were in flight are handed out again before any new one."""
        if (state["prompts"] is None) != (self.prompts is None):
            raise ValueError("the saved buffer state and this buffer disagree on whether prompts are handed out")
        if self.prompts:
            self.prompts.load_state_dict(state["prompts"])
        self.dropped, self.received = Counter(state["dropped"]), state["received"]
        self.samples = Counter(state["samples"])
        self._next_ticket, self._in_flight = state["next_ticket"], {}
        self._reissue = [dict(t) for t in state["in_flight"]]
        self._consumed, self._learner_next = state["consumed"], state["learner_next"]

    def snapshot(self) -> dict:
        """`state_dict` and the groups held but not yet handed out, [(meta, [tree ref])], taken
        together (no put or get runs in between)."""
        return {"state": self.state_dict(), "held": [(meta, [ref]) for meta, ref in self._items]}

    def restore_held(self, held: list) -> None:
        """Put back a snapshot's held groups, [(meta, [tree ref])], after `load_state_dict`."""
        self._items.extend((meta, ref[0]) for meta, ref in held)
        self._outstanding += len(held)
