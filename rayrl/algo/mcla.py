"""MCLA (Monte-Carlo Log-probability Averaging, KAT-Coder-V2) and the statistics of IS weights.

With noisy MoE routing one forward pass gives a noisy log-prob, and the IS weight
rho = pi_old / pi_b compares two such estimates, so its log carries the variance of both. MCLA
estimates each side as the mean over K forward passes, log pi_bar = (1/K) sum_k log pi^(k), which
divides the noise part of Var[log rho] by K; IcePop then masks the tokens whose mismatch is still
too large (rayrl.algo.losses). Where the passes run is configured (LossConfig.mcla): on the engine
for the behaviour log-probs, on the learner for the old log-probs, or both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MOE_DEFAULT_K = 8


def mcla_passes(cfg, is_moe: bool) -> tuple[int, int]:
    """(engine passes, learner passes) for an MCLAConfig: k = 0 means 8 for MoE models and 1 for
    dense ones (a dense forward is deterministic: more passes would only repeat it)."""
    k = cfg.k or (MOE_DEFAULT_K if is_moe else 1)
    return (k if cfg.side in ("engine", "both") else 1, k if cfg.side in ("learner", "both") else 1)


def average_passes(first: torch.Tensor, another: Callable[[], torch.Tensor], k: int) -> torch.Tensor:
    """The mean of `first` and k - 1 further estimates from `another()`, detached."""
    total = first.detach().clone()
    for _ in range(k - 1):
        total += another().detach()
    return total / k


def log_weight_stats(log_rho: torch.Tensor, mask: torch.Tensor, low: float = 0.5, high: float = 2.0) -> dict:
    """Over the masked tokens: the variance and mean of log rho, the share IcePop would mask
    (rho outside [low, high]) and the largest rho."""
    values = log_rho[mask > 0].double()
    rho = values.exp()
    return {"var": float(values.var(unbiased=False)) if values.numel() else 0.0,
            "mean": float(values.mean()) if values.numel() else 0.0,
            "masked_frac": float(((rho < low) | (rho > high)).double().mean()) if values.numel() else 0.0,
            "max_weight": float(rho.max()) if values.numel() else 0.0}
