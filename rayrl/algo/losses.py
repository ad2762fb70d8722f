"""Token-level policy losses: clipped surrogate with off-policy corrections, and aggregation.

Every tensor is a padded per-path batch [B, T] in which position t already holds the log-prob of
token t. `mask` (float, 1 = model-sampled token of the path, 0 = prompt / observation / padding)
marks the tokens that count. Three policies appear:

    pi_theta   `logprobs`            the policy being trained (the only input with a gradient)
    pi_old     `old_logprobs`        the proximal policy at the start of this update
    pi_b       `behaviour_logprobs`  the engine that sampled, possibly several versions stale

The surrogate clips r = pi_theta / pi_old; the off-policy weight uses rho = pi_old / pi_b
(AReaL's decoupled PPO splits the two so that a stale behaviour policy does not widen the trust
region). Losses are returned per token and aggregated separately, so that micro-batching, data
parallelism and Tree Training can split a batch without changing the loss.

Ratio levels (`cfg.ratio_level`): `token` uses r_t and rho_t as they are; `sequence` (GSPO) and
`turn` replace them, on every token of a segment, by the geometric mean over the segment's
sampled tokens, s = exp(mean_t log r_t) (the same for rho), clipped with the small
level_eps_low/high. The gradient of s flows to every token of its segment, so with `seq_mean`
aggregation the sequence level is GSPO's objective. A turn is a maximal run of sampled tokens
(loss mask 1) of a path: agent turns are separated by observation tokens.

MCLA: `is_logprobs` (the learner's K-pass average of log pi_old, rayrl.algo.mcla) replaces
`old_logprobs` in rho only; the ratio r keeps its exact denominator, so a single on-policy step
still has r = 1.
"""

from __future__ import annotations

import torch

from rayrl.config import LossConfig

OFF_POLICY_MODES = ("none", "decoupled", "tis", "icepop")
AGGREGATIONS = ("token_mean", "seq_mean", "constant")
RATIO_LEVELS = ("token", "sequence", "turn")


def sft_token_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token, [B, T]."""
    return -logprobs


def topk_distill_token_loss(student_topk: torch.Tensor, teacher_topk: torch.Tensor) -> torch.Tensor:
    """Top-k on-policy distillation, per token [B, T]: KL(p_teacher || pi_theta) over the teacher's
    k likeliest tokens at the student's own prefix, the teacher's distribution renormalised over
    them (the exact forward KL when k is the vocabulary). Inputs [B, T, k]: the log-probs of the
    teacher's top-k tokens under the student (with gradient) and under the teacher.

    Unlike the sampled estimate (rayrl.algo.distill), every position carries the teacher's whole
    preference over the k tokens, not one sampled token's log-ratio, so its gradient has no
    sampling variance (GKD's on-policy distillation with the forward KL)."""
    teacher = torch.log_softmax(teacher_topk.detach().float(), dim=-1)
    return (teacher.exp() * (teacher - student_topk)).sum(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / count


def segment_ids(mask: torch.Tensor, level: str) -> torch.Tensor:
    """[B, T] long: the segment of every sampled token (mask > 0), -1 elsewhere; a segment is a
    row (`sequence`) or a maximal run of sampled tokens within a row (`turn`)."""
    on = mask > 0
    if level == "sequence":
        seg = torch.arange(on.shape[0], device=on.device)[:, None].expand_as(on)
    elif level == "turn":
        before = torch.cat([torch.zeros_like(on[:, :1]), on[:, :-1]], dim=1)
        seg = torch.cumsum((on & ~before).reshape(-1).long(), 0).reshape(on.shape) - 1
    else:
        raise ValueError(f"ratio level {level!r} is not one of {', '.join(RATIO_LEVELS)}")
    return torch.where(on, seg, -1)


def segment_mean(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Each token's segment mean of `x` (differentiable), 0 outside segments."""
    inside = seg >= 0
    n = int(seg.max()) + 1 if inside.any() else 1   # one row keeps the gather valid when none is inside
    sums = x.new_zeros(n).index_add(0, seg[inside], x[inside])
    counts = torch.bincount(seg[inside], minlength=n).to(x.dtype)
    return torch.where(inside, (sums / counts.clamp(min=1.0))[seg.clamp(min=0)], 0.0)


def policy_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, cfg: LossConfig,
                      is_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-weighted clipped surrogate per token, and diagnostics over the masked tokens.

    loss_t = -w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), with w_t a detached
    function of rho_t chosen by cfg.off_policy: none 1; decoupled rho; tis min(rho, tis_cap);
    icepop 1 if icepop_low <= rho <= icepop_high else 0. At ratio level sequence / turn, r and rho
    are their segments' geometric means (see the module doc). `is_logprobs`: the estimate of
    log pi_old used in rho (default `old_logprobs`). Returns ([B, T] loss, zero where mask == 0;
    stats of 0-dim tensors).
    """
    if cfg.off_policy not in OFF_POLICY_MODES:
        raise ValueError(f"off_policy {cfg.off_policy!r} is not one of {', '.join(OFF_POLICY_MODES)}")
    valid = mask > 0
    mask = mask.detach().to(logprobs.dtype)
    old = old_logprobs.detach().to(logprobs.dtype)
    proximal = old if is_logprobs is None else is_logprobs.detach().to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype)
    # Padding and prompt positions may hold arbitrary log-probs; zero their log-ratios before exp
    # so that an overflow there cannot turn into inf * 0 = NaN in the loss or its gradient.
    log_ratio = torch.where(valid, logprobs - old, 0.0)
    token_log_rho = torch.where(valid, proximal - behaviour_logprobs.detach().to(logprobs.dtype), 0.0)
    log_rho, eps_low, eps_high = token_log_rho, cfg.eps_low, cfg.eps_high
    if cfg.ratio_level != "token":
        seg = segment_ids(valid, cfg.ratio_level)
        log_ratio, log_rho = segment_mean(log_ratio, seg), segment_mean(token_log_rho, seg)
        eps_low, eps_high = cfg.level_eps_low, cfg.level_eps_high
    ratio, rho = log_ratio.exp(), log_rho.exp()

    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    surrogate = -torch.minimum(unclipped, clipped)

    outside = (rho < cfg.icepop_low) | (rho > cfg.icepop_high)
    if cfg.off_policy == "none":
        weight = torch.ones_like(rho)
    elif cfg.off_policy == "decoupled":
        weight = rho
    elif cfg.off_policy == "tis":
        weight = rho.clamp(max=cfg.tis_cap)
    else:  # icepop: drop tokens whose behaviour/proximal mismatch is too large to correct
        weight = (~outside).to(rho.dtype)
    token_loss = weight * surrogate * mask

    with torch.no_grad():
        count = mask.sum().clamp(min=1.0)
        # The clipped branch is the one taken (its gradient is zero) when it is strictly smaller.
        clip_frac = _masked_mean((clipped < unclipped).to(mask.dtype), mask, count)
        rho_max = torch.where(valid, rho, 0.0).max() if rho.numel() else rho.new_zeros(())
        stats = {
            "clip_frac": clip_frac,
            "is_weight_mean": _masked_mean(rho, mask, count),
            "is_weight_max": rho_max,
            "is_masked_frac": _masked_mean(outside.to(mask.dtype), mask, count),
            # k3 estimator of KL(pi_b || pi_old) on tokens sampled from pi_b: E_b[rho - 1 - log rho],
            # unbiased and non-negative per token.
            "mismatch_kl": _masked_mean(token_log_rho.exp() - 1.0 - token_log_rho, mask, count),
            "ratio_mean": _masked_mean(ratio, mask, count),
        }
    return token_loss, stats


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: int | float,
              num_seqs: int | float, constant: float = 0.0) -> torch.Tensor:
    """This micro-batch's share of the batch loss; the shares of all micro-batches (on all
    data-parallel workers) sum to the full-batch loss, because every normaliser is a batch total
    (`num_tokens` masked tokens, `num_seqs` sequences) or a per-sequence quantity.

    token_mean: sum(loss * mask) / num_tokens             (DAPO token-level)
    seq_mean:   sum_b [sum_t(loss * mask) / |b|] / num_seqs (GRPO sample-level)
    constant:   sum(loss * mask) / (num_seqs * constant)  (Dr.GRPO, constant = e.g. max new tokens)
    """
    masked = token_loss * mask
    if mode == "token_mean":
        return masked.sum() / max(float(num_tokens), 1.0)
    if mode == "seq_mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(float(num_seqs), 1.0)
    if mode == "constant":
        if constant <= 0:
            raise ValueError(f"aggregation 'constant' needs constant > 0, got {constant!r}")
        return masked.sum() / (max(float(num_seqs), 1.0) * constant)
    raise ValueError(f"aggregation {mode!r} is not one of {', '.join(AGGREGATIONS)}")
