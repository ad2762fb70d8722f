"""Teacher: a frozen expert served by an engine in scoring mode (on-policy distillation).

It adds to a student's tree the teacher's log-prob of every token, computed on the student's own
prefixes; the learner turns the difference into per-token advantages (rayrl.algo.distill).
"""

from __future__ import annotations

import numpy as np

from rayrl.tree import LOGPROB_DTYPE, TrajectoryTree


def score_tree(score, tree: TrajectoryTree, temperature: float = 1.0) -> TrajectoryTree:
    """Fill `teacher_logprobs` of every node; `score(prompts, continuations, temperature)` is an
    engine's scoring call. One scored sequence per leaf; a node shared by several paths gets the
    same values from each (same prefix), the root (the prompt) gets zeros."""
    root = tree.nodes[0]
    leaves = tree.leaves()
    chains = [tree.ancestry(leaf)[1:] for leaf in leaves]
    continuations = [np.concatenate([tree.nodes[i].tokens for i in chain]) if chain else np.zeros(0, np.int32)
                     for chain in chains]
    scored = score([root.tokens] * len(leaves), continuations, temperature)
    root.teacher_logprobs = np.zeros(len(root), LOGPROB_DTYPE)
    for chain, values in zip(chains, scored):
        start = 0
        for i in chain:
            node = tree.nodes[i]
            node.teacher_logprobs = np.asarray(values[start:start + len(node)], LOGPROB_DTYPE)
            start += len(node)
    return tree


class Teacher:
    """Ray actor shell: `ray.remote(Teacher).remote(path)`; `score(tree)` returns the tree scored."""

    def __init__(self, model_path: str, temperature: float = 1.0, max_batch: int = 64, torch_threads: int = 1,
                 engine: str = "torch"):
        import torch

        from rayrl.rollout.engine import create_engine
        torch.set_num_threads(torch_threads)
        self.engine = create_engine(engine, model_path, max_batch=max_batch)   # rollout.engine
        self.temperature = temperature if temperature > 0 else 1.0
        self.scored = 0

    def score(self, tree: TrajectoryTree) -> TrajectoryTree:
        self.scored += 1
        return score_tree(self.engine.score, tree, self.temperature)
