"""The weight-sync check: do the engine's log-probs come from the weights the learner holds?

Tokens sampled by the version the learner holds (on-policy tokens; every token carries the
version that sampled it) have behaviour log-probs that the learner recomputes from the same
weights, so the two differ only by numerics (bf16 inference against an fp32 learner). A weight
update that never reached the engine while its version number did shows up as the KL between two
successive policies instead, which is orders of magnitude larger.

The estimate is k3 of KL(pi_b || pi_learner) over the on-policy tokens, r - 1 - log r with
r = pi_learner / pi_b: unbiased for tokens drawn from pi_b, non-negative per token.

bf16 error is heavy-tailed per token: against the fp32 learner, one token in ~20000 is off by 2-3
nats (k3 up to 19; vLLM in fp32 is exact), while a skipped update moves many tokens a little. A
step of 50 on-policy tokens (an asynchronous run holds few tokens of the learner's own version)
can then exceed the limit on one token, so the check pools consecutive steps (MismatchWindow)
until it holds enough tokens for the mean to mean something.
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


def check_mismatch(kl_sum: float, tokens: float, version: int, threshold: float,
                   first_version: int | None = None) -> float | None:
    """The mean on-policy mismatch KL (None without on-policy tokens); WeightSyncError when it
    exceeds `threshold` (0 turns the check off). The tokens were sampled by `version`, or by each
    of versions `first_version`..`version` while the learner held it."""
    if tokens <= 0:
        return None
    kl = kl_sum / tokens
    if threshold > 0 and not kl <= threshold:   # NaN fails too
        versions = (f"version {version}" if first_version in (None, version)
                    else f"versions {first_version}-{version}")
        raise WeightSyncError(
            f"weight sync check failed at {versions}: the mismatch KL between the engines' and the "
            f"learner's log-probs of {int(tokens)} tokens sampled by the version the learner held is "
            f"{kl:.3g} > rollout.max_mismatch_kl={threshold:g}; the engines do not serve the weights the "
            "learner published (an update that did not take effect?)")
    return kl


class MismatchWindow:
    """Pools the on-policy mismatch of consecutive steps until it holds `min_tokens` tokens, then
    checks their mean (check_mismatch) and starts afresh. A step with that many tokens is checked
    alone; min_tokens=1 checks every step. Its attributes are saved with the learner's checkpoint."""

    def __init__(self) -> None:
        self.kl_sum, self.tokens, self.first_version = 0.0, 0.0, None

    def add(self, kl_sum: float, tokens: float, version: int, threshold: float, min_tokens: int) -> float | None:
        """Adds one step's sums (onpolicy_mismatch_sums over the whole batch); the pooled mean KL
        when the window was checked, else None. WeightSyncError over `threshold`."""
        if tokens <= 0:
            return None
        self.kl_sum += kl_sum
        self.tokens += tokens
        self.first_version = version if self.first_version is None else self.first_version
        if self.tokens < min_tokens:
            return None
        kl_sum, tokens, first = self.kl_sum, self.tokens, self.first_version
        self.kl_sum, self.tokens, self.first_version = 0.0, 0.0, None
        return check_mismatch(kl_sum, tokens, version, threshold, first)


def check_served_versions(served: list[int], version: int) -> None:
    """WeightSyncError unless every generator (in order) reports that its engine serves `version`."""
    behind = [f"generator {i} serves version {v}" for i, v in enumerate(served) if v != version]
    if behind:
        raise WeightSyncError(f"weights of version {version} were published, but {'; '.join(behind)}: "
                              "its engine did not take the update")
