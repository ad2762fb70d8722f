"""Learning-rate schedules, as pure functions of the step."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, steps: int, peak: float, schedule: str = "constant", warmup: int = 0,
          final_ratio: float = 0.0) -> float:
    """The learning rate of update `step` (1-based) of `steps`: a linear warm-up over the first
    `warmup` updates (at most a tenth of `steps`, so that a short run still trains at its peak),
    then `constant` at `peak` or `cosine` from `peak` down to `final_ratio * peak` at the last update.

    Why a schedule for SFT: a fresh Adam moves every parameter by about lr on its first updates,
    and a constant rate leaves the model bouncing around the minimum. Measured on the tiny model's
    five-domain mixture (batch 32, peak 3e-3): constant, 300 updates: held-out 0.30, and 1000: 0.68
    then 0.47 at 1200; 20 warm-up updates and a cosine to 600: 0.685 at update 300, 0.855 at 600.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if step < 1:
        raise ValueError(f"step {step} is not >= 1")
    warmup = min(warmup, steps // 10)
    if warmup and step <= warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup - 1) / max(steps - warmup - 1, 1)   # 0 after the warm-up, 1 at the last update
    low = final_ratio * peak
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
