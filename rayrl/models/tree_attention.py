"""Tree attention for Hugging Face causal LMs: one forward over a packed trajectory forest.

`packed_logprobs(model, packed)` runs the model once over a `PackedTree` (rayrl.algo.tree_pack):
position ids are the tokens' depths and token i attends to token j iff j is i or an ancestor of i,
so every token's hidden states, and hence log-probs, equal those of the per-path forward.

The mask is never materialized over the packed sequence. The attention function is registered in
transformers' `AttentionInterface` under `TREE_ATTENTION` and selected only for the duration of a
packed forward, so the model's own implementation (sdpa, with padding masks) serves every other
call and nothing about the tree is saved with the model. Two backends compute only the pairs the
tree needs:

  nodewise (CPU)  each node's queries attend to its ancestors' keys and values, gathered once per
                  layer, plus its own causally, through SDPA. FlexAttention has no backward on CPU
                  and a dense boolean mask through SDPA computes every pair of the sequence.
  flex (CUDA)     FlexAttention with a block mask from the depth-first interval test
                  j <= i <= subtree_end[j]; blocks with no ancestor pair are skipped.

Works for every model whose attention goes through the interface (Llama, Qwen2, Qwen3, Mixtral,
Qwen3-MoE among them): MoE layers act per token, so they need nothing.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from rayrl.algo.tree_pack import PackedTree, tree_logprobs

TREE_ATTENTION = "rayrl_tree"
# Queries per SDPA call for a node below others: its mask is [block, ancestors + block], so long
# nodes are cut to keep that small (roots need no mask: plain causal attention).
QUERY_BLOCK = 1024


class TreePlan:
    """What attention needs about one packed micro-batch, built once and used by every layer."""

    def __init__(self, packed: PackedTree, device: torch.device | str, backend: str = "auto",
                 query_block: int = QUERY_BLOCK):
        device = torch.device(device)
        if backend == "auto":
            backend = "flex" if device.type == "cuda" else "nodewise"
        if backend not in ("nodewise", "flex"):
            raise ValueError(f"tree attention backend {backend!r} is not one of auto, nodewise, flex")
        self.backend = backend
        self.num_tokens = packed.num_tokens
        if backend == "flex":
            self.block_mask = _flex_block_mask(torch.as_tensor(packed.subtree_end, device=device), packed.num_tokens)
            return
        # Query blocks in packed order, so that splitting the queries yields them in turn. A root's
        # keys are its own slice of the packed keys; a node below others has a piece of one
        # per-layer gather: its ancestors, then its own tokens. Pieces come from `split`, whose
        # backward assembles one gradient; a plain slice per block would allocate and add a
        # gradient the size of the whole tensor for every block.
        self.node_lengths = packed.node_length.tolist()
        self.query_sizes: list[int] = []
        self.blocks: list[tuple[int, int, int, torch.Tensor | None]] = []   # node, piece (-1: root), keys, mask
        self.piece_sizes: list[int] = []
        gather, masks = [], {}   # siblings of equal length at equal depth (a GRPO group) share a mask
        for m, (start, length) in enumerate(zip(packed.node_start.tolist(), self.node_lengths)):
            if packed.node_parent[m] < 0:
                self.query_sizes.append(length)
                self.blocks.append((m, -1, length, None))
                continue
            ancestors = packed.ancestors(m)
            gather += [torch.as_tensor(ancestors), torch.arange(start, start + length)]
            above = len(ancestors)
            for lo in range(0, length, query_block):
                hi = min(lo + query_block, length)
                self.query_sizes.append(hi - lo)
                shape = (hi - lo, above + hi)
                if shape not in masks:   # query r sees keys 0 .. cols - rows + r: all ancestors, then causal
                    masks[shape] = torch.ones(shape, dtype=torch.bool, device=device).tril(diagonal=above + lo)
                self.blocks.append((m, len(self.piece_sizes), above + hi, masks[shape]))
            self.piece_sizes.append(above + length)
        self.key_index = torch.cat(gather).to(device) if gather else None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               dropout: float = 0.0) -> torch.Tensor:
        """query [1, H, N, D], key/value [1, Hkv, N, D] -> [1, N, H, D] (the layout HF expects back)."""
        gqa = query.shape[1] != key.shape[1]
        if self.backend == "flex":
            out = _compiled_flex()(query, key, value, block_mask=self.block_mask, scale=scale, enable_gqa=gqa)
            return out.transpose(1, 2)
        own_keys, own_values = key.split(self.node_lengths, dim=2), value.split(self.node_lengths, dim=2)
        if self.key_index is not None:
            piece_keys, piece_values = (self._gather(x).split(self.piece_sizes, dim=2) for x in (key, value))
        outs = []
        for q, (node, piece, n_keys, mask) in zip(query.split(self.query_sizes, dim=2), self.blocks):
            if piece < 0:
                k, v = own_keys[node], own_values[node]
            else:
                k, v = piece_keys[piece], piece_values[piece]
                if n_keys < k.shape[2]:   # a node cut into query blocks: keys up to this block's end
                    k, v = k[:, :, :n_keys], v[:, :, :n_keys]
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                       is_causal=mask is None, scale=scale, enable_gqa=gqa))
        return torch.cat(outs, dim=2).transpose(1, 2)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        # Gathered along the token dim of the [1, N, heads, D] view: HF's projections lay keys out
        # token-major, so every gathered row is one contiguous copy.
        return x.transpose(1, 2).index_select(1, self.key_index).transpose(1, 2)


def _flex_block_mask(subtree_end: torch.Tensor, n: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def ancestor_or_self(batch, head, q, kv):
        return (kv <= q) & (q <= subtree_end[kv])

    return create_block_mask(ancestor_or_self, None, None, n, n, device=subtree_end.device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # Compiled, FlexAttention generates one fused kernel for the block mask (eager on CPU it
    # materializes the scores: forward only, for tests).
    return torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention


def tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           tree_plan: TreePlan | None = None, **kwargs):
    """The `AttentionInterface` function: (output [B, N, H, D], no attention weights)."""
    if tree_plan is None:
        raise ValueError(f"the {TREE_ATTENTION!r} attention needs tree_plan= (use packed_logprobs)")
    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(f"tree attention does not support {', '.join(unsupported)}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return tree_plan.attend(query, key, value, scale, dropout), None


AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)


@contextlib.contextmanager
def _tree_attention(model):
    """Select tree attention for one forward; transformers reads the choice from the config at
    every call (and skips building a mask for an implementation it has no mask function for)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = TREE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_logits(model, packed: PackedTree, backend: str = "auto", query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """The logits of every packed token under `model` given its ancestors, [N, V]. `model` is a HF
    causal LM or a wrapper that forwards keyword arguments to one (a DeepSpeed engine)."""
    hf_model = getattr(model, "module", model)
    if getattr(hf_model, "is_activation_checkpointing", False):
        # The recomputation in backward would run after the attention implementation is restored.
        raise NotImplementedError("tree attention does not support gradient checkpointing")
    device = next(hf_model.parameters()).device
    plan = TreePlan(packed, device, backend, query_block)
    tokens = torch.as_tensor(packed.tokens, device=device)
    with _tree_attention(hf_model):
        return model(input_ids=tokens[None], position_ids=torch.as_tensor(packed.position, device=device)[None],
                     use_cache=False, tree_plan=plan).logits[0]


def packed_logprobs(model, packed: PackedTree, temperature: float = 1.0, backend: str = "auto",
                    query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """Log-prob of every packed token under `model` given its ancestors, [N] float32 (roots hold
    placeholders)."""
    logits = packed_logits(model, packed, backend, query_block)
    return tree_logprobs(logits, torch.as_tensor(packed.parent, device=logits.device),
                         torch.as_tensor(packed.tokens, device=logits.device), temperature)
