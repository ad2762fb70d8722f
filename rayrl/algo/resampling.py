"""Which prompts and groups carry a GRPO learning signal: SRPO's History Resampling and DAPO's
dynamic sampling, as pure functions over group outcomes.

A group whose samples all got the same reward has zero advantage everywhere, so it adds nothing
to the gradient but dilutes the batch. Two remedies:

- **DAPO dynamic sampling** (per step): drop every zero-variance group (all wrong or all correct)
  when it arrives and over-sample to refill the step (`keep_group`). Its rollouts are paid for
  and thrown away.
- **SRPO History Resampling** (per epoch): keep a record of every prompt's group outcomes; at each
  epoch boundary drop the prompts whose latest group was all correct (too easy: they will most
  likely stay solved) and keep the mixed and all-wrong ones (all-wrong prompts are hard, not
  useless: they may become solvable as the policy improves) (`next_epoch`). Solved prompts are
  never rolled out again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from rayrl.algo.advantages import is_zero_variance

ALL_CORRECT, ALL_WRONG, MIXED, UNGRADED = "all_correct", "all_wrong", "mixed", "ungraded"


def valid_rewards(rewards: Iterable[float | None]) -> list[float]:
    """The graded rewards of a group (None: infrastructure failure or not graded; NaN: same)."""
    return [float(r) for r in rewards if r is not None and not math.isnan(r)]


def group_outcome(rewards: Iterable[float | None], success: float = 1.0) -> str:
    """all_correct | all_wrong | mixed over the group's valid rewards (a sample is correct at
    `success` or above); ungraded when none is valid."""
    valid = valid_rewards(rewards)
    if not valid:
        return UNGRADED
    correct = sum(r >= success for r in valid)
    if correct == len(valid):
        return ALL_CORRECT
    return ALL_WRONG if correct == 0 else MIXED


def keep_group(rewards: Iterable[float | None]) -> bool:
    """DAPO dynamic sampling: a group enters a batch only if its rewards differ."""
    return not is_zero_variance(list(rewards))


def next_epoch(active: Sequence[str], latest: Mapping[str, str]) -> list[str]:
    """History Resampling at an epoch boundary: the prompts of the next epoch, in `active`'s order.

    `latest` maps a prompt to the outcome of its most recently graded group; a prompt without one
    (still in flight, or its groups failed for infrastructure reasons) is kept, as there is no
    evidence that it is solved.
    """
    return [p for p in active if latest.get(p) != ALL_CORRECT]


def effective_fraction(groups: Iterable[Sequence[float | None]]) -> float:
    """Share of the valid samples that have a non-zero GRPO advantage, i.e. that belong to a group
    with differing rewards (0.0 for no samples)."""
    total = useful = 0
    for rewards in groups:
        valid = valid_rewards(rewards)
        total += len(valid)
        useful += len(valid) if keep_group(valid) else 0
    return useful / total if total else 0.0
