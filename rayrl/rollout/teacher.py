"""Teacher: a frozen expert served by an engine in scoring mode (on-policy distillation).

It adds to a student's tree the teacher's log-prob of every token, computed on the student's own
prefixes; the learner turns the difference into per-token advantages (rayrl.algo.distill). With
`topk` it also adds, at every position, the teacher's k likeliest tokens and their log-probs, the
target of top-k distillation (`distill.topk`).
"""

from __future__ import annotations

import numpy as np

from rayrl.tree import LOGPROB_DTYPE, TOKEN_DTYPE, TrajectoryTree


def score_tree(score, tree: TrajectoryTree, temperature: float = 1.0, topk: int = 0) -> TrajectoryTree:
    """Fill `teacher_logprobs` (and with `topk` the top-k fields) of every node;
    `score(prompts, continuations, temperature, topk)` is an engine's scoring call (`Engine.score`). One scored
    sequence per leaf; a node shared by several paths gets the same values from each (same prefix),
    the root (the prompt) gets zeros."""
    root = tree.nodes[0]
    leaves = tree.leaves()
    chains = [tree.ancestry(leaf)[1:] for leaf in leaves]
    continuations = [np.concatenate([tree.nodes[i].tokens for i in chain]) if chain else np.zeros(0, np.int32)
                     for chain in chains]
    scored = score([root.tokens] * len(leaves), continuations, temperature, topk)
    root.teacher_logprobs = np.zeros(len(root), LOGPROB_DTYPE)
    if topk:
        root.teacher_topk_ids = np.zeros((len(root), topk), TOKEN_DTYPE)
        root.teacher_topk_logprobs = np.zeros((len(root), topk), LOGPROB_DTYPE)
    for chain, values in zip(chains, scored):
        values, top_ids, top_logprobs = values if topk else (values, None, None)
        start = 0
        for i in chain:
            node, cut = tree.nodes[i], slice(start, start + len(tree.nodes[i]))
            node.teacher_logprobs = np.asarray(values[cut], LOGPROB_DTYPE)
            if topk:
                node.teacher_topk_ids = np.asarray(top_ids[cut], TOKEN_DTYPE)
                node.teacher_topk_logprobs = np.asarray(top_logprobs[cut], LOGPROB_DTYPE)
            start += len(node)
    return tree


class Teacher:
    """Ray actor shell: `ray.remote(Teacher).remote(path)`; `score(tree)` returns the tree scored."""

    def __init__(self, model_path: str, temperature: float = 1.0, max_batch: int = 64, torch_threads: int = 1,
                 engine: str = "torch", topk: int = 0):
        import torch

        from rayrl.rollout.engine import create_engine
        torch.set_num_threads(torch_threads)
        self.engine = create_engine(engine, model_path, max_batch=max_batch)   # rollout.engine
        if topk > self.engine.vocab_size:
            raise ValueError(f"distill.topk={topk} exceeds the vocabulary of the teacher {model_path} "
                             f"({self.engine.vocab_size} tokens)")
        self.temperature = temperature if temperature > 0 else 1.0
        self.topk = topk
        self.scored = 0

    def score(self, tree: TrajectoryTree) -> TrajectoryTree:
        self.scored += 1
        return score_tree(self.engine.score, tree, self.temperature, self.topk)
