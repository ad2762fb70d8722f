"""A small batched sampler in plain torch over any HF causal LM: the CPU debug engine.

Prompts of different lengths share one batch by left padding: the attention mask hides the pads
and position ids count only real tokens, so a padded prompt sees the same logits as it would
alone. The batch is prefilled once, then decoded one token per step from the KV cache; sequences
that emit a stop token leave the batch (their cache rows are dropped) so they cost nothing more.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import replace

import numpy as np
import torch
from transformers import DynamicCache

from rayrl.algo.logprobs import gather_logprobs
from rayrl.models import load_model, load_state_dict_numpy
from rayrl.models.moe import replay_routes, routing
from rayrl.rollout.engine import Completion, Engine, SamplingParams, TokenIds


class TorchEngine(Engine):
    """Samples from the HF model folder at `path`; `max_batch` sequences per forward pass."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, max_batch: int = 256, seed: int = 0):
        self.model = load_model(path, dtype)
        self.max_batch = max_batch
        self.vocab_size = self.model.config.vocab_size
        # the positions the model was built for, as vLLM's max_model_len defaults to: past them a
        # rotary model extrapolates and a learned-position one fails
        self.max_context = getattr(self.model.config, "max_position_embeddings", None)
        self.version = 0
        # MCLA / routing replay on the engine side (set from the run's MCLAConfig by the generator).
        self.logprob_passes = 1
        self.record_routes = False
        self._generator = torch.Generator().manual_seed(seed)
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name is deprecated).
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def generate(self, prompts: list[TokenIds], params: SamplingParams) -> list[Completion]:
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        generator = self._generator if params.seed is None else torch.Generator().manual_seed(params.seed)
        prompts = _as_id_arrays(prompts)
        results: list[Completion | None] = [None] * len(prompts)
        for chunk in self._chunks(prompts):
            for i, completion in zip(chunk, self._generate_batch([prompts[i] for i in chunk], params, generator)):
                results[i] = completion
        return self._rescore(prompts, results, params)

    def _rescore(self, prompts: list[np.ndarray], completions: list[Completion],
                 params: SamplingParams) -> list[Completion]:
        """MCLA on the engine side: the behaviour log-probs as the mean of `logprob_passes`
        scoring passes instead of the sampling pass's single estimate; with `record_routes` the
        experts of the first pass go with the completion (routing replay). Greedy decoding
        (evaluation) trains nothing, so it keeps the sampling pass's values."""
        record = self.record_routes and routing(self.model) is not None
        if params.temperature == 0 or (self.logprob_passes <= 1 and not record):
            return completions
        logprobs, routes = self.score_passes(prompts, [c.tokens for c in completions],
                                             params.logprob_temperature(), self.logprob_passes, record)
        return [replace(c, logprobs=lp, routes=None if routes is None else routes[i])
                for i, (c, lp) in enumerate(zip(completions, logprobs))]

    @torch.inference_mode()
    def score(self, prompts: list[TokenIds], continuations: list[TokenIds],
              temperature: float = 1.0, topk: int = 0) -> list:
        """One forward pass per chunk over the left-padded `prompt + continuation` rows.

        Left padding right-aligns the continuations, so only the last `max continuation + 1`
        positions need logits (the vocabulary projection dominates memory for real models).
        """
        return self.score_passes(prompts, continuations, temperature, topk=topk)[0]

    @torch.inference_mode()
    def score_passes(self, prompts: list[TokenIds], continuations: list[TokenIds], temperature: float = 1.0,
                     passes: int = 1, record_routes: bool = False, topk: int = 0) -> tuple[list, list | None]:
        """`score` as the mean over `passes` forward passes (MCLA), and with `record_routes` (MoE
        models) the experts of every token of `prompt + continuation` [tokens, layers, k] chosen
        in the first pass, which the later passes then replay (routing replay). `topk` (one pass
        only): the triples of `Engine.score`."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if topk and passes != 1:
            raise ValueError("top-k scoring takes one pass")
        control = routing(self.model) if record_routes else None
        prompts = _as_id_arrays(prompts)
        continuations = [np.asarray(c, dtype=np.int64).reshape(-1) for c in continuations]
        sequences = [np.concatenate([p, c]) for p, c in zip(prompts, continuations)]
        results: list = [None] * len(prompts)
        routes: list | None = [None] * len(prompts) if control is not None else None
        for chunk in self._chunks(sequences):
            input_ids, attention_mask = _left_pad([sequences[i] for i in chunk])
            longest = max(len(continuations[i]) for i in chunk)
            labels = input_ids[:, input_ids.shape[1] - longest:]
            plan, total = None, 0.0
            for i in range(passes):
                recording = control is not None and i == 0
                with control.record() if recording else contextlib.nullcontext(), replay_routes(self.model, plan):
                    logits = self._forward(input_ids, attention_mask, _position_ids(attention_mask),
                                           cache=None, logits_to_keep=longest + 1)
                if recording:
                    plan = control.recorded()
                total = total + gather_logprobs(logits[:, :-1], labels, temperature)
            logprobs = (total / passes).numpy()
            if topk:   # tempering keeps the order: the k largest logits are the k likeliest tokens
                ids = logits[:, :-1].topk(topk, dim=-1).indices
                top_ids = ids.numpy().astype(np.int32)
                top_logprobs = gather_logprobs(logits[:, :-1], ids, temperature).numpy()
            for row, i in enumerate(chunk):
                cut = slice(longest - len(continuations[i]), None)
                results[i] = logprobs[row, cut].astype(np.float32)
                if topk:
                    results[i] = (results[i], top_ids[row, cut], top_logprobs[row, cut])
            if control is not None:
                width = input_ids.shape[1]
                per_row = plan.reshape(len(chunk), width, control.num_layers, control.top_k).numpy()
                for row, i in enumerate(chunk):
                    routes[i] = per_row[row, width - len(sequences[i]):]
        return results, routes

    def load_weights(self, state_dict: dict[str, np.ndarray], version: int) -> None:
        load_state_dict_numpy(self.model, state_dict)
        self.version = version

    def rng_state(self) -> bytes:
        """The state of the random stream unseeded requests draw from (for checkpoints)."""
        return self._generator.get_state().numpy().tobytes()

    def set_rng_state(self, state: bytes) -> None:
        self._generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))

    def _chunks(self, sequences: list[np.ndarray]) -> list[list[int]]:
        """Indices in chunks of at most `max_batch`, by length, so that a chunk carries little padding."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        return [order[start:start + self.max_batch] for start in range(0, len(order), self.max_batch)]

    def _forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=cache is not None, logits_to_keep=logits_to_keep,
                         **{self._cache_kwarg: cache})
        return out.logits

    def _generate_batch(self, prompts: list[np.ndarray], params: SamplingParams,
                        generator: torch.Generator) -> list[Completion]:
        batch, max_new = len(prompts), params.max_new_tokens
        input_ids, attention_mask = _left_pad(prompts)
        position_ids = _position_ids(attention_mask)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attention_mask, position_ids, cache, logits_to_keep=1)[:, -1]

        tokens = torch.zeros(batch, max_new, dtype=torch.long)
        logprobs = torch.zeros(batch, max_new, dtype=torch.float32)
        lengths = torch.zeros(batch, dtype=torch.long)
        stopped = torch.zeros(batch, dtype=torch.bool)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long)
        rows = torch.arange(batch)            # batch rows still generating, aligned with the cache rows
        next_position = position_ids[:, -1] + 1
        for step in range(max_new):
            token, logprob = _sample(logits, params, generator)
            tokens[rows, step], logprobs[rows, step] = token, logprob
            lengths[rows] += 1
            hit_stop = torch.isin(token, stop_ids)
            stopped[rows[hit_stop]] = True
            if step == max_new - 1 or hit_stop.all():
                break
            if hit_stop.any():
                keep = (~hit_stop).nonzero().squeeze(1)
                rows, token = rows[keep], token[keep]
                attention_mask, next_position = attention_mask[keep], next_position[keep]
                cache.batch_select_indices(keep)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            logits = self._forward(token[:, None], attention_mask, next_position[:, None], cache,
                                   logits_to_keep=1)[:, -1]
            next_position = next_position + 1

        return [
            Completion(
                tokens=tokens[i, :lengths[i]].numpy().astype(np.int32),
                logprobs=logprobs[i, :lengths[i]].numpy().copy(),
                finish_reason="stop" if stopped[i] else "length",
                version=self.version,
            )
            for i in range(batch)
        ]


def _sample(logits: torch.Tensor, params: SamplingParams,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row [B] and its log-prob under the tempered, untruncated distribution."""
    logits = logits.float()
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            probs = _top_p_filter(probs, params.top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return token, gather_logprobs(logits, token, params.logprob_temperature())


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches `top_p`.

    The most likely token always survives, so a tiny `top_p` is greedy decoding. The result is
    left unnormalised: `torch.multinomial` only needs weights.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _as_id_arrays(prompts: list[TokenIds]) -> list[np.ndarray]:
    arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    if any(len(a) == 0 for a in arrays):
        raise ValueError("every prompt needs at least one token")
    return arrays


def _left_pad(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, longest]; pads are id 0 (masked, so their value is moot)."""
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):] = s
        mask[row, width - len(s):] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row starts at position 0."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
