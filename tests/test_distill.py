import numpy as np
import pytest

from rayrl.algo.distill import distill_advantages, reverse_kl


def test_per_token_advantage_is_the_negative_log_ratio_on_sampled_tokens():
    student = np.array([-0.1, -2.0, -0.5, -1.0])
    teacher = np.array([-0.3, -0.5, -0.5, -4.0])
    mask = np.array([0, 1, 1, 1])
    adv = distill_advantages(student, teacher, mask)
    # by hand: token 0 masked; -(−2.0 − −0.5) = 1.5; 0; -(−1.0 − −4.0) = −3.0
    assert adv.tolist() == pytest.approx([0.0, 1.5, 0.0, -3.0])
    assert adv.dtype == np.float32


def test_environment_advantage_is_added_with_its_weight():
    adv = distill_advantages(np.array([-1.0, -1.0]), np.array([-1.0, -2.0]), np.array([1, 1]),
                             rl_advantage=2.0, rl_weight=0.25)
    assert adv.tolist() == pytest.approx([0.5, -0.5])


def test_reverse_kl_and_misaligned_inputs():
    assert reverse_kl(np.array([-1.0, -0.5, -9.0]), np.array([-2.0, -0.5, 0.0]), np.array([1, 1, 0])) == pytest.approx(0.5)
    assert reverse_kl(np.zeros(2), np.zeros(2), np.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="align"):
        distill_advantages(np.zeros(3), np.zeros(2), np.ones(3))
