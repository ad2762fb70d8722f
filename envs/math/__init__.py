"""Math: problems with a canonical final answer, checked by extraction, normalization and
equivalence (exact rationals, floats within 1e-6, symbolic equality with sympy).

Tasks are JSONL rows: `task_id`, `problem`, `answer` (the canonical answer string) and an
optional `solution` (worked steps, for demonstrations). The seeded generator makes multi-step
integer/fraction arithmetic and linear equations; difficulty is the number of operations.
"""

from __future__ import annotations

import hashlib
import random
import re
from fractions import Fraction
from pathlib import Path

from envs.rows import TaskFormatError, check_fields, read_jsonl
from envs.base import GeneratedEnv, Task

SAMPLES = Path(__file__).with_name("samples.jsonl")
_FIELDS = {"task_id": str, "problem": str, "answer": str}
_OPTIONAL = {"solution": str}


def parse_row(row, where: str) -> dict:
    check_fields(row, where, _FIELDS, _OPTIONAL)
    if not row["answer"].strip():
        raise TaskFormatError(f"{where}: field 'answer' is empty")
    if normalize(row["answer"]) is None or _parse(normalize(row["answer"])) is None:
        raise TaskFormatError(f"{where}: field 'answer' {row['answer']!r} is not a parsable math answer")
    return {k: row[k] for k in (*_FIELDS, *_OPTIONAL) if k in row}


def load_tasks(path: str | Path) -> list[dict]:
    return read_jsonl(path, parse_row)


# ---------------------------------------------------------------- extraction

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"


def _last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _looks_like_math(text: str) -> bool:
    """A bare answer (`3/4`, `2(x+1)`, `\\frac{1}{2}`) rather than prose."""
    if len(text) > 60 or not text or "\n" in text:
        return False
    words = re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", text))
    return all(w in ("sqrt", "pi") for w in words)


def extract_answer(response: str) -> tuple[str | None, str]:
    """(the final answer, how it was found): \\boxed{}, "answer is X", a bare answer, or the
    last number in the text."""
    text = response.strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    said = list(re.finditer(r"answer\s*(?:is|:|=)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", text, re.I | re.S))
    if said:
        found = said[-1].group(1).strip().rstrip(".")
        numbers = re.findall(_NUMBER, found)
        if not _looks_like_math(found.strip("$")) and numbers:   # "the answer is 21 apples"
            return numbers[-1], "answer_is"
        return found, "answer_is"
    bare = text.rstrip(".").strip()
    if _looks_like_math(bare.strip("$")):
        return bare, "bare"
    numbers = re.findall(_NUMBER, text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


# ---------------------------------------------------------------- normalization

def _replace_frac(s: str) -> str | None:
    """`\\frac{a}{b}` -> `(a)/(b)`, innermost first; None when the braces are unbalanced."""
    for _ in range(50):
        m = re.search(r"\\frac\s*\{", s)
        if not m:
            return s
        parts, i = [], m.end()
        for _k in range(2):
            depth, j = 1, i
            while j < len(s) and depth:
                depth += {"{": 1, "}": -1}.get(s[j], 0)
                j += 1
            if depth:
                return None
            parts.append(s[i:j - 1])
            i = j
            if _k == 0:
                if i >= len(s) or s[i] != "{":
                    return None
                i += 1
        s = s[:m.start()] + f"({parts[0]})/({parts[1]})" + s[i:]
    return None


def normalize(answer: str) -> str | None:
    """A canonical plain-text form: no $, spaces, thousands separators, trailing .0 or LaTeX
    fractions; `None` when it cannot be made sense of (unbalanced braces)."""
    s = answer.strip()
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    for a, b in (("$", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\left", ""), ("\\right", ""),
                 ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cdot", "*"), ("\\times", "*"),
                 ("\\div", "/"), ("\\pi", "pi"), ("\\%", ""), ("%", ""), ("\u2212", "-")):
        s = s.replace(a, b)
    s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
    s = _replace_frac(s)
    if s is None:
        return None
    s = re.sub(r"\s+", "", s).rstrip(".")
    while re.search(r"(\d),(\d{3})(?!\d)", s):
        s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    s = re.sub(r"^[A-Za-z]=(?=.)", "", s)          # "x=3" -> "3"
    s = re.sub(r"(?<![\d.])(\d+)\.0+(?!\d)", r"\1", s)
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    return s or None


# ---------------------------------------------------------------- equivalence

_SAFE = re.compile(r"[0-9A-Za-z+\-*/().]+")


def _parse(s: str):
    """A sympy expression for a normalized answer, or None. Only digits, single-letter
    variables, sqrt, pi and arithmetic get to sympy's parser (which evaluates its input)."""
    try:
        import sympy
        from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                                parse_expr, standard_transformations)
    except ImportError:   # pragma: no cover - sympy ships with torch
        return None
    if not _SAFE.fullmatch(s) or len(s) > 200:
        return None
    names = re.findall(r"[A-Za-z]+", s)
    if any(len(n) > 1 and n not in ("sqrt", "pi") for n in names):
        return None
    # No towers or huge powers; no exponent notation past 1e99 either (sympy's Float of 1e999999
    # takes half a minute, and grows with the exponent's square).
    if re.search(r"\*\*[(\d.]*\d{3,}|\*\*.*\*\*|\d[eE][+-]?\d{3,}", s):
        return None
    local = {c: sympy.Symbol(c) for c in names if len(c) == 1} | {"sqrt": sympy.sqrt, "pi": sympy.pi}
    try:
        return parse_expr(s, local_dict=local, global_dict={"Integer": sympy.Integer, "Float": sympy.Float,
                                                            "Rational": sympy.Rational, "Symbol": sympy.Symbol},
                          transformations=standard_transformations + (implicit_multiplication_application, convert_xor))
    except Exception:
        return None


def equivalent(a: str, b: str) -> tuple[bool, str]:
    """Whether two normalized answers are equal, and how it was decided."""
    if a == b:
        return True, "exact"
    x, y = _parse(a), _parse(b)
    if x is None or y is None:
        return False, "unparsable"
    try:
        if x.is_number and y.is_number:
            diff = abs(complex(x.evalf()) - complex(y.evalf()))
            return diff <= 1e-6 * max(1.0, abs(complex(y.evalf()))), "numeric"
        import sympy
        return sympy.simplify(x - y) == 0, "symbolic"
    except Exception as err:   # sympy failing on odd input is the answer's fault
        return False, f"error: {type(err).__name__}"


def check(response: str, reference: str) -> tuple[float, dict]:
    """Reward 1/0 for `response` against the canonical `reference`, with the breakdown."""
    extracted, how = extract_answer(response)
    info = {"extracted": extracted, "extraction": how, "normalized": None, "reason": ""}
    if extracted is None:
        info["reason"] = "no answer found"
        return 0.0, info
    norm, ref = normalize(extracted), normalize(reference)
    info["normalized"] = norm
    if norm is None:
        info["reason"] = "unparsable answer"
        return 0.0, info
    ok, why = equivalent(norm, ref)
    info["reason"] = why if ok else ("unparsable answer" if why == "unparsable" else f"wrong ({why})")
    return float(ok), info


# ---------------------------------------------------------------- generator

def _fmt(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _operand(rng: random.Random, fractions: bool) -> Fraction:
    if fractions and rng.random() < 0.5:
        return Fraction(rng.randint(1, 9), rng.randint(2, 9))
    return Fraction(rng.randint(1, 20))


def _show(q: Fraction) -> str:
    return _fmt(q) if q.denominator == 1 else f"({_fmt(q)})"


def _arithmetic(rng: random.Random, ops: int) -> dict:
    fractions = rng.random() < 0.5
    value = _operand(rng, fractions)
    text, steps = _show(value), []
    for _ in range(ops):
        op, b = rng.choice("+-*/"), _operand(rng, fractions)
        new = {"+": value + b, "-": value - b, "*": value * b, "/": value / b}[op]
        steps.append(f"{_fmt(value)} {op} {_fmt(b)} = {_fmt(new)}")
        text, value = f"({text} {op} {_show(b)})" if _ != ops - 1 else f"{text} {op} {_show(b)}", new
    return {"problem": f"Compute {text}. Give the result as an integer or a fraction in lowest terms.",
            "answer": _fmt(value), "solution": "; ".join(steps)}


def _equation(rng: random.Random, ops: int) -> dict:
    """Solve `f(x) = c` where f applies `ops` operations to x (linear in x)."""
    x0 = Fraction(rng.randint(-12, 12)) if rng.random() < 0.7 else Fraction(rng.randint(-9, 9), rng.randint(2, 5))
    text, value, steps = "x", x0, []
    for i in range(ops):
        op, b = rng.choice("+-*/"), Fraction(rng.randint(2, 9))
        value = {"+": value + b, "-": value - b, "*": value * b, "/": value / b}[op]
        inner = text if i == 0 else f"({text})"
        text = {"*": f"{_fmt(b)}{inner}" if i == 0 else f"{_fmt(b)}*{inner}",
                "/": f"{inner}/{_fmt(b)}"}.get(op, f"{text} {op} {_fmt(b)}")
        steps.append(f"undo {op} {_fmt(b)}")
    return {"problem": f"Solve for x: {text} = {_fmt(value)}.", "answer": _fmt(x0),
            "solution": "; ".join(reversed(steps)) + f"; x = {_fmt(x0)}"}


def generate(rng: random.Random, difficulty: int = 1) -> dict:
    """A task of `difficulty` operations: arithmetic or a linear equation."""
    ops = max(1, difficulty)
    row = (_arithmetic if rng.random() < 0.5 else _equation)(rng, ops)
    row["task_id"] = "math-" + hashlib.blake2b(row["problem"].encode(), digest_size=6).hexdigest()
    return {"task_id": row["task_id"], "problem": row["problem"], "answer": row["answer"], "solution": row["solution"]}


class MathEnv(GeneratedEnv):
    """Single-turn (one answer turn, no tools); the answer is checked by `check`."""

    domain = "math"

    eval_seed = 0x3A7

    def __init__(self, cfg=None, seed: int = 0):
        super().__init__(getattr(cfg, "tool_latency", "none"), seed)
        self.difficulty = getattr(cfg, "math_difficulty", 2)
        self.eval_fraction = getattr(cfg, "eval_fraction", 0.2)

    def generate_row(self, rng: random.Random) -> dict:
        return generate(rng, self.difficulty)

    def to_task(self, row: dict) -> Task:
        return Task(id=row["task_id"], prompt=row["problem"], answer=row["answer"], domain=self.domain, meta=row)

    def demonstration(self, task: Task) -> str:
        solution = task.meta.get("solution", "") if task.meta else ""
        return (solution + "\n" if solution else "") + f"The answer is \\boxed{{{task.answer}}}."

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        return check(response, task.answer)
