"""Trajectory trees: the unit of data that flows from generators to the learner.

A tree holds one prompt group. Node 0 is the root (the prompt). Every node carries a token
segment with, per token, the behaviour log-prob, a loss mask (1 = sampled by the model) and the
policy version that sampled it; for on-policy distillation a teacher adds its log-prob of every
token (`teacher_logprobs`, None until scored) and, for top-k distillation, its k likeliest tokens
at every position with their log-probs (`teacher_topk_ids`, `teacher_topk_logprobs`, [n, k]).
Leaves carry the reward, its breakdown, the advantage and whether the episode failed for an
infrastructure reason. Each root-to-leaf path is one sample.

The wire format is msgpack; the arrays of all nodes travel as contiguous raw buffers (a fifth for
teacher log-probs when the tree has them, two more for the teacher's top-k), and a decoded tree's
arrays are zero-copy views into the received bytes. Trees pickle through the same codec
(out-of-band with protocol 5), so `ray.put` / `ray.get` never pickles an array.
"""

from __future__ import annotations

import operator
import pickle
from dataclasses import dataclass, field
from typing import Iterator

import msgpack
import numpy as np

from rayrl.algo.distill import reverse_kl

TOKEN_DTYPE = np.int32
LOGPROB_DTYPE = np.float32
MASK_DTYPE = np.uint8
VERSION_DTYPE = np.int32
NOT_SAMPLED = -1  # version of tokens the model did not sample (prompt, tool output)

_ARRAY_FIELDS = (("tokens", TOKEN_DTYPE), ("logprobs", LOGPROB_DTYPE),
                 ("loss_mask", MASK_DTYPE), ("versions", VERSION_DTYPE))
_TEACHER_FIELD = ("teacher_logprobs", LOGPROB_DTYPE)   # a fifth column, only in teacher-scored trees
# Two [n, k] columns, only in trees a teacher scored with its top-k (distill.topk > 0).
_TOPK_FIELDS = (("teacher_topk_ids", TOKEN_DTYPE), ("teacher_topk_logprobs", LOGPROB_DTYPE))
_CODEC_VERSION = 4  # 2: columns aligned to 8 bytes; 3: optional teacher column; 4: optional top-k columns


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
    teacher_logprobs: np.ndarray | None = None
    teacher_topk_ids: np.ndarray | None = None
    teacher_topk_logprobs: np.ndarray | None = None

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
    teacher_logprobs: np.ndarray | None = None
    teacher_topk_ids: np.ndarray | None = None
    teacher_topk_logprobs: np.ndarray | None = None
    domain: str = ""
    meta: dict = field(default_factory=dict)   # the leaf's (e.g. an MoE sample's routes)

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
            for f, _ in (_TEACHER_FIELD, *_TOPK_FIELDS):
                x, y = getattr(a, f), getattr(b, f)
                if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
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


def domain_of(tree: TrajectoryTree) -> str:
    """The domain of the tree's task (trees made by the generators carry it), else ""."""
    task = tree.meta.get("task")
    return task.get("domain", "") if isinstance(task, dict) else ""


def iter_paths(tree: TrajectoryTree) -> Iterator[Path]:
    domain = domain_of(tree)
    for leaf in tree.leaves():
        chain = [tree.nodes[i] for i in tree.ancestry(leaf)]
        node = tree.nodes[leaf]
        teacher = {f: np.concatenate([getattr(c, f) for c in chain]) if all(getattr(c, f) is not None for c in chain)
                   else None for f, _ in (_TEACHER_FIELD, *_TOPK_FIELDS)}
        yield Path(*(np.concatenate([getattr(c, f) for c in chain]) for f, _ in _ARRAY_FIELDS),
                   leaf=leaf, reward=node.reward, advantage=node.advantage,
                   infra_failure=node.infra_failure, domain=domain, meta=node.meta, **teacher)


def summarize(tree: TrajectoryTree) -> dict:
    """The small record the replay buffer and the learner group decide on without the tree."""
    paths = tree.paths()
    scored = [p for p in paths if p.teacher_logprobs is not None and not p.infra_failure]
    sampled = [p.loss_mask.astype(bool) for p in scored]
    task = tree.meta.get("task")
    return {
        "id": tree.meta.get("group_id"),
        "domain": domain_of(tree),
        "task_id": task.get("id") if isinstance(task, dict) else None,   # History Resampling's record
        "min_version": tree.min_version,
        "rewards": [p.reward for p in paths],
        "infra_failures": sum(p.infra_failure for p in paths),
        "num_paths": len(paths),
        "num_tokens": int(sum(len(p) for p in paths)),
        "loss_tokens": int(sum(int(p.loss_mask.sum()) for p in paths if not p.infra_failure)),
        # sum over sampled tokens of log pi_student - log pi_teacher (a reverse-KL estimate)
        "reverse_kl_sum": float(sum(reverse_kl(p.logprobs, p.teacher_logprobs, m) * m.sum()
                                    for p, m in zip(scored, sampled))),
        "teacher_tokens": int(sum(m.sum() for m in sampled)),
    }


# -- codec ------------------------------------------------------------------------------------
# Layout: 8-byte little-endian header length | msgpack header | the four columns (all nodes'
# tokens, then logprobs, loss_mask, versions), each starting on an _ALIGN-byte boundary so that
# the decoded views are aligned (unaligned float32/int32 views are slow and some consumers reject
# them). Object-store and malloc buffers are at least 8-byte aligned themselves.
_ALIGN = 8


def _pad(n: int) -> int:
    return n + (-n % _ALIGN)


def _columns(teacher: bool, topk: int) -> list[tuple[str, np.dtype, int | None]]:
    """(field, dtype, k) of each column a tree with these teacher fields carries; k is None for the
    per-token columns, the width of the [n, k] top-k ones."""
    fields = [(f, dt, None) for f, dt in _ARRAY_FIELDS + (_TEACHER_FIELD,) * teacher]
    return fields + [(f, dt, topk) for f, dt in _TOPK_FIELDS] * (topk > 0)


def _column_offsets(hlen: int, total: int, columns: list) -> list[int]:
    """Start of each column, and (as the last entry) the end of the encoded tree."""
    offsets = [_pad(8 + hlen)]
    for _, dt, k in columns:
        offsets.append(offsets[-1] + _pad(total * (k or 1) * np.dtype(dt).itemsize))
    return offsets


def _msgpack_default(obj):
    # numpy scalars (np.float32 rewards, np.bool_ flags, np.int64 counts) pack as Python scalars.
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__} in trajectory tree metadata")


_get_dtype = operator.attrgetter("dtype")


def _column_parts(arrays: list, dtype: np.dtype) -> list:
    """The buffers to append for one column: the node arrays themselves when all are already of
    the wire dtype (bytearray.join then copies each once, with no per-array numpy overhead),
    otherwise one converted concatenation."""
    if arrays and set(map(_get_dtype, arrays)) == {dtype}:
        return arrays
    return [np.ascontiguousarray(np.concatenate(arrays) if arrays else [], dtype=dtype)]


def encode(tree: TrajectoryTree) -> bytearray:
    """Serialize a tree: a msgpack header followed by the raw array buffers (see module doc)."""
    nodes = tree.nodes
    columns = [[n.tokens for n in nodes], [n.logprobs for n in nodes],
               [n.loss_mask for n in nodes], [n.versions for n in nodes]]
    lengths = np.fromiter(map(len, columns[0]), dtype=np.int64, count=len(nodes))
    teacher = any(n.teacher_logprobs is not None for n in nodes)
    topk = next((n.teacher_topk_ids.shape[1] for n in nodes if n.teacher_topk_ids is not None), 0)
    layout = _columns(teacher, topk)
    for name, dtype, k in layout[4:]:   # nodes the teacher did not score (the prompt) travel as zeros
        values = [getattr(n, name) if getattr(n, name) is not None else np.zeros((len(n), k or 1), dtype)
                  for n in nodes]
        if k and any(v.shape != (len(n), k) for v, n in zip(values, nodes)):
            raise ValueError(f"{name}: every scored node needs [tokens, {k}] values")
        columns.append([v.reshape(-1) for v in values])
    header = msgpack.packb({
        "v": _CODEC_VERSION,
        "teacher": teacher,
        "topk": topk,
        "meta": tree.meta,
        "lengths": lengths.tobytes(),
        "nodes": [[n.parent, n.meta, n.reward, n.reward_info, n.advantage, n.infra_failure]
                  for n in nodes],
    }, use_bin_type=True, default=_msgpack_default)
    total = int(lengths.sum())
    offsets = _column_offsets(len(header), total, layout)
    parts = [len(header).to_bytes(8, "little"), header, bytes(offsets[0] - 8 - len(header))]
    for column, (_, dtype, k), start, end in zip(columns, layout, offsets, offsets[1:]):
        dtype = np.dtype(dtype)
        parts.extend(_column_parts(column, dtype))
        parts.append(bytes(end - start - total * (k or 1) * dtype.itemsize))  # alignment padding
    try:
        out = bytearray().join(parts)
    except TypeError:  # a non-contiguous node array: no buffer to join, copy it first
        out = bytearray().join(np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p for p in parts)
    if len(out) != offsets[-1]:
        raise ValueError("a node's logprobs, loss_mask or versions differ in length from its tokens")
    return out


def decode(data) -> TrajectoryTree:
    """Inverse of `encode`. Arrays are views into `data` (read-only if `data` is).

    Raises ValueError if `data` is not an encoded tree of this codec version.
    """
    buf = memoryview(data).cast("B")
    try:
        hlen = int.from_bytes(buf[:8], "little")
        if len(buf) < 8 or 8 + hlen > len(buf):
            raise ValueError(f"{len(buf)} bytes cannot hold a header of {hlen} bytes")
        header = msgpack.unpackb(buf[8:8 + hlen], raw=False, strict_map_key=False)
    except Exception as err:  # msgpack raises several types on foreign bytes
        raise ValueError(f"data is not an encoded trajectory tree: {err}") from None
    version = header.get("v") if isinstance(header, dict) else None
    if version != _CODEC_VERSION:
        raise ValueError(f"trajectory tree codec version {version!r} is not {_CODEC_VERSION}")
    try:
        lengths = np.frombuffer(header["lengths"], dtype=np.int64)
        records = header["nodes"]
        if len(records) != len(lengths) or (lengths < 0).any():
            raise ValueError("node table and lengths disagree")
        total = int(lengths.sum())
        layout = _columns(bool(header.get("teacher")), int(header.get("topk", 0)))
        offsets = _column_offsets(hlen, total, layout)
        if offsets[-1] > len(buf):
            raise ValueError(f"{len(buf)} bytes, the arrays need {offsets[-1]}")
        columns = [np.frombuffer(buf, dtype=dt, count=total * k, offset=offset).reshape(total, k) if k
                   else np.frombuffer(buf, dtype=dt, count=total, offset=offset)
                   for (_, dt, k), offset in zip(layout, offsets)]
        bounds = [0, *np.cumsum(lengths).tolist()]
        tokens, logprobs, loss_mask, versions = columns[:4]
        tree = TrajectoryTree.__new__(TrajectoryTree)
        tree.meta = header["meta"]
        # records are [parent, meta, reward, reward_info, advantage, infra_failure]: Node's field
        # order after the arrays, so they are passed positionally (the hot loop of decode).
        tree.nodes = [Node(tokens[lo:hi], logprobs[lo:hi], loss_mask[lo:hi], versions[lo:hi], *record)
                      for lo, hi, record in zip(bounds, bounds[1:], records)]
        for (name, _, _), column in zip(layout[4:], columns[4:]):
            for node, lo, hi in zip(tree.nodes, bounds, bounds[1:]):
                setattr(node, name, column[lo:hi])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"corrupt trajectory tree (codec version {version}): {err}") from None
    return tree
