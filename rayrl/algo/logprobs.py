"""Per-token log-probabilities from logits, shared by the engines and the learner."""

from __future__ import annotations

import torch


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[labels], over the last dim.

    Without `rows`: logits [..., V] and labels [...] (one label per row) or [..., k] (k labels
    per row, e.g. a teacher's top-k tokens). With `rows` (tree training): logits [N, V] and
    labels [...] or [..., k] read row `rows[...]`, so a row shared by several labels has its
    logsumexp computed once.

    Computed as logit[label] - logsumexp(logits) in float32 so that no [..., V] log-softmax tensor
    is kept for the backward pass.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    labels = labels.long()
    normaliser = torch.logsumexp(logits, dim=-1)
    if rows is not None:
        several = labels.dim() > rows.dim()
        picked = logits[rows.unsqueeze(-1) if several else rows, labels]
        normaliser = normaliser[rows]
    else:
        several = labels.dim() == logits.dim()
        picked = torch.gather(logits, -1, labels if several else labels.unsqueeze(-1))
        picked = picked if several else picked.squeeze(-1)
    return picked - (normaliser.unsqueeze(-1) if several else normaliser)
