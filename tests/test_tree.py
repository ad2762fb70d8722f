import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayrl.tree import NOT_SAMPLED, TrajectoryTree, decode, encode, iter_paths

FIELDS = ("tokens", "logprobs", "loss_mask", "versions")
SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
metas = st.dictionaries(st.text(max_size=6), values, max_size=4)
floats32 = st.floats(-1e6, 0.0, width=32)


@st.composite
def nodes(draw, parent_count):
    """A child node: its parent, arrays (possibly empty), meta."""
    # Half the time extend the newest node, so that deep chains appear as well as wide fans.
    parent = draw(st.one_of(st.just(parent_count - 1), st.integers(0, parent_count - 1)))
    n = draw(st.integers(0, 12))
    tokens = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    mask = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))  # 0: observation tokens
    version = draw(st.integers(0, 50))
    versions = [version if m else NOT_SAMPLED for m in mask]
    logprobs = [draw(floats32) if m else 0.0 for m in mask]
    return parent, tokens, logprobs, mask, versions, draw(metas)


@st.composite
def trees(draw):
    tree = TrajectoryTree(draw(st.lists(st.integers(0, 2**31 - 1), max_size=20)), meta=draw(metas))
    for _ in range(draw(st.integers(0, 14))):
        parent, *arrays, meta = draw(nodes(len(tree.nodes)))
        tree.add(parent, *arrays, meta=meta)
    for leaf in tree.leaves():
        node = tree.nodes[leaf]
        node.reward = draw(st.one_of(st.none(), st.floats(-10, 10)))
        node.reward_info = draw(st.dictionaries(st.text(max_size=5), st.floats(-1, 1), max_size=3))
        node.advantage = draw(st.one_of(st.none(), st.floats(-5, 5)))
        node.infra_failure = draw(st.booleans())
    return tree


def expected_paths(tree):
    """Root-to-leaf paths computed from the parent pointers alone."""
    parents = {n.parent for n in tree.nodes}
    out = []
    for leaf in [i for i in range(len(tree.nodes)) if i not in parents]:
        chain, i = [], leaf
        while i != -1:
            chain.insert(0, i)
            i = tree.nodes[i].parent
        out.append((leaf, {f: np.concatenate([getattr(tree.nodes[c], f) for c in chain]) for f in FIELDS}))
    return out


def assert_paths(tree, reference):
    paths = list(iter_paths(tree))
    want = expected_paths(reference)
    assert [p.leaf for p in paths] == [leaf for leaf, _ in want]
    for path, (leaf, arrays) in zip(paths, want):
        for f in FIELDS:
            got = getattr(path, f)
            assert got.dtype == arrays[f].dtype and np.array_equal(got, arrays[f]), f
        node = reference.nodes[leaf]
        assert (path.reward, path.advantage, path.infra_failure) == \
            (node.reward, node.advantage, node.infra_failure)
        assert len(path) == len(arrays["tokens"])


@SETTINGS
@given(trees())
def test_codec_round_trip(tree):
    data = encode(tree)
    back = decode(data)
    assert back == tree
    assert back.meta == tree.meta and [n.meta for n in back.nodes] == [n.meta for n in tree.nodes]
    # the decoded arrays are aligned views of the encoded bytes, not copies
    for f in FIELDS:
        arr = getattr(back.nodes[0], f)
        assert arr.flags.aligned and (len(arr) == 0 or not arr.flags.owndata)


@SETTINGS
@given(trees())
def test_pickle_round_trip(tree):
    assert pickle.loads(pickle.dumps(tree, protocol=5)) == tree
    assert pickle.loads(pickle.dumps(tree, protocol=2)) == tree
    buffers = []
    data = pickle.dumps(tree, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1  # the arrays travel out of band, in one buffer
    # as Ray hands them back: read-only memory
    back = pickle.loads(data, buffers=[memoryview(bytes(b.raw())) for b in buffers])
    assert back == tree


@SETTINGS
@given(trees())
def test_paths_leaves_and_min_version(tree):
    assert_paths(tree, tree)
    sampled = np.concatenate([n.versions for n in tree.nodes])
    sampled = sampled[sampled != NOT_SAMPLED]
    assert tree.min_version == (int(sampled.min()) if len(sampled) else NOT_SAMPLED)
    assert tree.num_tokens == sum(len(n.tokens) for n in tree.nodes)
    # a tree decoded from read-only memory is fully usable
    ro = decode(bytes(encode(tree)))
    assert not ro.nodes[0].tokens.flags.writeable
    assert_paths(ro, tree)
    assert ro.min_version == tree.min_version


def test_decoded_read_only_tree_can_grow():
    tree = TrajectoryTree([1, 2, 3], meta={"task": "swe"})
    a = tree.add(0, [4, 5], [-0.5, -0.25], [1, 1], [3, 3])
    back = decode(bytes(encode(tree)))
    b = back.add(a, [6], [-1.0], [1], [4])
    assert [p.tokens.tolist() for p in back.paths()] == [[1, 2, 3, 4, 5, 6]]
    assert back.paths()[0].leaf == b and back.min_version == 3
    assert decode(encode(back)) == back


def test_hand_built_tree_paths():
    tree = TrajectoryTree([10, 11], meta={"group": 1})
    turn = tree.add(0, [20, 21], [-0.1, -0.2], [1, 1], [5, 5], meta={"turn": 0, "role": "assistant"})
    obs = tree.add(turn, [30], meta={"role": "tool", "tool": "bash"})
    left = tree.add(obs, [40], [-0.4], [1], [6])
    right = tree.add(obs, [], meta={"note": "empty retry"})
    other = tree.add(0, [50], [-0.5], [1], [4])
    tree.nodes[left].reward, tree.nodes[other].infra_failure = 1.0, True
    paths = tree.paths()
    assert [p.leaf for p in paths] == [left, right, other]
    assert [p.tokens.tolist() for p in paths] == [[10, 11, 20, 21, 30, 40], [10, 11, 20, 21, 30], [10, 11, 50]]
    assert paths[0].loss_mask.tolist() == [0, 0, 1, 1, 0, 1]
    assert paths[0].versions.tolist() == [-1, -1, 5, 5, -1, 6]
    assert paths[0].logprobs.tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, -0.4])
    assert (paths[0].reward, paths[2].infra_failure) == (1.0, True)
    assert tree.min_version == 4
    assert TrajectoryTree([1, 2]).min_version == NOT_SAMPLED


def test_numpy_scalars_in_metadata():
    tree = TrajectoryTree([1], meta={"n": np.int64(3)})
    leaf = tree.add(0, [2], [-0.1], [1], [0])
    tree.nodes[leaf].reward = np.float32(0.5)
    tree.nodes[leaf].infra_failure = np.bool_(False)
    back = decode(encode(tree))
    assert back.meta == {"n": 3} and back.nodes[leaf].reward == 0.5
    assert type(back.nodes[leaf].reward) is float and back.nodes[leaf].infra_failure is False


def test_encode_converts_foreign_arrays_and_checks_lengths():
    tree = TrajectoryTree([1, 2, 3])
    leaf = tree.add(0, [4, 5, 6, 7], [-0.1, -0.2, -0.3, -0.4], [1, 1, 1, 1], [2, 2, 2, 2])
    want = decode(encode(tree))
    node = tree.nodes[leaf]
    node.tokens = np.array([4, 5, 6, 7], dtype=np.int64)                 # wrong dtype
    node.logprobs = np.array([-0.1, 0, -0.2, 0, -0.3, 0, -0.4, 0], np.float32)[::2]  # strided view
    node.versions = np.array([2, 2, 2, 2], dtype=">i4")                  # big-endian
    back = decode(encode(tree))
    assert back == want and back.nodes[leaf].tokens.dtype == np.int32
    node.loss_mask = np.ones(3, np.uint8)
    with pytest.raises(ValueError, match="length"):
        encode(tree)


def _with_header(data, **changes):
    hlen = int.from_bytes(data[:8], "little")
    header = msgpack.unpackb(bytes(data[8:8 + hlen]), raw=False)
    header.update(changes)
    new = msgpack.packb(header, use_bin_type=True)
    assert len(new) == hlen  # same length: the array section stays where it was
    return bytes(data[:8]) + new + bytes(data[8 + hlen:])


def test_foreign_version_and_corrupt_data_raise():
    tree = TrajectoryTree([1, 2, 3])
    tree.add(0, [4, 5], [-0.1, -0.2], [1, 1], [0, 0])
    data = encode(tree)
    assert decode(_with_header(data)) == tree
    with pytest.raises(ValueError, match="codec version 99"):
        decode(_with_header(data, v=99))
    with pytest.raises(ValueError, match="not an encoded trajectory tree"):
        decode(pickle.dumps({"nodes": []}))
    with pytest.raises(ValueError):
        decode(b"")
    with pytest.raises(ValueError):
        decode(bytes(data[: len(data) - 16]))  # truncated array section
    with pytest.raises(ValueError):
        decode(len(b"\x93\x01\x02\x03").to_bytes(8, "little") + b"\x93\x01\x02\x03")  # [1, 2, 3]


def test_ray_round_trip(ray_session):
    ray = ray_session
    tree = TrajectoryTree(np.arange(1000), meta={"task": "swe"})
    for i in range(4):  # large enough for the shared-memory object store
        leaf = tree.add(0, np.arange(30_000), np.full(30_000, -0.5), np.ones(30_000), np.full(30_000, i))
        tree.nodes[leaf].reward = float(i % 2)
    back = ray.get(ray.put(tree))
    assert back == tree
    assert not back.nodes[1].tokens.flags.writeable  # zero-copy view of the object store
    assert_paths(back, tree)

    @ray.remote
    def leaves_and_min_version(t):
        return [p.leaf for p in t.paths()], t.min_version

    assert ray.get(leaves_and_min_version.remote(tree)) == ([1, 2, 3, 4], 0)
