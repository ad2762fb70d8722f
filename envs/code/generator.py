"""Seeded synthetic function tasks at adjustable difficulty (for CPU training of tiny models).

A task is a function whose body is one expression over its integer arguments, e.g.
`def f(a, b): return a * b + 3`. Difficulty d sets the expression: d binary operations, up to
4 arguments (1 + d // 2), and from d >= 3 also `//` and `%` by a positive constant, from d >= 4
`max`/`min`/`abs`, from d >= 5 a conditional. The docstring states the formula (`show_formula`,
what a tiny model can learn to copy) or only gives examples (induction, much harder).

Deterministic for (seed, difficulty). A fixed hash of the expression splits the task space into
training and held-out tasks, so the two splits never share a task, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random

from envs.code.tasks import CodeTask

ARGS = "abcd"
_PREC = {"+": 1, "-": 1, "*": 2, "//": 2, "%": 2}
_SAFE = {"max": max, "min": min, "abs": abs, "__builtins__": {}}


def unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


def held_out(expr: str, nargs: int, eval_fraction: float) -> bool:
    return unit_hash(f"code:{nargs}:{expr}") < eval_fraction


def _num_args(difficulty: int) -> int:
    return min(len(ARGS), 1 + difficulty // 2)


def _expr(rng: random.Random, ops: int, args: str, difficulty: int) -> tuple[str, int]:
    """(source, precedence) of a random expression with `ops` operations."""
    if ops == 0:
        if rng.random() < 0.7:
            return rng.choice(args), 9
        return str(rng.randint(1, 9)), 9
    kinds = ["bin"] * 4 + (["call"] if difficulty >= 4 else []) + (["cond"] if difficulty >= 5 and ops >= 2 else [])
    kind = rng.choice(kinds)
    if kind == "call":
        fn = rng.choice(["max", "min", "abs"])
        if fn == "abs":
            inner, _ = _expr(rng, ops - 1, args, difficulty)
            return f"abs({inner})", 9
        left = rng.randint(0, ops - 1)
        x, _ = _expr(rng, left, args, difficulty)
        y, _ = _expr(rng, ops - 1 - left, args, difficulty)
        return f"{fn}({x}, {y})", 9
    if kind == "cond":
        rest = ops - 2   # the comparison counts as one operation, the conditional as another
        left = rng.randint(0, rest)
        x, xp = _expr(rng, left, args, difficulty)
        y, yp = _expr(rng, rest - left, args, difficulty)
        p, q = rng.sample(args, 2) if len(args) > 1 else (args[0], str(rng.randint(0, 5)))
        cmp = rng.choice([">", "<", ">=", "<="])
        return f"({x} if {p} {cmp} {q} else {y})", 9
    ops_avail = ["+", "-", "*"] + (["//", "%"] if difficulty >= 3 else [])
    op = rng.choice(ops_avail)
    prec = _PREC[op]
    if op in ("//", "%"):   # by a positive constant only: never a division by zero
        x, xp = _expr(rng, ops - 1, args, difficulty)
        x = f"({x})" if xp < prec else x
        return f"{x} {op} {rng.randint(2, 9)}", prec
    left = rng.randint(0, ops - 1)
    x, xp = _expr(rng, left, args, difficulty)
    y, yp = _expr(rng, ops - 1 - left, args, difficulty)
    x = f"({x})" if xp < prec else x
    y = f"({y})" if yp <= prec and yp != 9 else y   # right operand of equal precedence: parenthesize
    return f"{x} {op} {y}", prec


def evaluate(expr: str, args: str, values) -> int:
    """The oracle value (the expression is generated here, never model output)."""
    return eval(expr, dict(_SAFE), dict(zip(args, values)))  # noqa: S307


def make_task(expr: str, nargs: int, rng: random.Random, difficulty: int, show_formula: bool = True,
              num_tests: int = 5) -> CodeTask:
    args = ARGS[:nargs]
    signature = ", ".join(args)
    inputs = []
    while len(inputs) < num_tests:
        vals = tuple(rng.randint(-10, 10) for _ in args)
        if vals not in inputs:
            inputs.append(vals)
    examples = inputs[:2]
    doc = ([f"Return {expr}."] if show_formula else ["Compute an integer from the arguments."])
    doc += [f">>> f({', '.join(map(str, v))})\n    {evaluate(expr, args, v)}" for v in examples]
    prompt = f"def f({signature}):\n    \"\"\"" + "\n    ".join(doc) + "\n    \"\"\"\n"
    test = "def check(candidate):\n" + "".join(
        f"    assert candidate({', '.join(map(str, v))}) == {evaluate(expr, args, v)}\n" for v in inputs)
    digest = hashlib.blake2b(f"{nargs}:{expr}:{show_formula}".encode(), digest_size=5).hexdigest()
    return CodeTask(task_id=f"gen/d{difficulty}/{digest}", kind="function", prompt=prompt, entry_point="f",
                    test=test, canonical_solution=f"    return {expr}\n")


def draw(rng: random.Random, difficulty: int, eval_fraction: float = 0.2, split: str = "train",
         show_formula: bool = True, max_tries: int = 1000) -> CodeTask:
    """One random task of `split` ("train" or "eval")."""
    if difficulty < 1:
        raise ValueError(f"difficulty={difficulty}: must be >= 1")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: must be train or eval")
    nargs = _num_args(difficulty)
    args = ARGS[:nargs]
    for _ in range(max_tries):
        expr, _ = _expr(rng, difficulty, args, difficulty)
        if not all(a in expr for a in args):   # every argument is used
            continue
        if held_out(expr, nargs, eval_fraction) == (split == "eval"):
            return make_task(expr, nargs, rng, difficulty, show_formula)
    raise ValueError(f"no {split} task found at difficulty {difficulty} in {max_tries} draws "
                     f"(eval_fraction={eval_fraction})")


def generate(n: int, seed: int = 0, difficulty: int = 1, *, split: str = "train", eval_fraction: float = 0.2,
             show_formula: bool = True) -> list[CodeTask]:
    """`n` distinct tasks of `split`, deterministic for (seed, difficulty, split, eval_fraction)."""
    rng = random.Random(f"rayrl-code:{seed}:{difficulty}:{split}")
    tasks: dict[str, CodeTask] = {}
    misses = 0
    while len(tasks) < n:
        task = draw(rng, difficulty, eval_fraction, split, show_formula)
        if task.task_id in tasks:
            misses += 1
            if misses > 50 * n + 1000:
                raise ValueError(f"only {len(tasks)} distinct {split} tasks found at difficulty {difficulty} "
                                 f"(asked for {n}); raise the difficulty or lower n")
            continue
        tasks[task.task_id] = task
    return list(tasks.values())
