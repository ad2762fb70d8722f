import pytest

from tinyutils.structures import BoundedStack, chunk, merge_intervals


def test_stack_push_pop_order():
    s = BoundedStack(3)
    s.push(1)
    s.push(2)
    assert s.pop() == 2
    assert s.pop() == 1
    assert len(s) == 0


def test_stack_overflow():
    s = BoundedStack(2)
    s.push("a")
    s.push("b")
    assert s.is_full()
    with pytest.raises(OverflowError):
        s.push("c")


def test_stack_not_full():
    s = BoundedStack(2)
    s.push("a")
    assert not s.is_full()


def test_stack_pop_empty():
    with pytest.raises(IndexError):
        BoundedStack(1).pop()


def test_stack_peek():
    s = BoundedStack(2)
    assert s.peek() is None
    s.push(7)
    assert s.peek() == 7 and len(s) == 1


def test_stack_bad_capacity():
    with pytest.raises(ValueError):
        BoundedStack(0)
    assert BoundedStack(1).capacity == 1


def test_merge_overlapping():
    assert merge_intervals([(1, 3), (2, 6), (8, 10)]) == [(1, 6), (8, 10)]


def test_merge_touching_and_unsorted():
    assert merge_intervals([(5, 7), (1, 5)]) == [(1, 7)]


def test_merge_disjoint():
    assert merge_intervals([(1, 2), (4, 5)]) == [(1, 2), (4, 5)]


def test_chunk():
    assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_chunk_bad_size():
    with pytest.raises(ValueError):
        chunk([1], 0)
