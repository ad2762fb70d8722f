"""A policy that replays scripted turns: the oracle acting as the model.

It stands in for the engine where the point is the environment, not the model: replay tests of
every domain (the oracle must score 1.0 through the full loop) and benchmarks/envs.py.
"""

from __future__ import annotations

import numpy as np

from rayrl.rollout.engine import Completion, SamplingParams


class ReplayPolicy:
    """Stands in for the engine: "samples" scripted turns (as the oracle would act), with
    distinct per-token log-probs so the test can see they reach the tree unchanged."""

    def __init__(self, tokenizer, turns: list[str], stop_id: int, version: int = 3):
        self.tokenizer, self.turns, self.stop_id, self.version = tokenizer, list(turns), stop_id, version
        self.contexts, self.sampled = [], []

    async def __call__(self, ids, params: SamplingParams) -> Completion:
        self.contexts.append(list(ids))
        text = self.turns.pop(0)
        tokens = np.array(self.tokenizer.encode(text, add_special_tokens=False) + [self.stop_id], np.int32)
        logprobs = -np.linspace(0.1, 1.0, len(tokens)).astype(np.float32) - len(self.sampled)
        self.sampled.append((tokens, logprobs))
        return Completion(tokens, logprobs, "stop", self.version)
