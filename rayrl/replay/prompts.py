"""PromptSet: a finite training prompt set handed out in epochs, with SRPO History Resampling.

Each domain's prompts are iterated in epochs (a fresh shuffle per epoch, derived from the seed,
the domain and the epoch number, so no RNG state needs saving). A stage's mix (`set_weights`)
decides which domain the next prompt comes from, by smooth weighted round robin: after n prompts
each domain has had its share of n up to one prompt. Domains run their epochs independently.

With History Resampling every graded group is recorded against its prompt, and at each epoch
boundary the prompts whose latest group was all correct leave the set for good
(rayrl.algo.resampling.next_epoch), except that a domain keeps at least `floor` of its prompts
active: below that, the prompts dropped longest ago come back (counted as readmitted). Should
every prompt of a domain be solved (floor 0), its epoch starts over with the whole set (counted
as a restart) rather than stalling the run.

`keep` narrows the set before training (an offline difficulty filter, rayrl.algo.resampling.curate);
a checkpoint of a narrowed set restores into the whole one it was narrowed from.

The whole state is a JSON-able dict (`state_dict` / `load_state_dict`), saved with checkpoints.
"""

from __future__ import annotations

import math
import random
from collections import Counter

from rayrl.algo.resampling import UNGRADED, group_outcome, next_epoch, valid_rewards


def prompt_key(domain: str, task_id: str) -> str:
    """Task ids are unique within a domain; the key is unique across domains."""
    return f"{domain}:{task_id}"


def domains_left_empty(domain_of: dict[str, str], keep) -> list[str]:
    """The domains (of prompts keyed as `domain_of` maps them) with none of their prompts in `keep`."""
    keep = set(keep)
    return sorted(set(domain_of.values()) - {d for key, d in domain_of.items() if key in keep})


class PromptSet:
    def __init__(self, tasks: list[dict], history: bool = False, success: float = 1.0, seed: int = 0,
                 floor: float = 0.0):
        if not tasks:
            raise ValueError("a prompt set needs at least one task")
        self.tasks = {prompt_key(t["domain"], t["id"]): t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError("a prompt set's tasks must have distinct (domain, id) pairs")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"History Resampling floor {floor}: a share of each domain's prompts, 0 to 1")
        self.history, self.success, self.seed, self.floor = history, success, seed, floor
        self.pool: dict[str, list[str]] = {}
        for key, task in self.tasks.items():
            self.pool.setdefault(task["domain"], []).append(key)
        self.active = {d: list(keys) for d, keys in self.pool.items()}
        self.order: dict[str, list[str]] = {d: [] for d in self.pool}   # rest of the current epoch
        self.epoch = {d: 0 for d in self.pool}
        self.weights = {d: 1.0 for d in self.pool}
        self.issued: Counter = Counter()       # per domain, since the last set_weights
        self.restarts: Counter = Counter()
        self.dropped: dict[str, list[str]] = {d: [] for d in self.pool}   # solved, oldest first
        self.readmitted: Counter = Counter()
        self.records: dict[str, list[list]] = {}   # key: [[epoch issued, correct, valid], ...]
        self.latest: dict[str, str] = {}           # key: outcome of its latest graded group
        self._issued_epoch: dict[str, int] = {}

    # -- schedule ----------------------------------------------------------------------------
    def set_weights(self, weights: dict[str, float]) -> None:
        """The mix of the next prompts: {domain: share}; domains left out get none."""
        unknown = sorted(set(weights) - set(self.pool))
        if unknown or not weights or any(w <= 0 for w in weights.values()):
            raise ValueError(f"weights {weights!r}: every domain needs a share > 0 and prompts "
                             f"(domains with prompts: {', '.join(sorted(self.pool))})")
        self.weights = {d: float(w) for d, w in weights.items()}
        self.issued = Counter()

    def keep(self, keys: list[str]) -> None:
        """From now on the set is these of its prompts (e.g. curated by pass rate); every domain
        must keep at least one. Epochs start over; the record is kept."""
        unknown = sorted(set(keys) - set(self.tasks))
        if unknown:
            raise ValueError(f"{len(unknown)} prompts to keep are not in the set (first: {unknown[0]})")
        keep = set(keys)
        emptied = domains_left_empty({key: task["domain"] for key, task in self.tasks.items()}, keep)
        if emptied:
            raise ValueError(f"no prompt of domain {', '.join(emptied)} would be left")
        self.tasks = {k: t for k, t in self.tasks.items() if k in keep}
        for d in self.pool:
            self.pool[d] = [k for k in self.pool[d] if k in keep]
            self.active[d] = [k for k in self.active[d] if k in keep]
            self.dropped[d] = [k for k in self.dropped[d] if k in keep]
            self.order[d] = []

    def _next_domain(self) -> str:
        total = sum(self.weights.values())
        n = sum(self.issued[d] for d in self.weights) + 1
        # The domain furthest behind its share of n (ties: the first listed).
        return max(self.weights, key=lambda d: self.weights[d] / total * n - self.issued[d])

    def _new_epoch(self, domain: str) -> None:
        if self.history:
            earlier = set(self.dropped[domain])
            floor = math.ceil(self.floor * len(self.pool[domain]))
            self.active[domain], self.dropped[domain] = next_epoch(self.active[domain], self.latest,
                                                                   self.dropped[domain], floor)
            self.readmitted[domain] += len(earlier.intersection(self.active[domain]))
        if not self.active[domain]:
            self.active[domain] = list(self.pool[domain])
            self.restarts[domain] += 1
        self.epoch[domain] += 1
        order = list(self.active[domain])
        random.Random(f"{self.seed}:{domain}:{self.epoch[domain]}").shuffle(order)
        self.order[domain] = order

    def next(self) -> dict:
        """The next training task (a dict of envs.Task's fields)."""
        domain = self._next_domain()
        if not self.order[domain]:
            self._new_epoch(domain)
        key = self.order[domain].pop(0)
        self.issued[domain] += 1
        self._issued_epoch[key] = self.epoch[domain]
        return self.tasks[key]

    # -- history -----------------------------------------------------------------------------
    def record(self, domain: str, task_id: str, rewards: list) -> str | None:
        """Record a graded group of one of the set's prompts; returns its outcome (None for a task
        that is not in the set)."""
        key = prompt_key(domain, task_id)
        if key not in self.tasks:
            return None
        outcome = group_outcome(rewards, self.success)
        valid = valid_rewards(rewards)
        self.records.setdefault(key, []).append(
            [self._issued_epoch.get(key, self.epoch[domain]), sum(r >= self.success for r in valid), len(valid)])
        if outcome != UNGRADED:
            self.latest[key] = outcome
        return outcome

    def stats(self) -> dict:
        out = {}
        for d in sorted(self.pool):
            out[f"prompts/{d}/epoch"] = self.epoch[d]
            out[f"prompts/{d}/active"] = len(self.active[d])
            out[f"prompts/{d}/solved_dropped"] = len(self.pool[d]) - len(self.active[d])
            out[f"prompts/{d}/restarts"] = self.restarts[d]
            out[f"prompts/{d}/readmitted"] = self.readmitted[d]
        return out

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"keys": sorted(self.tasks), "history": self.history, "success": self.success, "seed": self.seed,
                "active": self.active, "order": self.order, "epoch": self.epoch, "weights": self.weights,
                "issued": dict(self.issued), "restarts": dict(self.restarts), "records": self.records,
                "floor": self.floor, "dropped": self.dropped, "readmitted": dict(self.readmitted),
                "latest": self.latest, "issued_epoch": self._issued_epoch}

    def load_state_dict(self, state: dict) -> None:
        if not set(state["keys"]) <= set(self.tasks):
            raise ValueError("the saved prompt-set state is for a different set of tasks "
                             f"({len(state['keys'])} saved, {len(self.tasks)} here)")
        if len(state["keys"]) < len(self.tasks):   # saved after `keep` narrowed the set
            self.keep(state["keys"])
        self.history, self.success, self.seed = state["history"], state["success"], state["seed"]
        self.active = {d: list(v) for d, v in state["active"].items()}
        self.order = {d: list(v) for d, v in state["order"].items()}
        self.epoch = dict(state["epoch"])
        self.weights = dict(state["weights"])
        self.issued, self.restarts = Counter(state["issued"]), Counter(state["restarts"])
        self.floor, self.readmitted = state["floor"], Counter(state["readmitted"])
        self.dropped = {d: list(v) for d, v in state["dropped"].items()}
        self.records = {k: [list(r) for r in v] for k, v in state["records"].items()}
        self.latest = dict(state["latest"])
        self._issued_epoch = dict(state["issued_epoch"])
