"""Number helpers."""


def clamp(value, low, high):
    """`value` limited to the closed interval [low, high]."""
    if low > high:
        raise ValueError("low must not exceed high")
    if value < low:
        return low
    if value > high:
        return high
    return value


def gcd(a, b):
    """Greatest common divisor (always >= 0)."""
    a, b = abs(a), abs(b)
    while b != 0:
        a, b = b, a % b
    return a


def is_prime(n):
    """Primality by trial division."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


def digit_sum(n):
    """Sum of the decimal digits of |n|."""
    n = abs(n)
    total = 0
    while n > 0:
        total += n % 10
        n //= 10
    return total


def fibonacci(n):
    """The n-th Fibonacci number, fibonacci(0) == 0, fibonacci(1) == 1."""
    if n < 0:
        raise ValueError("n must be non-negative")
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def median(values):
    """Median of a non-empty sequence (mean of the middle two for even lengths)."""
    if not values:
        raise ValueError("median of an empty sequence")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2 == 1:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
