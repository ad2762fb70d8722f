"""Learning-rate schedules (rayrl.algo.schedule) and their config keys."""

import math

import pytest

from rayrl.algo.schedule import lr_at
from rayrl.config import ConfigError, GRPOConfig, load


def test_constant_is_the_peak_after_the_warmup():
    rates = [lr_at(s, 100, 2e-3, "constant", warmup=10) for s in range(1, 101)]
    assert rates[:10] == pytest.approx([2e-3 * s / 10 for s in range(1, 11)])
    assert set(rates[10:]) == {2e-3}


def test_cosine_falls_from_the_peak_to_the_floor():
    rates = [lr_at(s, 100, 1.0, "cosine", warmup=10, final_ratio=0.05) for s in range(1, 101)]
    assert rates[9] == rates[10] == 1.0                          # warm-up ends at the peak, decay starts there
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))   # then never rises
    assert rates[-1] == pytest.approx(0.05)
    assert rates[55] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_a_short_run_warms_up_over_a_tenth_of_its_steps():
    assert lr_at(1, 3, 1.0, "cosine", warmup=10) == 1.0          # 3 steps: no warm-up, starts at the peak
    assert lr_at(1, 50, 1.0, "constant", warmup=10) == pytest.approx(0.2)   # 5 warm-up steps


def test_bad_arguments_name_the_cause():
    with pytest.raises(ValueError, match="linear"):
        lr_at(1, 10, 1.0, "linear")
    with pytest.raises(ValueError, match="step 0"):
        lr_at(0, 10, 1.0)
    with pytest.raises(ConfigError, match="trainer.sft.schedule='step'"):
        load(GRPOConfig, None, ["trainer.sft.schedule=step"])
    with pytest.raises(ConfigError, match="trainer.sft.warmup_steps=-1"):
        load(GRPOConfig, None, ["trainer.sft.warmup_steps=-1"])
