import numpy as np
import pytest

from rayrl.algo.distill import distill_advantages, domain_reverse_kl, reverse_kl


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


def test_domain_mean_reverse_kl_centres_the_advantages():
    groups = [{"domain": "swe", "reverse_kl_sum": 3.0, "teacher_tokens": 2},
              {"domain": "swe", "reverse_kl_sum": 1.0, "teacher_tokens": 2},
              {"domain": "general", "reverse_kl_sum": -0.5, "teacher_tokens": 1},
              {"domain": "terminal", "reverse_kl_sum": 0.0, "teacher_tokens": 0}]   # not scored: no entry
    kl = domain_reverse_kl(groups)
    assert kl == pytest.approx({"swe": 1.0, "general": -0.5})
    student, teacher, mask = np.array([-0.5, -1.0, -3.0]), np.array([-2.0, -1.5, -3.0]), np.array([1, 1, 0])
    adv = distill_advantages(student, teacher, mask, kl_mean=kl["swe"])
    # by hand: -(−0.5 + 2.0 − 1.0) = −0.5; -(−1.0 + 1.5 − 1.0) = 0.5; masked 0
    assert adv.tolist() == pytest.approx([-0.5, 0.5, 0.0])
    # over a domain's batch the centred advantages average to zero on its scored tokens
    s, t = np.array([-1.0, -0.2, -2.0, -0.7]), np.array([-1.5, -1.0, -0.5, -0.9])
    m = np.ones(4)
    centred = distill_advantages(s, t, m, kl_mean=reverse_kl(s, t, m))
    assert centred.mean() == pytest.approx(0.0, abs=1e-6)
