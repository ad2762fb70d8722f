"""Per-token log-probabilities from logits, shared by the engines and the learner."""

from __future__ import annotations

import torch


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[labels], over the last dim; logits [..., V], labels [...].

    Computed as logit[label] - logsumexp(logits) in float32 so that no [..., V] log-softmax tensor
    is kept for the backward pass.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
