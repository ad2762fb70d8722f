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
  not rolled out again, except under a floor on the active set: on a small prompt set the set
  otherwise narrows to a few prompts the policy cannot solve, and training on those alone
  collapses it (measured on 64 arithmetic prompts: 2 left after 56 steps, training reward
  0.6 -> 0.02, held-out 0.8 -> 0.52). Below the floor the prompts dropped longest ago come back.

Before either, a finite prompt set can be curated offline (`curate`): a few samples per prompt from
the starting policy, and the prompts it never solves (or always solves) leave the set, the data
filtering by pass rate that RL recipes run before training. Its never-solved prompts would
otherwise give all-wrong groups, epoch after epoch, that History Resampling keeps by design.
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


def next_epoch(active: Sequence[str], latest: Mapping[str, str], dropped: Sequence[str] = (),
               min_active: int = 0) -> tuple[list[str], list[str]]:
    """History Resampling at an epoch boundary: (the prompts of the next epoch, the dropped ones).

    `latest` maps a prompt to the outcome of its most recently graded group; a prompt without one
    (still in flight, or its groups failed for infrastructure reasons) is kept, as there is no
    evidence that it is solved. `dropped` are the prompts dropped at earlier boundaries, oldest
    first; the newly solved ones join its end. With fewer than `min_active` prompts left, the
    oldest dropped ones come back (their solution is the likeliest to have been forgotten).
    """
    kept = [p for p in active if latest.get(p) != ALL_CORRECT]
    dropped = [*dropped, *(p for p in active if latest.get(p) == ALL_CORRECT)]
    back = max(min_active - len(kept), 0)
    return kept + dropped[:back], dropped[back:]


CURATE_DROPS = {"unsolved": ("unsolved",), "solved": ("solved",), "both": ("unsolved", "solved")}


def curate(samples: Mapping[str, Iterable[float | None]], drop: str = "unsolved", success: float = 1.0,
           min_pass: float = 0.0) -> tuple[list[str], dict[str, int]]:
    """Offline difficulty filter: (the prompts kept, in order; counts by why) from each prompt's
    sampled rewards. `drop`: unsolved (at most `min_pass` of the samples correct; 0: none),
    solved (every sample correct) or both. A prompt with no valid sample (the infrastructure
    failed under all of them) is kept: there is no evidence against it."""
    if drop not in CURATE_DROPS:
        raise ValueError(f"curate drop={drop!r} is not one of {', '.join(CURATE_DROPS)}")
    kept, counts = [], {"kept": 0, "kept_ungraded": 0, "dropped_unsolved": 0, "dropped_solved": 0}
    for prompt, rewards in samples.items():
        valid = valid_rewards(rewards)
        rate = sum(r >= success for r in valid) / len(valid) if valid else None
        why = None if rate is None else ("unsolved" if rate <= min_pass else "solved" if rate == 1.0 else None)
        if why and why in CURATE_DROPS[drop]:
            counts[f"dropped_{why}"] += 1
            continue
        kept.append(prompt)
        counts["kept"] += 1
        counts["kept_ungraded"] += rate is None
    return kept, counts


def effective_fraction(groups: Iterable[Sequence[float | None]]) -> float:
    """Share of the valid samples that have a non-zero GRPO advantage, i.e. that belong to a group
    with differing rewards (0.0 for no samples)."""
    total = useful = 0
    for rewards in groups:
        valid = valid_rewards(rewards)
        total += len(valid)
        useful += len(valid) if keep_group(valid) else 0
    return useful / total if total else 0.0
