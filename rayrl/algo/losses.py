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
"""

from __future__ import annotations

import torch

from rayrl.config import LossConfig

OFF_POLICY_MODES = ("none", "decoupled", "tis", "icepop")
AGGREGATIONS = ("token_mean", "seq_mean", "constant")


def sft_token_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token, [B, T]."""
    return -logprobs


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / count


def policy_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-weighted clipped surrogate per token, and diagnostics over the masked tokens.

    loss_t = -w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), with w_t a detached
    function of rho_t chosen by cfg.off_policy: none 1; decoupled rho; tis min(rho, tis_cap);
    icepop 1 if icepop_low <= rho <= icepop_high else 0. Returns ([B, T] loss, zero where
    mask == 0; stats of 0-dim tensors).
    """
    if cfg.off_policy not in OFF_POLICY_MODES:
        raise ValueError(f"off_policy {cfg.off_policy!r} is not one of {', '.join(OFF_POLICY_MODES)}")
    valid = mask > 0
    mask = mask.detach().to(logprobs.dtype)
    old = old_logprobs.detach().to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype)
    # Padding and prompt positions may hold arbitrary log-probs; zero their log-ratios before exp
    # so that an overflow there cannot turn into inf * 0 = NaN in the loss or its gradient.
    log_ratio = torch.where(valid, logprobs - old, 0.0)
    log_rho = torch.where(valid, old - behaviour_logprobs.detach().to(logprobs.dtype), 0.0)
    ratio, rho = log_ratio.exp(), log_rho.exp()

    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
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
            "mismatch_kl": _masked_mean(rho - 1.0 - log_rho, mask, count),
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
