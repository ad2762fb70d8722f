import numpy as np
import pytest

from rayrl.algo.advantages import assign_advantages, group_advantages, is_zero_variance
from rayrl.tree import TrajectoryTree

EPS = 1e-6


def test_grpo_hand_values():
    # mean 0.5, population std 0.5
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 1.0]))
    a = 0.5 / (0.5 + EPS)
    np.testing.assert_allclose(adv, [a, -a, -a, a], rtol=1e-12)


def test_grpo_uses_population_std():
    # rewards [0, 1, 2]: mean 1, population std sqrt(2/3) = 0.816496... (sample std would be 1)
    adv = group_advantages(np.array([0.0, 1.0, 2.0]), eps=0.0)
    np.testing.assert_allclose(adv, [-1.224744871391589, 0.0, 1.224744871391589], rtol=1e-12)


def test_grpo_custom_eps_and_constant_group():
    np.testing.assert_allclose(group_advantages([3.0, 1.0], eps=1.0), [0.5, -0.5])  # std 1
    np.testing.assert_array_equal(group_advantages([0.7, 0.7, 0.7]), [0.0, 0.0, 0.0])


def test_dr_grpo_hand_values():
    # mean 0.25: no std division
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), mode="dr_grpo")
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25], rtol=1e-12)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="'ppo'"):
        group_advantages(np.array([1.0, 0.0]), mode="ppo")


def _group(rewards, failures=()):
    tree = TrajectoryTree([1, 2, 3])
    for i, r in enumerate(rewards):
        leaf = tree.add(0, [10 + i], [-0.5], [1], [0])
        tree.nodes[leaf].reward = r
        tree.nodes[leaf].infra_failure = i in failures
    return tree


def test_assign_grpo_on_tree():
    tree = _group([1.0, 0.0, 0.0, 1.0])
    assign_advantages(tree, "grpo")
    a = 0.5 / (0.5 + EPS)
    assert [tree.nodes[i].advantage for i in tree.leaves()] == pytest.approx([a, -a, -a, a], rel=1e-12)
    assert tree.nodes[0].advantage is None  # inner nodes untouched


def test_infra_failures_and_ungraded_leaves_are_excluded():
    # valid leaves are rewards [1, 0, 0, 1] (indices 0, 2, 3, 5): leaf 1 crashed with a reward
    # that must not enter the baseline, leaf 4 was never graded.
    tree = _group([1.0, 5.0, 0.0, 0.0, None, 1.0], failures={1})
    assign_advantages(tree, "dr_grpo")
    assert [tree.nodes[i].advantage for i in tree.leaves()] == pytest.approx([0.5, 0.0, -0.5, -0.5, 0.0, 0.5])
    assign_advantages(tree, "grpo")
    a = 0.5 / (0.5 + EPS)
    assert [tree.nodes[i].advantage for i in tree.leaves()] == pytest.approx([a, 0.0, -a, -a, 0.0, a])


def test_no_valid_leaf_gives_zeros():
    tree = _group([1.0, None, 0.0], failures={0, 2})
    assign_advantages(tree, "grpo")
    assert [tree.nodes[i].advantage for i in tree.leaves()] == [0.0, 0.0, 0.0]


def test_single_valid_leaf_gives_zero():
    tree = _group([1.0, 0.0], failures={1})
    assign_advantages(tree, "grpo")
    assert [tree.nodes[i].advantage for i in tree.leaves()] == [0.0, 0.0]


def test_zero_variance_detection():
    assert is_zero_variance([1.0, 1.0, 1.0])
    assert is_zero_variance([0.0, 0.0])
    assert not is_zero_variance([1.0, 0.0, 1.0])
    assert is_zero_variance([1.0, None, 1.0])           # ungraded entries ignored
    assert not is_zero_variance([1.0, None, 0.5])
    assert is_zero_variance([0.3])                      # one sample: no contrast
    assert is_zero_variance([])
    assert is_zero_variance(np.array([2.0, 2.0, np.nan]))


def test_zero_variance_on_tree_ignores_infra_failures():
    assert is_zero_variance(_group([1.0, 0.0, 1.0, 1.0], failures={1}))
    assert not is_zero_variance(_group([1.0, 0.0, 1.0, 1.0], failures={3}))
