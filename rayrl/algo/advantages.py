"""Group-relative advantages (GRPO, Dr.GRPO) computed from the rewards of one prompt group.

A trajectory tree is one group: every root-to-leaf path is one sample and its leaf holds the
reward. Leaves that failed for an infrastructure reason (sandbox died, harness timeout) or that
have no reward carry no information about the policy, so they neither receive an advantage nor
shift the group's baseline.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from rayrl.tree import TrajectoryTree

MODES = ("grpo", "dr_grpo")


def group_advantages(rewards: np.ndarray, mode: str = "grpo", eps: float = 1e-6) -> np.ndarray:
    """Advantages of one group of rewards, as float64.

    grpo:    A_i = (R_i - mean R) / (std R + eps), std the population std (ddof=0), as in the
             GRPO/DeepSeekMath reference implementations; a constant group gives all zeros.
    dr_grpo: A_i = R_i - mean R (Dr.GRPO: dividing by the std up-weights low-variance groups,
             i.e. too easy or too hard prompts).
    """
    if mode not in MODES:
        raise ValueError(f"advantage mode {mode!r} is not one of {', '.join(MODES)}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0 or r.max() == r.min():
        # exactly zero: r - mean(r) of a constant group is rounding noise that /eps would amplify
        return np.zeros_like(r)
    centred = r - r.mean()
    if mode == "dr_grpo":
        return centred
    return centred / (r.std(ddof=0) + eps)


def _valid_rewards(tree: TrajectoryTree) -> tuple[list[int], list[int], np.ndarray]:
    """(leaves, valid leaves, their rewards): valid = graded and no infrastructure failure."""
    leaves = tree.leaves()
    valid = [i for i in leaves
             if tree.nodes[i].reward is not None and not tree.nodes[i].infra_failure]
    return leaves, valid, np.array([tree.nodes[i].reward for i in valid], dtype=np.float64)


def assign_advantages(tree: TrajectoryTree, mode: str = "grpo", eps: float = 1e-6) -> None:
    """Set `advantage` on every leaf of `tree` from the group's valid rewards (in place).

    Invalid leaves (infra_failure or reward None) get 0.0 and are left out of mean and std, so a
    crashed sandbox does not move the baseline of the samples that did run.
    """
    leaves, valid, rewards = _valid_rewards(tree)
    advantages = dict(zip(valid, group_advantages(rewards, mode, eps).tolist()))
    for i in leaves:
        tree.nodes[i].advantage = advantages.get(i, 0.0)


def is_zero_variance(rewards: Iterable[float | None] | TrajectoryTree) -> bool:
    """True when all valid rewards are equal (no GRPO learning signal); also when < 2 are valid.

    `rewards` is a sequence (None and NaN entries are ignored) or a tree (its graded leaves
    without infra_failure are used).
    """
    if isinstance(rewards, TrajectoryTree):
        values = _valid_rewards(rewards)[2]
    else:
        values = np.array([r for r in rewards if r is not None], dtype=np.float64)
        values = values[~np.isnan(values)]
    return values.size < 2 or bool(values.max() == values.min())
