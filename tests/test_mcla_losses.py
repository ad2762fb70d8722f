"""Loss options beside the token-level ratio: sequence-level (GSPO) and turn-level ratios, and the
MCLA estimate of pi_old in the off-policy weight. Expected numbers are worked out by hand."""

import math

import pytest
import torch

from rayrl.algo.losses import policy_token_loss, segment_ids
from rayrl.config import LossConfig

F64 = torch.float64


def tensors(log_ratios, mask, log_rhos=None, advantage=1.0):
    """logprobs [1, T] with log(pi_theta/pi_old) = log_ratios and log(pi_old/pi_b) = log_rhos."""
    lr = torch.tensor([log_ratios], dtype=F64)
    old = torch.full_like(lr, math.log(0.3))
    logprobs = (old + lr).requires_grad_(True)
    rho = torch.tensor([log_rhos if log_rhos is not None else [0.0] * len(log_ratios)], dtype=F64)
    return logprobs, old, old - rho, torch.full_like(lr, advantage), torch.tensor([mask], dtype=F64)


def run(level, log_ratios, mask, log_rhos=None, advantage=1.0, **cfg):
    logprobs, old, behaviour, adv, m = tensors(log_ratios, mask, log_rhos, advantage)
    loss_cfg = LossConfig(ratio_level=level, **{"off_policy": "none", **cfg})
    loss, stats = policy_token_loss(logprobs, old, behaviour, adv, m, loss_cfg)
    loss.sum().backward()
    return loss.detach()[0], logprobs.grad[0], stats


def test_segments_of_a_sequence_and_of_its_turns():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 1]])
    assert segment_ids(mask, "sequence").tolist() == [[-1, 0, 0, -1, 0, -1], [1, -1, -1, 1, 1, 1]]
    assert segment_ids(mask, "turn").tolist() == [[-1, 0, 0, -1, 1, -1], [2, -1, -1, 3, 3, 3]]


def test_sequence_level_ratio_is_the_geometric_mean_and_its_gradient_reaches_every_token():
    a, b = math.log(1.2), math.log(0.9)
    loss, grad, _ = run("sequence", [a, b, 5.0], [1, 1, 0], level_eps_low=0.5, level_eps_high=0.5)
    s = math.sqrt(1.2 * 0.9)
    torch.testing.assert_close(loss, torch.tensor([-s, -s, 0.0], dtype=F64))
    # Each token's loss -s depends on both log-ratios through s = exp(mean): d(-s)/dlogprob_t = -s/2,
    # summed over the two tokens that carry it.
    torch.testing.assert_close(grad, torch.tensor([-s, -s, 0.0], dtype=F64))


def test_sequence_level_clips_with_the_small_gspo_range():
    loss, grad, stats = run("sequence", [math.log(1.2), math.log(0.9)], [1, 1])   # s = 1.039 > 1 + 4e-4
    torch.testing.assert_close(loss, torch.tensor([-1.0004, -1.0004], dtype=F64))
    assert grad.abs().max() == 0 and stats["clip_frac"].item() == 1.0


def test_turn_level_ratio_per_run_of_sampled_tokens():
    a, b, c = math.log(1.1), math.log(1.3), math.log(0.95)
    loss, _, _ = run("turn", [a, b, 7.0, c], [1, 1, 0, 1], level_eps_low=0.5, level_eps_high=0.5)
    turn1 = math.sqrt(1.1 * 1.3)
    torch.testing.assert_close(loss, torch.tensor([-turn1, -turn1, 0.0, -0.95], dtype=F64))


def test_one_token_segments_reduce_to_the_token_level():
    args = ([math.log(1.5), 0.0, math.log(0.7)], [1, 0, 1], [math.log(3.0), 0.0, math.log(0.4)])
    token = run("token", *args, off_policy="tis")
    turn = run("turn", *args, off_policy="tis", level_eps_low=0.2, level_eps_high=0.28)
    torch.testing.assert_close(turn[0], token[0])
    torch.testing.assert_close(turn[1], token[1])


def test_icepop_at_sequence_level_masks_whole_sequences_by_their_geometric_mean():
    # rho = [3, 1]: the token level masks the first token; the sequence's mean sqrt(3) is inside [0.5, 2].
    token = run("token", [0.0, 0.0], [1, 1], [math.log(3.0), 0.0], off_policy="icepop")
    seq = run("sequence", [0.0, 0.0], [1, 1], [math.log(3.0), 0.0], off_policy="icepop")
    assert token[2]["is_masked_frac"].item() == 0.5 and seq[2]["is_masked_frac"].item() == 0.0
    assert seq[0].tolist() == [-1.0, -1.0]
    seq = run("sequence", [0.0, 0.0], [1, 1], [math.log(3.0), math.log(2.0)], off_policy="icepop")
    assert seq[2]["is_masked_frac"].item() == 1.0 and seq[0].tolist() == [0.0, 0.0]


def test_mismatch_kl_stays_a_token_level_estimate():
    _, _, token = run("token", [0.0, 0.0], [1, 1], [math.log(3.0), math.log(1 / 3)])
    _, _, seq = run("sequence", [0.0, 0.0], [1, 1], [math.log(3.0), math.log(1 / 3)])
    # k3 per token: (3 - 1 - ln 3 + 1/3 - 1 + ln 3) / 2; the sequence's mean log-ratio is 0
    assert seq["mismatch_kl"].item() == pytest.approx(token["mismatch_kl"].item()) == pytest.approx(2 / 3)
    assert seq["is_weight_mean"].item() == pytest.approx(1.0)   # the sequence's weight: sqrt(3 * 1/3)


def test_mcla_estimate_replaces_pi_old_in_the_weight_only():
    logprobs, old, behaviour, adv, mask = tensors([0.0, 0.0], [1, 1], [math.log(3.0), math.log(3.0)])
    mcla_old = behaviour + math.log(1.5)   # the K-pass mean puts pi_old at 1.5 pi_b
    loss, stats = policy_token_loss(logprobs, old, behaviour, adv, mask, LossConfig(off_policy="decoupled"),
                                    is_logprobs=mcla_old)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)          # r keeps its exact denominator
    assert stats["is_weight_mean"].item() == pytest.approx(1.5)      # rho from the estimate, not 3
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.5, -1.5]], dtype=F64))
