"""Tree Training packing: a batch's root-to-leaf paths as one depth-first sequence of unique tokens.

Paths are merged into a trie on their token ids alone (the forward pass depends on nothing else),
so identical prefixes share their computation even when the generator did not report the sharing:
a prompt group's prompt, an agent episode's turns before a fork, two samples that happen to start
alike. Chains are compressed into nodes and the forest is serialized depth-first. Per packed token:

    parent    the packed index of the token before it on every path through it (-1 at a root);
              its logit row predicts this token, so a row with several children serves several
              labels: its log-softmax is computed once and gathered once per child (`tree_logprobs`)
    position  its depth (number of ancestors), the position id of the token on each of its paths

Token i attends to token j iff j is i or an ancestor of i. Depth-first order makes that an
interval test: j's subtree is the packed range [j, subtree_end[j]], so i sees j iff
j <= i <= subtree_end[j].

The loss side is not merged. `label_index` maps every (path, position) to the packed token it
labels, so the packed log-probs gather into the same [B, T-1] layout that per-path training uses
(`pad_paths`): a token shared by n paths gets one loss term per path, each with that path's
advantage, behaviour log-prob, loss mask and normaliser. Every aggregation and off-policy mode
therefore gives exactly the per-path loss; the gradient reaching a shared token is the sum of its
paths' terms (n_t / B times one term when they agree). The loss terms cost O(path tokens) of
elementwise work; the model, the part that costs, runs on the unique tokens only.

`tree_micro_batches` splits a batch under a token budget (and a bound on the key rows node-wise
attention gathers, see KEY_ROWS_PER_TOKEN): whole trees are packed first-fit-decreasing; a tree
over the limits is cut into runs of depth-first-consecutive paths, each run carrying its own copy
of the ancestors it needs, so every path is whole in one micro-batch and the split loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rayrl.algo.logprobs import gather_logprobs

_ROOT = 0  # the trie's virtual root: an empty node above the forest
# Node-wise tree attention gathers, for every node below a root, its ancestors' keys and values
# followed by its own: depth + length rows. That grows with depth times branching (a trunk with a
# one-token fork at every position is quadratic), so micro-batches bound it as well, relative to
# the token budget. One row holds 2 x kv-heads x head-dim numbers, ~1/20 of a token's activations
# in the tiny models and ~1/100 in 7B-class ones.
KEY_ROWS_PER_TOKEN = 16


class _Trie:
    """A radix trie (compressed chains) over token arrays."""

    def __init__(self) -> None:
        self.segments: list[np.ndarray] = [np.empty(0, np.int64)]
        self.children: list[dict[int, int]] = [{}]

    def _new(self, tokens: np.ndarray, children: dict[int, int] | None = None) -> int:
        self.segments.append(tokens)
        self.children.append(children if children is not None else {})
        return len(self.segments) - 1

    def insert(self, tokens: np.ndarray) -> None:
        node, pos, n = _ROOT, 0, len(tokens)
        while pos < n:
            child = self.children[node].get(int(tokens[pos]))
            if child is None:
                self.children[node][int(tokens[pos])] = self._new(tokens[pos:])
                return
            seg = self.segments[child]
            k = min(len(seg), n - pos)
            diff = np.flatnonzero(seg[:k] != tokens[pos:pos + k])
            common = int(diff[0]) if len(diff) else k   # >= 1: the first token was the dict key
            if common < k:  # the paths part inside this chain: split it there
                tail = self._new(seg[common:], self.children[child])
                self.segments[child], self.children[child] = seg[:common], {int(seg[common]): tail}
            elif k < len(seg):  # the path ends inside the chain (a prefix of another path)
                return
            node, pos = child, pos + common

    def walk(self, tokens: np.ndarray) -> list[tuple[int, int]]:
        """(node, tokens taken from it) along an inserted path; only the last may be partial."""
        out, node, pos = [], _ROOT, 0
        while pos < len(tokens):
            node = self.children[node][int(tokens[pos])]
            take = min(len(self.segments[node]), len(tokens) - pos)
            out.append((node, take))
            pos += take
        return out

    def preorder(self) -> tuple[list[int], np.ndarray]:
        """Nodes in depth-first order (children in insertion order), and each node's parent."""
        parent = np.full(len(self.segments), -1, np.int64)
        order, stack = [], list(reversed(self.children[_ROOT].values()))
        while stack:
            node = stack.pop()
            order.append(node)
            kids = list(self.children[node].values())
            parent[kids] = node
            stack.extend(reversed(kids))
        return order, parent


@dataclass
class PackedTree:
    """One micro-batch's paths as a depth-first forest of unique tokens (see the module doc).

    Token arrays are [N] (N unique tokens); node arrays are [M] in packed order, each node a chain
    of consecutive packed tokens; `path_index[b]` holds the packed index of every token of path b.
    """

    tokens: np.ndarray        # [N] int64
    parent: np.ndarray        # [N] int64, -1 at roots
    position: np.ndarray      # [N] int64, depth
    subtree_end: np.ndarray   # [N] int64, last packed index of the token's subtree
    node_start: np.ndarray    # [M]
    node_length: np.ndarray   # [M]
    node_parent: np.ndarray   # [M] index into the node arrays, -1 at roots
    path_index: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def path_tokens(self) -> int:
        return int(sum(len(p) for p in self.path_index))

    @property
    def key_rows(self) -> int:
        """Rows node-wise attention gathers per layer (see KEY_ROWS_PER_TOKEN)."""
        below = self.node_parent >= 0
        return int((self.position[self.node_start[below]] + self.node_length[below]).sum())

    @property
    def attended_pairs(self) -> int:
        """(query, key) pairs tree attention computes: each token sees its ancestors and itself."""
        return int((self.position + 1).sum())

    def ancestors(self, node: int) -> np.ndarray:
        """Packed indices of every token above `node`'s first token, root first."""
        chain = []
        a = self.node_parent[node]
        while a >= 0:
            chain.append(np.arange(self.node_start[a], self.node_start[a] + self.node_length[a]))
            a = self.node_parent[a]
        return np.concatenate(chain[::-1]) if chain else np.empty(0, np.int64)

    def label_index(self, width: int) -> np.ndarray:
        """[B, width - 1]: the packed index of token t+1 of path b (0 past its end), the layout of
        `pad_paths` (position t of its shifted arrays predicts token t+1)."""
        out = np.zeros((len(self.path_index), max(width - 1, 0)), np.int64)
        for b, idx in enumerate(self.path_index):
            out[b, :len(idx) - 1] = idx[1:]
        return out


def pack_paths(paths: list[np.ndarray]) -> PackedTree:
    """Merge token arrays into a trie and serialize it depth-first (see the module doc)."""
    if not paths or any(len(p) == 0 for p in paths):
        raise ValueError("pack_paths needs at least one path and no empty path")
    paths = [np.asarray(p, np.int64) for p in paths]
    trie = _Trie()
    for p in paths:
        trie.insert(p)
    order, trie_parent = trie.preorder()
    slot = np.full(len(trie.segments), -1, np.int64)       # trie node -> packed node
    slot[order] = np.arange(len(order))
    length = np.array([len(trie.segments[n]) for n in order], np.int64)
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    above = trie_parent[order]                               # -1 under the virtual root
    node_parent = np.where(above >= 0, slot[above], -1)

    # Depth and subtree size per node: parents come before children in preorder, so one pass
    # each way suffices.
    depth = np.zeros(len(order), np.int64)
    for m in range(len(order)):
        if node_parent[m] >= 0:
            depth[m] = depth[node_parent[m]] + length[node_parent[m]]
    size = length.copy()
    for m in range(len(order) - 1, -1, -1):
        if node_parent[m] >= 0:
            size[node_parent[m]] += size[m]

    n = int(length.sum())
    node_of = np.repeat(np.arange(len(order)), length)       # packed token -> packed node
    offset = np.arange(n) - start[node_of]                   # index within its node
    parent = np.arange(n) - 1
    first = offset == 0
    parent_node = node_parent[node_of[first]]
    parent[first] = np.where(parent_node >= 0, start[parent_node] + length[parent_node] - 1, -1)
    path_index = []
    for p in paths:
        path_index.append(np.concatenate([start[slot[node]] + np.arange(take) for node, take in trie.walk(p)]))
    return PackedTree(
        tokens=np.concatenate([trie.segments[m] for m in order]).astype(np.int64),
        parent=parent, position=depth[node_of] + offset,
        subtree_end=(start + size - 1)[node_of],
        node_start=start, node_length=length, node_parent=node_parent, path_index=path_index)


def tree_logprobs(logits: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits[parent[j]] / temperature)[tokens[j]] for every packed token j, [N].

    logits [N, V]. The logsumexp runs once per row (a branch point's row serves all its children)
    and each label is one gathered element, so no [N, V] log-softmax is kept for backward. Roots
    (parent -1) have no prediction; their entries are finite placeholders that no path reads.
    """
    return gather_logprobs(logits, tokens, temperature, rows=parent.clamp(min=0))


def tree_micro_batches(paths: list[np.ndarray], token_budget: int) -> list[list[int]]:
    """Indices of `paths` per micro-batch, each packing to at most `token_budget` unique tokens
    and `KEY_ROWS_PER_TOKEN * token_budget` gathered key rows (a single path over the budget goes
    alone, as in per-path training).

    Units are whole trees (paths sharing a first token) or, for a tree over the limits, runs of
    depth-first-consecutive paths: a run's tokens are the union of its paths, which in depth-first
    order is the first path plus each later path beyond its common prefix with the one before; its
    key rows are those of the nodes that adds (counted in the batch's trie, an upper bound for the
    run's own). Units are then placed first-fit-decreasing.
    """
    if not paths:
        return []
    limits = np.array([token_budget, KEY_ROWS_PER_TOKEN * token_budget])
    packed = pack_paths([np.asarray(p, np.int64) for p in paths])
    node_depth = packed.position[packed.node_start]
    node_rows = np.where(packed.node_parent >= 0, node_depth + packed.node_length, 0)
    node_of = np.repeat(np.arange(len(packed.node_start)), packed.node_length)
    ends = np.array([idx[-1] for idx in packed.path_index])
    order = np.argsort(ends, kind="stable")                  # depth-first order of the paths
    units: list[tuple[np.ndarray, list[int]]] = []
    run: list[int] = []
    load = np.zeros(2, np.int64)
    for k, b in enumerate(order):
        idx = packed.path_index[b]
        prev = packed.path_index[order[k - 1]] if k else None
        common = _common_prefix(prev, idx) if prev is not None and prev[0] == idx[0] else 0
        if run and (common == 0 or (load + _cost(idx, common, node_of, node_depth, node_rows) > limits).any()):
            units.append((load, run))
            run, load, common = [], np.zeros(2, np.int64), 0
        run.append(int(b))
        load = load + _cost(idx, common, node_of, node_depth, node_rows)
    units.append((load, run))

    bins: list[list[int]] = []
    loads: list[np.ndarray] = []
    for cost, run in sorted(units, key=lambda u: -u[0][0]):
        for i, used in enumerate(loads):
            if (used + cost <= limits).all():
                bins[i].extend(run)
                loads[i] = used + cost
                break
        else:
            bins.append(list(run))
            loads.append(cost)
    return bins


def _cost(idx: np.ndarray, common: int, node_of, node_depth, node_rows) -> np.ndarray:
    """(tokens, key rows) a path adds to a run whose previous path shares `common` tokens with it."""
    chain = np.unique(node_of[idx])
    return np.array([len(idx) - common, node_rows[chain[node_depth[chain] >= common]].sum()])


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    k = min(len(a), len(b))
    diff = np.flatnonzero(a[:k] != b[:k])
    return int(diff[0]) if len(diff) else k
