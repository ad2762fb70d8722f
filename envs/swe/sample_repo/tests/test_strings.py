from tinyutils.strings import caesar, is_palindrome, run_length, slugify, truncate


def test_slugify_basic():
    assert slugify("Hello World") == "hello-world"


def test_slugify_punctuation_and_separator():
    assert slugify("  Ray, RL & Co.  ", sep="_") == "ray_rl_co"


def test_slugify_digits():
    assert slugify("Version 2 release") == "version-2-release"


def test_palindrome_true():
    assert is_palindrome("A man, a plan, a canal: Panama")


def test_palindrome_false():
    assert not is_palindrome("rayrl")


def test_palindrome_near_miss():
    assert not is_palindrome("abca")


def test_palindrome_short():
    assert is_palindrome("") and is_palindrome("x")


def test_truncate_short_text_unchanged():
    assert truncate("hello", 5) == "hello"


def test_truncate_cuts_with_ellipsis():
    assert truncate("hello world", 8) == "hello..."


def test_truncate_tiny_width():
    assert truncate("hello", 2) == ".."


def test_caesar_shift_and_wrap():
    assert caesar("xyz", 3) == "abc"


def test_caesar_upper_and_other():
    assert caesar("Hello, World!", 1) == "Ifmmp, Xpsme!"


def test_caesar_roundtrip():
    assert caesar(caesar("Round Trip", 7), -7) == "Round Trip"


def test_run_length():
    assert run_length("aaabcc") == "a3b1c2"


def test_run_length_single_and_empty():
    assert run_length("z") == "z1"
    assert run_length("") == ""
