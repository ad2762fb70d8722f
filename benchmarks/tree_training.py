"""Tree Training against per-path training: forward plus backward of one learner step, same model.

Claim: training a batch as packed tries (shared prefixes computed once, tree attention) reaches
most of the speed-up its FLOPs allow, and costs nothing when nothing is shared.

Both sides are the learner's own code (`LearnerWorker._micro_batches`, `_batch_tensors`,
`_micro_loss`, then backward) on a plain HF model: per-path is `learner.tree_training=false`,
paths right-padded into micro-batches of similar length under the token budget, as the trainer
runs them. Shapes (seeded):

  grpo        a 1,024-token prompt with 8 sampled responses of 128 tokens
  agent       a 2,048-token trunk, then a binary fork of 4 levels (16 leaves, forks at depths
              2,048 / 2,112 / 2,176 / 2,240); each 64-token segment is a 32-token action and a
              32-token loss-masked observation
  no_sharing  8 unrelated paths of 1,152 tokens

Per shape: token_ratio = path tokens / unique tokens; limit = FLOPs per-path training needs over
FLOPs tree training needs (linear layers per token and attention per attended pair, from the
model config; the backward scales both alike); speedup = per-path time / tree time, each the CPU
time of the process on one thread (best of N, interleaved; on a shared machine wall time mostly
measures the other load); efficiency = speedup / limit; memory = bytes of activations saved for
backward by the largest micro-batch (weights excluded). Prints a table, then one JSON line.

    .venv/bin/python benchmarks/tree_training.py [--quick]
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # for benchmarks._args

from benchmarks._args import parse  # noqa: E402
from rayrl.algo.tree_pack import pack_paths  # noqa: E402
from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import LearnerConfig  # noqa: E402
from rayrl.learner.worker import LearnerWorker  # noqa: E402
from rayrl.tree import NOT_SAMPLED, TrajectoryTree  # noqa: E402

SEED = 0
VOCAB = 4096
BUDGET = LearnerConfig().micro_batch_tokens   # the learner's default token budget, both ways
TARGETS = {"min_efficiency": 0.85, "max_speedup": 6.2, "max_speedup_min_limit": 7.3, "no_sharing_speedup": 0.95}
# Compute-bound on one CPU core: about a quarter of the linear FLOPs in the LM head, as in
# Qwen2-0.5B; grouped-query attention as in the small real models.
MODEL = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True)


def _segment(rng, n, sampled):
    """n tokens; the first `sampled` were sampled by the model, the rest is a loss-masked observation."""
    mask = np.arange(n) < sampled
    return dict(tokens=rng.integers(0, VOCAB, n), logprobs=np.where(mask, -rng.exponential(1.0, n), 0.0),
                loss_mask=mask, versions=np.where(mask, 0, NOT_SAMPLED))


def _grade(rng, tree):
    for leaf in tree.leaves():
        tree.nodes[leaf].reward = float(rng.integers(0, 2))
        tree.nodes[leaf].advantage = float(rng.normal())
    return tree


def grpo(rng, prompt=1024, group=8, response=128):
    tree = TrajectoryTree(rng.integers(0, VOCAB, prompt))
    for _ in range(group):
        tree.add(0, **_segment(rng, response, response))
    return [_grade(rng, tree)]


def agent(rng, trunk=2048, levels=4, act=32, obs=32):
    tree = TrajectoryTree(rng.integers(0, VOCAB, trunk))
    frontier = [0]
    for _ in range(levels):
        frontier = [tree.add(node, **_segment(rng, act + obs, act)) for node in frontier for _ in range(2)]
    return [_grade(rng, tree)]


def no_sharing(rng, paths=8, prompt=1024, response=128):
    firsts = rng.choice(VOCAB, paths, replace=False)   # distinct first tokens: nothing merges
    trees = []
    for first in firsts:
        tree = TrajectoryTree(np.r_[first, rng.integers(0, VOCAB, prompt - 1)])
        tree.add(0, **_segment(rng, response, response))
        trees.append(_grade(rng, tree))
    return trees


def flops(config: LlamaConfig, tokens: int, pairs: int) -> float:
    """Forward multiply-adds of `tokens` tokens attending `pairs` (query, key) pairs."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head = d // heads
    per_layer = d * heads * head * 2 + d * kv * head * 2 + 3 * d * config.intermediate_size
    linear = config.num_hidden_layers * per_layer + d * config.vocab_size
    attention = config.num_hidden_layers * 2 * heads * head     # q.k and p.v per pair
    return tokens * linear + pairs * attention


def learner(model, tree_training: bool) -> LearnerWorker:
    w = LearnerWorker("", LearnerConfig(tree_training=tree_training), rank=0, world_size=1)
    w.engine, w.device = model, torch.device("cpu")
    return w


def step(w: LearnerWorker, paths, memory: bool = False) -> int:
    """One learner step's forward and backward; returns the largest micro-batch's saved bytes
    when `memory` (counting hooks cost time, so timed runs go without)."""
    totals = {"loss_tokens": sum(int(p.loss_mask[1:].sum()) for p in paths), "num_paths": len(paths)}
    weights = {p.untyped_storage().data_ptr() for p in w.engine.parameters()}
    w.engine.zero_grad(set_to_none=True)
    peak = 0
    for batch in w._micro_batches(paths):
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if memory else contextlib.nullcontext():
            loss, _ = w._micro_loss(w._batch_tensors(batch, "rl", 0.0), "rl", totals)
        loss.backward()
        peak = max(peak, sum(saved.values()))
    return peak


def main(argv: list[str]) -> None:
    quick = parse(argv, __doc__, {}, flags={"--quick": "best of 2 timed steps instead of 4"})["quick"]
    torch.set_num_threads(1)   # one core, timed by its CPU time: the figures do not depend on other load
    torch.manual_seed(SEED)
    config = LlamaConfig(**MODEL)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    model.config.use_cache = False
    rng = np.random.default_rng(SEED)
    shapes = {"grpo": grpo(rng), "agent": agent(rng), "no_sharing": no_sharing(rng)}
    reps = 2 if quick else 4
    per_path, tree = learner(model, False), learner(model, True)

    rows = {}
    for name, trees in shapes.items():
        paths = [p for t in trees for p in t.paths()]
        packed = pack_paths([p.tokens for p in paths])
        path_tokens = sum(len(p) for p in paths)
        path_pairs = sum(len(p) * (len(p) + 1) // 2 for p in paths)
        limit = flops(config, path_tokens, path_pairs) / flops(config, packed.num_tokens, packed.attended_pairs)
        mem = {"per_path": step(per_path, paths, memory=True), "tree": step(tree, paths, memory=True)}
        best = {"per_path": float("inf"), "tree": float("inf")}
        for _ in range(reps):   # interleaved, so that a slow spell of the machine hits both sides
            for side, w in (("per_path", per_path), ("tree", tree)):
                t0 = time.process_time()
                step(w, paths)
                best[side] = min(best[side], time.process_time() - t0)
        speedup = best["per_path"] / best["tree"]
        rows[name] = {
            "paths": len(paths), "path_tokens": path_tokens, "tree_tokens": packed.num_tokens,
            "token_ratio": round(path_tokens / packed.num_tokens, 3), "limit": round(limit, 3),
            "per_path_s": round(best["per_path"], 3), "tree_s": round(best["tree"], 3),
            "speedup": round(speedup, 3), "efficiency": round(speedup / limit, 3),
            "per_path_mb": round(mem["per_path"] / 2**20, 1), "tree_mb": round(mem["tree"] / 2**20, 1)}

    head = (f"{'shape':<12}{'paths':>6}{'path tok':>10}{'tree tok':>10}{'tok ratio':>10}{'limit':>8}"
            f"{'per-path s':>12}{'tree s':>9}{'speedup':>9}{'effic.':>8}{'per-path MB':>13}{'tree MB':>9}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<12}{r['paths']:>6}{r['path_tokens']:>10}{r['tree_tokens']:>10}{r['token_ratio']:>10.2f}"
              f"{r['limit']:>8.2f}{r['per_path_s']:>12.3f}{r['tree_s']:>9.3f}{r['speedup']:>9.2f}"
              f"{r['efficiency']:>8.2f}{r['per_path_mb']:>13.1f}{r['tree_mb']:>9.1f}")
    print(f"(times: CPU seconds on 1 thread, best of {reps}; memory: activations saved for backward by the "
          f"largest micro-batch; budget {BUDGET} tokens per micro-batch both ways)")

    shared = [r for r in rows.values() if r["limit"] >= 2]
    eligible = {n: r for n, r in rows.items() if r["limit"] >= TARGETS["max_speedup_min_limit"]}
    top = max(eligible, key=lambda n: eligible[n]["speedup"]) if eligible else None
    result = {
        "shapes": rows,
        "min_efficiency": min(r["efficiency"] for r in shared) if shared else None,
        "max_speedup": max(r["speedup"] for r in rows.values()),
        "max_speedup_limit_ge_7_3": eligible[top]["speedup"] if top else None,
        "no_sharing_speedup": rows["no_sharing"]["speedup"],
        "targets": TARGETS,
    }
    result["meets_targets"] = bool(
        result["min_efficiency"] is not None and result["min_efficiency"] >= TARGETS["min_efficiency"]
        and top is not None and result["max_speedup_limit_ge_7_3"] >= TARGETS["max_speedup"]
        and result["no_sharing_speedup"] >= TARGETS["no_sharing_speedup"])
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
