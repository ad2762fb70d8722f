"""Trajectory trees: the unit of data that flows from generators to the learner.

A tree holds one prompt group. Node 0 is the root (the prompt). Every node carries a token
segment with, per token, the behaviour log-prob, a loss mask (1 = sampled by the model) and the
policy version that sampled it. Leaves carry the reward, its breakdown, the advantage and whether
the episode failed for an infrastructure reason. Each root-to-leaf path is one sample.

The wire format is msgpack; the arrays of all nodes travel as four contiguous raw buffers, and a
decoded tree's arrays are zero-copy views into the received bytes. Trees pickle through the same
codec (out-of-band with protocol 5), so `ray.put` / `ray.get` never pickles an array.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack
import numpy as np

TOKEN_DTYPE = np.int32
LOGPROB_DTYPE = np.float32
MASK_DTYPE = np.uint8
VERSION_DTYPE = np.int32
NOT_SAMPLED = -1  # version of tokens the model did not sample (prompt, tool output)

_ARRAY_FIELDS = (("tokens", TOKEN_DTYPE), ("logprobs", LOGPROB_DTYPE),
                 ("loss_mask", MASK_DTYPE), ("versions", VERSION_DTYPE))
_CODEC_VERSION = 1


@dataclass
class Node:
    tokens: np.ndarray
    logprobs: np.ndarray
    loss_mask: np.ndarray
    versions: np.ndarray
    parent: int = -1
    meta: dict = field(default_factory=dict)
    # Leaf fields (None on inner nodes and on leaves not yet graded).
    reward: float | None = None
    reward_info: dict = field(default_factory=dict)
    advantage: float | None = None
    infra_failure: bool = False

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Path:
    """One root-to-leaf sample, its arrays concatenated along the path."""

    tokens: np.ndarray
    logprobs: np.ndarray
    loss_mask: np.ndarray
    versions: np.ndarray
    leaf: int
    reward: float | None
    advantage: float | None
    infra_failure: bool

    def __len__(self) -> int:
        return len(self.tokens)


class TrajectoryTree:
    def __init__(self, prompt_tokens, meta: dict | None = None):
        prompt = np.asarray(prompt_tokens, dtype=TOKEN_DTYPE)
        n = len(prompt)
        self.nodes: list[Node] = [Node(prompt, np.zeros(n, LOGPROB_DTYPE), np.zeros(n, MASK_DTYPE),
                                       np.full(n, NOT_SAMPLED, VERSION_DTYPE))]
        self.meta: dict = dict(meta or {})

    # -- building -------------------------------------------------------------------------
    def add(self, parent: int, tokens, logprobs=None, loss_mask=None, versions=None,
            meta: dict | None = None) -> int:
        """Append a child of `parent`; returns its index. Omitted arrays mean 'not sampled'."""
        if not 0 <= parent < len(self.nodes):
            raise IndexError(f"parent {parent} is not a node of this tree ({len(self.nodes)} nodes)")
        tokens = np.asarray(tokens, dtype=TOKEN_DTYPE)
        n = len(tokens)
        node = Node(
            tokens,
            np.zeros(n, LOGPROB_DTYPE) if logprobs is None else np.asarray(logprobs, LOGPROB_DTYPE),
            np.zeros(n, MASK_DTYPE) if loss_mask is None else np.asarray(loss_mask, MASK_DTYPE),
            np.full(n, NOT_SAMPLED, VERSION_DTYPE) if versions is None else np.asarray(versions, VERSION_DTYPE),
            parent=parent, meta=dict(meta or {}))
        for name, _ in _ARRAY_FIELDS[1:]:
            if len(getattr(node, name)) != n:
                raise ValueError(f"node {name} has {len(getattr(node, name))} entries for {n} tokens")
        self.nodes.append(node)
        return len(self.nodes) - 1

    # -- structure ------------------------------------------------------------------------
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes[1:], start=1):
            kids[node.parent].append(i)
        return kids

    def leaves(self) -> list[int]:
        kids = self.children()
        return [i for i, k in enumerate(kids) if not k]

    def ancestry(self, leaf: int) -> list[int]:
        """Node indices from the root down to `leaf`."""
        chain = []
        i = leaf
        while i != -1:
            chain.append(i)
            i = self.nodes[i].parent
        return chain[::-1]

    def paths(self) -> list[Path]:
        return list(iter_paths(self))

    @property
    def num_tokens(self) -> int:
        return sum(len(n) for n in self.nodes)

    @property
    def min_version(self) -> int:
        """Oldest policy version that sampled any token of the tree (NOT_SAMPLED if none)."""
        sampled = [n.versions[n.versions != NOT_SAMPLED] for n in self.nodes]
        sampled = [v for v in sampled if len(v)]
        return int(min(v.min() for v in sampled)) if sampled else NOT_SAMPLED

    def rewards(self) -> list[float | None]:
        return [self.nodes[i].reward for i in self.leaves()]

    def __eq__(self, other) -> bool:
        if not isinstance(other, TrajectoryTree) or self.meta != other.meta or len(self.nodes) != len(other.nodes):
            return False
        for a, b in zip(self.nodes, other.nodes):
            if (a.parent, a.meta, a.reward, a.reward_info, a.advantage, a.infra_failure) != \
                    (b.parent, b.meta, b.reward, b.reward_info, b.advantage, b.infra_failure):
                return False
            if not all(np.array_equal(getattr(a, f), getattr(b, f)) for f, _ in _ARRAY_FIELDS):
                return False
        return True

    def __repr__(self) -> str:
        return (f"TrajectoryTree(nodes={len(self.nodes)}, leaves={len(self.leaves())}, "
                f"tokens={self.num_tokens}, meta={self.meta})")

    # -- pickling goes through the msgpack codec ------------------------------------------
    def __reduce_ex__(self, protocol):
        data = encode(self)
        if protocol >= 5:
            return decode, (pickle.PickleBuffer(data),)
        return decode, (bytes(data),)


def iter_paths(tree: TrajectoryTree) -> Iterator[Path]:
    for leaf in tree.leaves():
        chain = [tree.nodes[i] for i in tree.ancestry(leaf)]
        node = tree.nodes[leaf]
        yield Path(*(np.concatenate([getattr(c, f) for c in chain]) for f, _ in _ARRAY_FIELDS),
                   leaf=leaf, reward=node.reward, advantage=node.advantage,
                   infra_failure=node.infra_failure)


# -- codec ------------------------------------------------------------------------------------
def encode(tree: TrajectoryTree) -> bytearray:
    """Serialize a tree: a msgpack header followed by the raw array buffers (see module doc)."""
    lengths = np.fromiter((len(n) for n in tree.nodes), dtype=np.int64, count=len(tree.nodes))
    header = msgpack.packb({
        "v": _CODEC_VERSION,
        "meta": tree.meta,
        "lengths": lengths.tobytes(),
        "nodes": [[n.parent, n.meta, n.reward, n.reward_info, n.advantage, n.infra_failure]
                  for n in tree.nodes],
    }, use_bin_type=True)
    total = int(lengths.sum())
    sizes = [total * np.dtype(dt).itemsize for _, dt in _ARRAY_FIELDS]
    out = bytearray(8 + len(header) + sum(sizes))
    out[:8] = len(header).to_bytes(8, "little")
    out[8:8 + len(header)] = header
    offset = 8 + len(header)
    for (name, dt), size in zip(_ARRAY_FIELDS, sizes):
        dest = np.frombuffer(out, dtype=dt, count=total, offset=offset)
        pos = 0
        for node in tree.nodes:
            arr = getattr(node, name)
            dest[pos:pos + len(arr)] = arr
            pos += len(arr)
        offset += size
    return out


def decode(data) -> TrajectoryTree:
    """Inverse of `encode`. Arrays are views into `data` (read-only if `data` is)."""
    buf = memoryview(data).cast("B")
    hlen = int.from_bytes(buf[:8], "little")
    header = msgpack.unpackb(buf[8:8 + hlen], raw=False, strict_map_key=False)
    if header.get("v") != _CODEC_VERSION:
        raise ValueError(f"trajectory tree codec version {header.get('v')!r} is not {_CODEC_VERSION}")
    lengths = np.frombuffer(header["lengths"], dtype=np.int64)
    total = int(lengths.sum())
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    offset = 8 + hlen
    columns = {}
    for name, dt in _ARRAY_FIELDS:
        columns[name] = np.frombuffer(buf, dtype=dt, count=total, offset=offset)
        offset += total * np.dtype(dt).itemsize
    tree = TrajectoryTree.__new__(TrajectoryTree)
    tree.meta = header["meta"]
    tree.nodes = []
    for i, (parent, meta, reward, reward_info, advantage, infra) in enumerate(header["nodes"]):
        lo, hi = bounds[i], bounds[i + 1]
        tree.nodes.append(Node(*(columns[f][lo:hi] for f, _ in _ARRAY_FIELDS), parent=parent, meta=meta,
                               reward=reward, reward_info=reward_info, advantage=advantage,
                               infra_failure=infra))
    return tree
