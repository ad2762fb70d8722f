"""LearnerGroup: N LearnerWorker actors driven like one object."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrl.algo.distill import domain_reverse_kl
from rayrl.algo.mismatch import check_mismatch
from rayrl.learner.worker import LearnerWorker


def split_balanced(metas: list[dict], n: int) -> list[list[int]]:
    """Assign groups to n ranks, largest first to the least-loaded rank (by path tokens)."""
    shares: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for i in sorted(range(len(metas)), key=lambda i: -metas[i]["num_tokens"]):
        r = loads.index(min(loads))
        shares[r].append(i)
        loads[r] += metas[i]["num_tokens"]
    return shares


class LearnerGroup:
    def __init__(self, model_path: str, learner_cfg, lr: float, temperature: float, seed: int = 0,
                 torch_threads: int = 1):
        n = learner_cfg.num_workers
        bundle = {"CPU": learner_cfg.num_cpus, **({"GPU": learner_cfg.num_gpus} if learner_cfg.num_gpus else {}),
                  **learner_cfg.resources}   # custom resources put the workers on the learner nodes
        self.placement = placement_group([bundle] * n, strategy=learner_cfg.placement.upper())
        ray.get(self.placement.ready())
        actor = ray.remote(LearnerWorker)
        self.workers = [
            actor.options(num_cpus=learner_cfg.num_cpus, num_gpus=learner_cfg.num_gpus,
                          resources=dict(learner_cfg.resources),
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, i),
                          name=None).remote(model_path, learner_cfg, i, n, temperature, seed, torch_threads)
            for i in range(n)]
        addr, port = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(addr, port, lr) for w in self.workers])

    def train_step(self, batch: list[tuple[dict, ray.ObjectRef]], kind: str, lr: float, rl_weight: float = 0.0,
                   version: int | None = None, max_mismatch_kl: float = 0.0, mismatch_check_tokens: int = 1) -> dict:
        """One synchronous update on `batch` = [(group meta, tree ref)]; returns batch-level stats.
        kind: sft | rl | distill (see LearnerWorker.train_step). `version`: the version the learner
        holds (rl, distill): the weight-sync check compares the engines' log-probs of the tokens
        that version sampled with the learner's and logs `mismatch_kl_onpolicy`; once the steps
        since its last check hold `mismatch_check_tokens` such tokens, it checks their pooled KL
        (`mismatch_kl_checked`) and raises WeightSyncError (before the update) above
        `max_mismatch_kl` (0: no limit); `mismatch_window_tokens` is what it pools after the step."""
        metas = [m for m, _ in batch]
        totals = {"loss_tokens": sum(m["loss_tokens"] for m in metas),
                  "num_paths": sum(m["num_paths"] - m["infra_failures"] for m in metas),
                  "reverse_kl": domain_reverse_kl(metas),   # the distillation baseline, per domain
                  "version": version, "max_mismatch_kl": max_mismatch_kl,
                  "mismatch_check_tokens": mismatch_check_tokens}
        shares = split_balanced(metas, len(self.workers))
        results = ray.get([w.train_step.remote([batch[i][1] for i in share], kind, lr, totals, rl_weight)
                           for w, share in zip(self.workers, shares)])
        merged: dict[str, float] = {}
        for r in results:
            for k, v in r.items():
                merged[k] = max(merged.get(k, v), v) if k.endswith("_max") else merged.get(k, 0.0) + v
        tokens = max(merged.pop("loss_tokens", 0.0), 1.0)
        stats = {k[:-4]: v / tokens for k, v in merged.items() if k.endswith("_sum")}
        stats.update({k: v for k, v in merged.items() if k.endswith("_max")})
        stats["loss"] = merged.get("loss", 0.0)
        stats["grad_norm"] = results[0]["grad_norm"]
        for key in ("mismatch_kl_checked", "mismatch_window_tokens"):   # the same on every rank
            if key in results[0]:
                stats[key] = results[0][key]
        stats["loss_tokens"] = tokens
        # Path tokens per token the forward passes ran on: > 1 when tree training merges shared prefixes.
        stats["dedup_ratio"] = merged.get("path_tokens", 0.0) / max(merged.get("forward_tokens", 0.0), 1.0)
        if "onpolicy_tokens" in merged:   # the workers checked it against the limit before the update
            stats["onpolicy_tokens"] = merged["onpolicy_tokens"]
            kl = check_mismatch(merged["onpolicy_kl_total"], merged["onpolicy_tokens"], version, 0.0)
            if kl is not None:
                stats["mismatch_kl_onpolicy"] = kl
        return stats

    def publish(self) -> ray.ObjectRef:
        """The current weights in the object store, as one ref."""
        return ray.get([w.publish.remote() for w in self.workers])[0][0]

    def save(self, path: str) -> None:
        ray.get([w.save.remote(path) for w in self.workers])

    def load_state(self, path: str) -> None:
        """Weights, every rank's optimizer state and RNG states from a checkpoint `save` wrote."""
        ray.get([w.load_state.remote(path) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        ray.util.remove_placement_group(self.placement)
