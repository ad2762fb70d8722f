"""Expected numbers below are worked out by hand from the formulas in DESIGN.md (eps_low 0.2,
eps_high 0.28, so r is clipped to [0.8, 1.28]; tis_cap 2; icepop keeps rho in [0.5, 2])."""

import math

import pytest
import torch

from rayrl.algo.losses import aggregate, policy_token_loss, sft_token_loss
from rayrl.config import LossConfig

F64 = torch.float64


def cfg(mode="none", **kw):
    return LossConfig(eps_low=0.2, eps_high=0.28, off_policy=mode, tis_cap=2.0,
                      icepop_low=0.5, icepop_high=2.0, **kw)


def make(ratios, rhos, advantages, p_old=0.4, mask=None):
    """Log-prob tensors [B, T] with pi_theta/pi_old = ratios and pi_old/pi_b = rhos."""
    r, rho = torch.tensor(ratios, dtype=F64), torch.tensor(rhos, dtype=F64)
    old = torch.full_like(r, math.log(p_old))
    logprobs = (old + r.log()).requires_grad_(True)
    behaviour = old - rho.log()
    adv = torch.tensor(advantages, dtype=F64)
    mask = torch.ones_like(r) if mask is None else torch.tensor(mask, dtype=F64)
    return logprobs, old, behaviour, adv, mask


def run(mode, ratios, rhos, advantages, mask=None):
    logprobs, old, behaviour, adv, mask = make(ratios, rhos, advantages, mask=mask)
    loss, stats = policy_token_loss(logprobs, old, behaviour, adv, mask, cfg(mode))
    loss.sum().backward()
    return loss.detach(), logprobs.grad, stats


def test_topk_distill_loss_is_the_forward_kl_to_the_teachers_top_k():
    from rayrl.algo.losses import topk_distill_token_loss
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11).log_softmax(-1), torch.randn(2, 3, 11).log_softmax(-1)
    # k = the vocabulary: exactly KL(teacher || student) per position
    expected = (teacher.exp() * (teacher - student)).sum(-1)
    torch.testing.assert_close(topk_distill_token_loss(student, teacher), expected)
    # top-k: the teacher renormalised over its k tokens, the student's log-probs of those tokens
    top = teacher.topk(4, dim=-1)
    renormalised = top.values.log_softmax(-1)
    picked = student.gather(-1, top.indices)
    torch.testing.assert_close(topk_distill_token_loss(picked, top.values),
                               (renormalised.exp() * (renormalised - picked)).sum(-1))
    # the gradient reaches the student only, and vanishes where the student is the teacher
    logits = teacher.clone().requires_grad_(True)
    topk_distill_token_loss(logits.log_softmax(-1), teacher).sum().backward()
    assert logits.grad.abs().max() < 1e-6


def test_sft_token_loss():
    assert torch.equal(sft_token_loss(torch.tensor([[-0.5, -2.0], [0.0, -1.25]])),
                       torch.tensor([[0.5, 2.0], [0.0, 1.25]]))


# (r, A, token loss, d loss / d logprob): positive and negative advantages, with r below, inside
# and above the clip range [0.8, 1.28]. The gradient is -r*A where the unclipped term is the
# minimum and 0 where the clipped (constant) term is.
CLIP_CASES = [
    (1.2, 1.0, -1.2, -1.2),    # inside
    (1.5, 1.0, -1.28, 0.0),    # above, A > 0: clipped, no incentive to push r further
    (0.5, 1.0, -0.5, -0.5),    # below, A > 0: pessimistic unclipped term, gradient kept
    (1.2, -2.0, 2.4, 2.4),     # inside, A < 0
    (1.5, -1.0, 1.5, 1.5),     # above, A < 0: unclipped term, gradient kept
    (0.5, -1.0, 0.8, 0.0),     # below, A < 0: clipped
    (1.0, 0.5, -0.5, -0.5),    # on-policy
]


def test_clipped_surrogate_both_sides_of_the_clip_range():
    r, a, want_loss, want_grad = zip(*CLIP_CASES)
    loss, grad, stats = run("none", [r], [[1.0] * len(r)], [a])
    torch.testing.assert_close(loss, torch.tensor([want_loss], dtype=F64))
    torch.testing.assert_close(grad, torch.tensor([want_grad], dtype=F64))
    assert stats["clip_frac"].item() == pytest.approx(2 / 7)


# Two rows: row 0 has r = 1.2, A = +1 (surrogate -1.2 everywhere, inside the range); row 1 has
# r = [0.5, 1.5, 1.2, 1.0], A = -1 (surrogate [0.8 clipped, 1.5, 1.2, 1.0]).
# rho = pi_old/pi_b = [1.5, 3.0, 0.25, 1.0] in both rows, so the weights are
#   none      [1, 1, 1, 1]
#   decoupled [1.5, 3, 0.25, 1]
#   tis       [1.5, 2, 0.25, 1]       (capped at 2)
#   icepop    [1, 0, 0, 1]            (3 > 2 and 0.25 < 0.5 are masked)
OFF_POLICY_CASES = {
    "none": ([[-1.2, -1.2, -1.2, -1.2], [0.8, 1.5, 1.2, 1.0]],
             [[-1.2, -1.2, -1.2, -1.2], [0.0, 1.5, 1.2, 1.0]]),
    "decoupled": ([[-1.8, -3.6, -0.3, -1.2], [1.2, 4.5, 0.3, 1.0]],
                  [[-1.8, -3.6, -0.3, -1.2], [0.0, 4.5, 0.3, 1.0]]),
    "tis": ([[-1.8, -2.4, -0.3, -1.2], [1.2, 3.0, 0.3, 1.0]],
            [[-1.8, -2.4, -0.3, -1.2], [0.0, 3.0, 0.3, 1.0]]),
    "icepop": ([[-1.2, 0.0, 0.0, -1.2], [0.8, 0.0, 0.0, 1.0]],
               [[-1.2, 0.0, 0.0, -1.2], [0.0, 0.0, 0.0, 1.0]]),
}


@pytest.mark.parametrize("mode", list(OFF_POLICY_CASES))
def test_off_policy_weights(mode):
    want_loss, want_grad = OFF_POLICY_CASES[mode]
    rho = [1.5, 3.0, 0.25, 1.0]
    loss, grad, stats = run(mode, [[1.2] * 4, [0.5, 1.5, 1.2, 1.0]], [rho, rho],
                            [[1.0] * 4, [-1.0] * 4])
    torch.testing.assert_close(loss, torch.tensor(want_loss, dtype=F64))
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=F64))
    # is_masked_frac is reported in every mode: 4 of the 8 tokens have rho outside [0.5, 2].
    assert stats["is_masked_frac"].item() == pytest.approx(0.5)


def test_icepop_bounds_are_inclusive():
    logprobs = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=F64)  # pi_old = 1, so rho = 1/pi_b exactly
    behaviour = torch.tensor([[math.log(2.0), -math.log(2.0), -math.log(2.5)]], dtype=F64)
    loss, stats = policy_token_loss(logprobs, old, behaviour, torch.ones(1, 3, dtype=F64),
                                    torch.ones(1, 3, dtype=F64), cfg("icepop"))
    # rho = [0.5, 2, 2.5]: the bounds are kept, 2.5 is dropped
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.0, 0.0]], dtype=F64))
    assert stats["is_masked_frac"].item() == pytest.approx(1 / 3)


def test_stats_on_a_hand_example():
    # The 4th token is padding with wild values that must not leak into any statistic.
    loss, _, stats = run("decoupled", [[1.2, 1.5, 0.5, 50.0]], [[0.25, 1.0, 3.0, 100.0]],
                         [[1.0, 1.0, -1.0, 7.0]], mask=[[1, 1, 1, 0]])
    assert loss[0, 3].item() == 0.0
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)       # r=1.5,A>0 and r=0.5,A<0
    assert stats["ratio_mean"].item() == pytest.approx(3.2 / 3)    # (1.2 + 1.5 + 0.5) / 3
    assert stats["is_weight_mean"].item() == pytest.approx(4.25 / 3)  # (0.25 + 1 + 3) / 3
    assert stats["is_weight_max"].item() == pytest.approx(3.0)
    assert stats["is_masked_frac"].item() == pytest.approx(2 / 3)  # 0.25 and 3 are outside
    # k3: (rho - 1 - ln rho) = 0.25-1+1.3862943611 = 0.6362943611, 0, 3-1-1.0986122887 = 0.9013877113
    assert stats["mismatch_kl"].item() == pytest.approx(0.5125606908172603)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_padding_cannot_produce_nan():
    # float32 padding with log-ratio 200 would overflow exp() to inf, and inf * 0 is NaN.
    logprobs = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -200.0]])
    behaviour = torch.tensor([[-1.0, 150.0]])
    loss, stats = policy_token_loss(logprobs, old, behaviour, torch.ones(1, 2), torch.tensor([[1.0, 0.0]]),
                                    cfg("decoupled"))
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.tensor([[-1.0, 0.0]]))
    assert torch.equal(logprobs.grad, torch.tensor([[-1.0, 0.0]]))
    assert all(torch.isfinite(v) for v in stats.values())


def test_gradient_flows_only_through_logprobs():
    logprobs, old, behaviour, adv, mask = make([[1.1, 0.9]], [[1.2, 0.8]], [[1.0, -1.0]])
    for t in (old, behaviour, adv):
        t.requires_grad_(True)
    loss, _ = policy_token_loss(logprobs, old, behaviour, adv, mask, cfg("decoupled"))
    loss.sum().backward()
    assert logprobs.grad is not None and bool((logprobs.grad != 0).all())
    assert old.grad is None and behaviour.grad is None and adv.grad is None


def test_gradient_matches_autograd_formula_on_random_tokens():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 9
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logprobs = (old + (torch.rand(B, T, generator=g, dtype=F64) - 0.5) * 0.8).requires_grad_(True)
    behaviour = old + (torch.rand(B, T, generator=g, dtype=F64) - 0.5) * 1.5
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(F64)
    loss, _ = policy_token_loss(logprobs, old, behaviour, adv, mask, cfg("tis"))
    loss.sum().backward()
    r = (logprobs - old).exp().detach()
    w = (old - behaviour).exp().clamp(max=2.0)
    clipped = ((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8))
    want = torch.where(clipped, 0.0, -w * r * adv) * mask
    torch.testing.assert_close(logprobs.grad, want)


def test_unknown_modes_raise():
    logprobs, old, behaviour, adv, mask = make([[1.0]], [[1.0]], [[1.0]])
    with pytest.raises(ValueError, match="'ppo'"):
        policy_token_loss(logprobs, old, behaviour, adv, mask, cfg("ppo"))
    with pytest.raises(ValueError, match="'sum'"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "sum", 1, 1)
    with pytest.raises(ValueError, match="constant"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "constant", 1, 1, constant=0.0)


# -- aggregation -------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 2: no sampled token


def test_aggregate_hand_values():
    # masked sum = 1 + 2 + 4 = 7 over 3 tokens and 3 sequences
    assert aggregate(LOSS, MASK, "token_mean", 3, 3).item() == pytest.approx(7 / 3)
    # per-sequence means 1.5, 4, 0 (empty sequence) averaged over 3 sequences
    assert aggregate(LOSS, MASK, "seq_mean", 3, 3).item() == pytest.approx(5.5 / 3)
    assert aggregate(LOSS, MASK, "constant", 3, 3, constant=4.0).item() == pytest.approx(7 / 12)


def _random_batch(seed, B=13, T=17):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    starts = torch.randint(0, 4, (B,), generator=g)  # a prompt prefix that is not in the loss
    pos = torch.arange(T)
    mask = ((pos >= starts[:, None]) & (pos < lengths[:, None])).to(F64)
    return torch.randn(B, T, generator=g, dtype=F64), mask, lengths, g


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "constant"])
def test_micro_batch_split_sums_to_full_batch(seed, mode):
    loss, mask, lengths, g = _random_batch(seed)
    B = loss.shape[0]
    num_tokens, num_seqs = mask.sum().item(), B
    full = aggregate(loss, mask, mode, num_tokens, num_seqs, constant=8.0)
    # the definitions, computed directly on the whole batch
    if mode == "token_mean":
        direct = loss[mask > 0].mean()
    elif mode == "seq_mean":
        direct = torch.stack([loss[b][mask[b] > 0].mean() if mask[b].any() else loss.new_zeros(())
                              for b in range(B)]).mean()
    else:
        direct = loss[mask > 0].sum() / (B * 8.0)
    torch.testing.assert_close(full, direct)
    # shuffle the sequences, cut them into random micro-batches, re-pad each to its own length
    order = torch.randperm(B, generator=g)
    cuts = sorted(torch.randperm(B - 1, generator=g)[:3].add(1).tolist())
    total = torch.zeros((), dtype=F64)
    for chunk in torch.tensor_split(order, cuts):
        width = max(int(lengths[chunk].max()), 1)
        total = total + aggregate(loss[chunk, :width], mask[chunk, :width], mode,
                                  num_tokens, num_seqs, constant=8.0)
    torch.testing.assert_close(total, full)


def test_micro_batch_gradients_sum_to_full_batch_gradient():
    _, mask, _, g = _random_batch(7)
    B, T = mask.shape
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    base = old + (torch.rand(B, T, generator=g, dtype=F64) - 0.5) * 0.6
    behaviour = old + (torch.rand(B, T, generator=g, dtype=F64) - 0.5) * 0.6
    adv = torch.randn(B, 1, generator=g, dtype=F64).expand(B, T)  # GRPO: one value per sequence
    num_tokens = mask.sum().item()

    def grad(rows_list):
        logprobs = base.clone().requires_grad_(True)
        for rows in rows_list:
            loss, _ = policy_token_loss(logprobs[rows], old[rows], behaviour[rows], adv[rows],
                                        mask[rows], cfg("decoupled"))
            aggregate(loss, mask[rows], "token_mean", num_tokens, B).backward()
        return logprobs.grad

    full = grad([torch.arange(B)])
    split = grad(list(torch.tensor_split(torch.randperm(B, generator=g), [2, 5, 11])))
    assert full.abs().sum() > 0
    torch.testing.assert_close(split, full)
