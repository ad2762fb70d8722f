"""Generated SWE tasks: a seeded stream of tiny repositories, each a task in the SWETask/JSONL format
(graded like any other: the diff applied, the named tests run with real pytest in a sandbox).

A repository is one module of small arithmetic functions and one test file (`test_<module>.py`,
one test per function); a bug swaps the correct expression of a function for a wrong one. The
repository state lives entirely in the task's `base_files`, over the (nearly empty) directory
`generated_base/`, so the task rows are self-contained and can be written to a JSONL file and
loaded back (`swe_source=<path>`).

Tiny mode, difficulty 0 — what it asks and why: the module (one of 5 fixed names) holds ONE
two-line function from a fixed set of 10 (add, sub, mul, div, max, min, is_even, is_odd, double,
square; parameters `a`, `b`) whose body is that of its partner function (add/sub, mul/div,
max/min, is_even/is_odd, double/square):

    def mul(a, b):
        return a // b

The problem statement names the failing test and what it got and expected
(`test_calc.py::test_mul fails: mul(7, 3) returned 2, expected 21.`), the prompt shows the buggy
file (not the test), and the answer is a zero-context unified diff of that one line:

    --- a/calc.py
    +++ b/calc.py
    @@ -2 +2 @@
    -    return a // b
    +    return a * b

Every piece of it is a fixed string chosen by two discrete features of the prompt (the module
name, at a fixed offset, and the function name), so the tiny character-level model can learn it
from a few hundred demonstrations, which it could not if it had to copy names or expressions from
the prompt (measured: with varying parameter names and two possible bugs per function, read from
the file, it scored 0.0-0.4 after 200 SFT steps). The grading is the real one: the diff applied by
`git apply` and the test run by pytest in a bubblewrap sandbox; a diff with the buggy line kept,
the wrong module, or any typo scores 0. The test inputs (2..9) are random, so prompts vary with
them: the GeneratedEnv hash split of task ids holds out ~20% of thousands of distinct tasks.
Held-out prompts are never trained on, but their 50 (module, function) combinations, hence their
answers, do occur in training. Prompt + answer is about 230 characters.

Difficulty d >= 1: a module of 2d+1 functions (at most all 10) of which d are buggy (each with one
of its function's wrong expressions, at random), all sharing one of 5 parameter pairs; random test
inputs; the failing tests are listed in the problem statement,
the other functions' tests must keep passing (PASS_TO_PASS); the answer is a git-style diff with
3 lines of context, one hunk per bug.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from envs.swe.tasks import SWETask, repo_ref, unified_diff

GENERATED_BASE = Path(__file__).resolve().parent / "generated_base"

# name -> (arity, correct expression, wrong expressions); {a} and {b} are the parameters. The
# functions come in pairs (add/sub, mul/div, max/min, is_even/is_odd, double/square) and the first
# wrong expression of each is its partner's body: the one bug of tiny mode.
FUNCS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "add": (2, "{a} + {b}", ("{a} - {b}", "{a} * {b}")),
    "sub": (2, "{a} - {b}", ("{a} + {b}", "{b} - {a}")),
    "mul": (2, "{a} * {b}", ("{a} // {b}", "{a} + {b}", "{a} ** {b}")),
    "div": (2, "{a} // {b}", ("{a} * {b}", "{a} % {b}")),
    "max": (2, "{a} if {a} > {b} else {b}", ("{a} if {a} < {b} else {b}",)),
    "min": (2, "{a} if {a} < {b} else {b}", ("{a} if {a} > {b} else {b}",)),
    "is_even": (1, "{a} % 2 == 0", ("{a} % 2 == 1", "{a} % 3 == 0")),
    "is_odd": (1, "{a} % 2 == 1", ("{a} % 2 == 0",)),
    "double": (1, "{a} * 2", ("{a} * {a}", "{a} + 2", "{a} ** 2")),
    "square": (1, "{a} * {a}", ("{a} * 2", "{a} + {a}")),
}
PARAMS = (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("u", "v"))
MODULES = ("calc", "nums", "util", "base", "misc")   # one length (the test name sits at a fixed offset), distinct initials


def _sig(name: str, params: tuple[str, str]) -> str:
    arity = FUNCS[name][0]
    return ", ".join(params[:arity])


def _expr(template: str, params: tuple[str, str]) -> str:
    return template.format(a=params[0], b=params[1])


def _value(template: str, args: tuple[int, ...]):
    a, b = (args + (0,))[:2]
    return eval(template.format(a=f"({a})", b=f"({b})"), {})   # our own fixed templates only


def _call(name: str, args: tuple[int, ...]) -> str:
    return f"{name}({', '.join(map(str, args))})"


def _cases(rng: random.Random, name: str, wrong: str | None, n: int = 2) -> list[tuple[int, ...]]:
    """n input tuples (ints 2..9, two distinct ones for binary functions) on which no constant and
    no bare parameter passes the test; when `wrong` is given, the first one shows the bug (the
    wrong expression gives another value there)."""
    arity, correct, _ = FUNCS[name]
    while True:
        cases = [tuple(rng.sample(range(2, 10), arity)) for _ in range(n)]
        values = [_value(correct, args) for args in cases]
        if len(set(values)) < 2 or any(all(v == args[i] for v, args in zip(values, cases)) for i in range(arity)):
            continue
        if wrong is None or _value(wrong, cases[0]) != values[0]:
            return cases


def _module(funcs: list[tuple[str, str]], params: tuple[str, str]) -> str:
    """Source of a module of (name, expression template) functions."""
    return "\n\n".join(f"def {name}({_sig(name, params)}):\n    return {_expr(expr, params)}\n"
                       for name, expr in funcs)


def _tests(module: str, cases: dict[str, list[tuple[int, ...]]]) -> str:
    head = f"from {module} import {', '.join(cases)}\n"
    bodies = []
    for name, args_list in cases.items():
        correct = FUNCS[name][1]
        asserts = "".join(f"    assert {_call(name, args)} == {_value(correct, args)!r}\n" for args in args_list)
        bodies.append(f"def test_{name}():\n{asserts}")
    return head + "\n\n" + "\n\n".join(bodies)


def _zero_context_diff(path: str, lineno: int, old: str, new: str) -> str:
    return f"--- a/{path}\n+++ b/{path}\n@@ -{lineno} +{lineno} @@\n-{old}\n+{new}\n"


def _task(module: str, buggy: list[tuple[str, str]], fixed: list[tuple[str, str]], params, cases,
          broken: list[str], difficulty: int, tiny: bool) -> SWETask:
    path, test_path = f"{module}.py", f"test_{module}.py"
    source, gold = _module(buggy, params), _module(fixed, params)
    if tiny:
        (name, wrong), (_, right) = buggy[0], fixed[0]
        patch = _zero_context_diff(path, 2, f"    return {_expr(wrong, params)}", f"    return {_expr(right, params)}")
    else:
        patch = unified_diff(path, source, gold)
    failures = []
    for name in broken:
        args = cases[name][0]
        wrong = dict(buggy)[name]
        failures.append(f"{test_path}::test_{name} fails: {_call(name, args)} returned "
                        f"{_value(wrong, args)!r}, expected {_value(FUNCS[name][1], args)!r}.")
    statement = "\n".join(failures) if tiny else "\n".join(
        ["Failing tests:"] + [f"- {f}" for f in failures]
        + ["Fix the library code so that these tests pass again, without breaking any other test."])
    names = [n for n, _ in buggy]
    row = {"module": module, "params": params, "buggy": buggy, "cases": {k: [list(a) for a in v] for k, v in cases.items()}}
    digest = hashlib.blake2b(json.dumps(row, sort_keys=True).encode(), digest_size=6).hexdigest()
    return SWETask(
        instance_id=f"swegen{difficulty}-{digest}",
        problem_statement=statement, patch=patch, test_patch="",
        FAIL_TO_PASS=[f"{test_path}::test_{n}" for n in broken],
        PASS_TO_PASS=[f"{test_path}::test_{n}" for n in names if n not in broken],
        repo=repo_ref(GENERATED_BASE), base_commit="",
        base_files={path: source, test_path: _tests(module, cases)},
        meta={"generated": difficulty, "module": path, "functions": names, "bugs": broken})


def generate(rng: random.Random, difficulty: int = 1) -> SWETask:
    """One generated task (see the module docstring)."""
    module = rng.choice(MODULES)
    if difficulty <= 0:
        params = PARAMS[0]
        name = rng.choice(sorted(FUNCS))
        wrong = FUNCS[name][2][0]
        cases = {name: _cases(rng, name, wrong)}
        return _task(module, [(name, wrong)], [(name, FUNCS[name][1])], params, cases, [name], 0, True)
    params = rng.choice(PARAMS)
    n_funcs = min(2 * difficulty + 1, len(FUNCS))
    names = rng.sample(sorted(FUNCS), n_funcs)
    broken = sorted(rng.sample(names, min(difficulty, n_funcs)), key=names.index)
    buggy, fixed, cases = [], [], {}
    for name in names:
        wrong = rng.choice(FUNCS[name][2]) if name in broken else None
        buggy.append((name, wrong or FUNCS[name][1]))
        fixed.append((name, FUNCS[name][1]))
        cases[name] = _cases(rng, name, wrong)
    return _task(module, buggy, fixed, params, cases, broken, difficulty, False)


def tiny_prompt(task: SWETask) -> str:
    """The prompt of a generated task: the problem statement and the module (not the tests)."""
    path = task.meta["module"]
    head = "Fix it; answer with a unified diff." if task.meta.get("generated") == 0 else \
        "Answer with a unified diff (git format, paths a/... b/...) that fixes the repository."
    return f"{task.problem_statement}\n{head}\n\n--- {path} ---\n{task.base_files[path]}"
