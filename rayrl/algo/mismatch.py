"""The weight-sync check: do the engine's log-probs come from the weights the learner holds?

Tokens sampled by the version the learner holds (on-policy tokens; every token carries the
version that sampled it) have behaviour log-probs that the learner recomputes from the same
weights, so the two differ only by numerics (bf16 inference against an fp32 learner). A weight
update that never reached the engine while its version number did shows up as the KL between two
successive policies instead, which is orders of magnitude larger.

The estimate is k3 of KL(pi_b || pi_learner) over the on-policy tokens, r - 1 - log r with
r = pi_learner / pi_b: unbiased for tokens drawn from pi_b, non-negative per token, low variance.
"""

from __future__ import annotations

import torch


class WeightSyncError(RuntimeError):
    """The engines do not serve the weights the learner published."""


def onpolicy_mismatch_sums(learner_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                           versions: torch.Tensor, mask: torch.Tensor, version: int) -> tuple[float, float]:
    """(sum of k3 over the sampled tokens of `version`, their count); all inputs [B, T] aligned,
    `mask` > 0 on sampled tokens. Sums, so that micro-batches and data-parallel ranks add up."""
    onpolicy = (mask > 0) & (versions == version)
    log_r = (learner_logprobs.detach().double() - behaviour_logprobs.double())[onpolicy]
    return float((log_r.exp() - 1.0 - log_r).sum()), float(onpolicy.sum())


def check_mismatch(kl_sum: float, tokens: float, version: int, threshold: float) -> float | None:
    """The mean on-policy mismatch KL (None without on-policy tokens); WeightSyncError when it
    exceeds `threshold` (0 turns the check off)."""
    if tokens <= 0:
        return None
    kl = kl_sum / tokens
    if threshold > 0 and not kl <= threshold:   # NaN fails too
        raise WeightSyncError(
            f"weight sync check failed at version {version}: the mismatch KL between the engines' and the "
            f"learner's log-probs of {int(tokens)} tokens sampled by version {version} is {kl:.3g} > "
            f"rollout.max_mismatch_kl={threshold:g}; the engines do not serve the weights the learner "
            "published (an update that did not take effect?)")
    return kl


def check_served_versions(served: list[int], version: int) -> None:
    """WeightSyncError unless every generator (in order) reports that its engine serves `version`."""
    behind = [f"generator {i} serves version {v}" for i, v in enumerate(served) if v != version]
    if behind:
        raise WeightSyncError(f"weights of version {version} were published, but {'; '.join(behind)}: "
                              "its engine did not take the update")
