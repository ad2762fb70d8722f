"""String helpers."""


def slugify(text, sep="-"):
    """Lower-case words joined by `sep`; characters other than letters and digits split words."""
    words = []
    current = ""
    for ch in text:
        if ch.isalnum():
            current += ch.lower()
        elif current:
            words.append(current)
            current = ""
    if current:
        words.append(current)
    return sep.join(words)


def is_palindrome(text):
    """True when the letters and digits of `text` read the same both ways (case-insensitive)."""
    chars = [c.lower() for c in text if c.isalnum()]
    i, j = 0, len(chars) - 1
    while i < j:
        if chars[i] != chars[j]:
            return False
        i += 1
        j -= 1
    return True


def truncate(text, width, ellipsis="..."):
    """`text` cut to at most `width` characters, ending with `ellipsis` when cut."""
    if len(text) <= width:
        return text
    if width <= len(ellipsis):
        return ellipsis[:width]
    return text[: width - len(ellipsis)] + ellipsis


def caesar(text, shift):
    """Shift ASCII letters by `shift` places, wrapping around; other characters are kept."""
    out = []
    for ch in text:
        if "a" <= ch <= "z":
            out.append(chr((ord(ch) - ord("a") + shift) % 26 + ord("a")))
        elif "A" <= ch <= "Z":
            out.append(chr((ord(ch) - ord("A") + shift) % 26 + ord("A")))
        else:
            out.append(ch)
    return "".join(out)


def run_length(text):
    """Run-length encoding: "aaab" -> "a3b1"."""
    if not text:
        return ""
    out = []
    count = 1
    for prev, ch in zip(text, text[1:]):
        if ch == prev:
            count += 1
        else:
            out.append(f"{prev}{count}")
            count = 1
    out.append(f"{text[-1]}{count}")
    return "".join(out)
