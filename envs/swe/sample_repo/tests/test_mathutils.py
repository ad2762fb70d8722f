import pytest

from tinyutils.mathutils import clamp, digit_sum, fibonacci, gcd, is_prime, median


def test_clamp_inside():
    assert clamp(5, 0, 10) == 5


def test_clamp_edges():
    assert clamp(-3, 0, 10) == 0
    assert clamp(42, 0, 10) == 10
    assert clamp(10, 0, 10) == 10
    assert clamp(0, 0, 10) == 0


def test_clamp_bad_interval():
    with pytest.raises(ValueError):
        clamp(1, 5, 2)


def test_gcd():
    assert gcd(12, 18) == 6
    assert gcd(17, 5) == 1


def test_gcd_negative_and_zero():
    assert gcd(-4, 6) == 2
    assert gcd(0, 9) == 9


def test_is_prime_small():
    assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]


def test_is_prime_squares():
    assert not is_prime(49)
    assert not is_prime(121)
    assert is_prime(97)


def test_digit_sum():
    assert digit_sum(1234) == 10
    assert digit_sum(-905) == 14


def test_digit_sum_zero():
    assert digit_sum(0) == 0


def test_fibonacci_values():
    assert [fibonacci(i) for i in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]


def test_fibonacci_negative():
    with pytest.raises(ValueError):
        fibonacci(-1)


def test_median_odd():
    assert median([5, 1, 3]) == 3


def test_median_even():
    assert median([4, 1, 3, 2]) == 2.5


def test_median_empty():
    with pytest.raises(ValueError):
        median([])
