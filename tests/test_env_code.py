"""The Code domain: task loader, generator, sandboxed verifier (real bubblewrap sandboxes), CodeEnv
and the grading CLI."""

import json
import random
import subprocess
import sys

import pytest

from envs.code import (CodeConfig, CodeEnv, CodeTask, TaskFormatError, code_profile, generate, grade_completion,
                       load_samples, load_tasks, parse_task)
from envs.code.generator import held_out
from rayrl.sandbox.pool import SandboxPool

FN = CodeTask("t/add", "function", 'def add(a, b):\n    """a + b"""\n', entry_point="add",
              test="def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n")
IO = CodeTask("t/sum", "stdio", "Print the sum of the integers on the line.",
              tests=[{"input": "1 2\n", "output": "3\n"}, {"input": "4 5 6", "output": "15"}])


@pytest.fixture
async def pool():
    p = SandboxPool([code_profile("default")], min_idle=2, max_total=4, export_metrics=False)
    yield p
    await p.shutdown()


async def test_every_sample_oracle_scores_one(pool):
    import asyncio
    tasks = load_samples()
    assert sum(t.kind == "function" for t in tasks) >= 10 and sum(t.kind == "stdio" for t in tasks) >= 5
    results = await asyncio.gather(*(grade_completion(pool, t, t.canonical_solution) for t in tasks))
    for t, (reward, info) in zip(tasks, results):
        assert reward == 1.0, (t.task_id, info)
        assert info["passed"] == info["total"] and info["failure"] is None


@pytest.mark.parametrize("task,completion,kind", [
    (FN, "    return a - b\n", "wrong_answer"),
    (FN, "    return (a +\n", "syntax_error"),
    (FN, "    while True:\n        pass\n", "timeout"),
    (FN, "    raise ValueError('boom')\n", "runtime_error"),
    (FN, "    return int(input())\n", "runtime_error"),          # stdin is empty: EOFError
    (FN, "    pass\nimport sys\nsys.exit(0)\n", "runtime_error"),  # exits before the tests: never a pass
    (FN, "    pass\nimport os\nos._exit(0)\n", "runtime_error"),
    (FN, "    x = bytearray(1 << 30)\n    return a + b\n", "memory_limit"),
    (IO, "print(3)\n", "wrong_answer"),
    (IO, "print(sum(map(int, input().split()))\n", "syntax_error"),
    (IO, "import sys\nwhile True:\n    sys.stdin.readline()\n", "timeout"),   # reads stdin forever
    (IO, "print(1 // 0)\n", "runtime_error"),
    (IO, "import sys\nsys.exit(3)\n", "runtime_error"),
])
async def test_wrong_solutions_score_zero_with_their_failure_kind(pool, task, completion, kind):
    reward, info = await grade_completion(pool, task, completion, timeout_s=0.5)
    assert reward == 0.0 and info["failure"] == kind, info
    if kind in ("runtime_error", "syntax_error", "wrong_answer") and task is FN and "exit" not in completion:
        assert info["stderr"]   # a traceback tail


# Completions that try to forge the pass token instead of passing: print whatever token-shaped text they can
# find as the last line of stdout, then exit 0 (os._exit, so no later check runs).
_PRINT_LAST_AND_EXIT = ("def _forge(found):\n    import os\n"
                        "    os.write(1, b'\\n' + (found[-1] if found else b'') + b'\\n')\n    os._exit(0)\n")
_RUNNER_GLOBALS = "import __main__\n_found = [v.encode() for v in vars(__main__).values() if isinstance(v, str)]\n"
_MEMORY = """import os, re
_found = []
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:   # every process of the sandbox, this one too
    try:
        with open(f'/proc/{pid}/maps') as maps, open(f'/proc/{pid}/mem', 'rb', 0) as mem:
            for line in maps:
                span, perms = line.split()[:2]
                lo, hi = (int(x, 16) for x in span.split('-'))
                if perms.startswith('rw') and hi - lo < 1 << 26:
                    try:
                        mem.seek(lo)
                        _found += re.findall(rb'(?<![0-9a-f])([0-9a-f]{32})\\n', mem.read(hi - lo))
                    except (OSError, ValueError, OverflowError):
                        pass
    except OSError:
        pass
"""


@pytest.mark.parametrize("hack", [
    _RUNNER_GLOBALS + "_forge(_found)\n",                                   # the runner's globals
    _RUNNER_GLOBALS + "import atexit\natexit.register(_forge, _found)\n",   # after the assert failed
    _MEMORY + "_forge(_found)\n",   # any process's memory (the keeper's leaks the token unless non-dumpable)
], ids=["runner_globals", "atexit_after_failing", "process_memory"])
async def test_the_pass_token_cannot_be_forged_from_inside(pool, hack):
    reward, info = await grade_completion(pool, FN, "    return 0\n" + _PRINT_LAST_AND_EXIT + hack)
    assert reward == 0.0 and info["failure"] is not None, info


# Tolerance asserts in the HumanEval style; the first case is right for a candidate returning 0.0, and a
# trailing assert True is what a tracer skipping the candidate's lines leaves.
FLOAT = CodeTask("t/fadd", "function", 'def fadd(a, b):\n    """a + b"""\n', entry_point="fadd",
                 test="def check(candidate):\n    assert abs(candidate(0.0, 0.0)) < 1e-9\n"
                      "    assert abs(candidate(1.0, 2.0) - 3.0) < 1e-9\n"
                      "    assert abs(candidate(-1.5, 0.5) + 1.0) < 1e-9\n    assert True\n")
_ZERO_ABS = "lambda x: 0.0"
_SKIP_CANDIDATE_LINES = """import sys, linecache
def _skip(frame, event, arg):
    if event == "line":
        line = frame.f_lineno
        while "candidate(" in linecache.getline(frame.f_code.co_filename, line):
            line += 1
        if line != frame.f_lineno:
            frame.f_lineno = line
    return _skip
"""
_EVERY_FRAME = "    f = sys._getframe(1)\n    while f:\n        {}\n        f = f.f_back\n"
ISCLOSE = CodeTask("t/fsum", "function", 'import math\ndef fsum(a, b):\n    """a + b"""\n', entry_point="fsum",
                   test="def check(candidate):\n    assert math.isclose(candidate(0.25, 0.5), 0.75)\n"
                        "    assert math.isclose(candidate(1.0, 2.0), 3.0)\n")
CASES = CodeTask("t/mul", "function", "def mul(a, b):\n", entry_point="mul",
                 test="def check(candidate):\n    cases = [(0, 5, 0), (2, 3, 6), (4, 4, 16)]\n"
                      "    for a, b, want in cases:\n        assert candidate(a, b) == want\n")
# a thread of the program's that keeps isclose patched while the check runs
_PATCH_FOREVER = """import math, threading
def _patch():
    while True:
        math.isclose = lambda *a, **k: True
threading.Thread(target=_patch, daemon=True).start()
"""
# the test's expected values, wherever the program can read them: the files around it, every process's memory
_READ_EXPECTED = """import os, re
_EXPECTED, _TEXT = {}, b""
for _root in (".", "/tmp", os.path.expanduser("~")):
    for _dir, _, _files in os.walk(_root):
        for _name in _files:
            try:
                with open(os.path.join(_dir, _name), "rb") as _f:
                    _TEXT += _f.read(1 << 20)
            except OSError:
                pass
""" + _MEMORY.replace("_found +=", "_TEXT +=").replace("re.findall(rb'(?<![0-9a-f])([0-9a-f]{32})\\n', mem.read(hi - lo))",
                                                       "mem.read(hi - lo)") + """
for _m in re.finditer(rb"candidate\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)", _TEXT):
    _EXPECTED[int(_m[1]), int(_m[2])] = int(_m[3])
"""


# Completions that pass without solving the task by fooling check() where it runs: a result equal to
# anything (or a plain type's subclass redefining what the asserts use), patched builtins or test globals
# (at the program's top level or from inside the call, through every frame), a tracer skipping the lines
# that call the candidate.
@pytest.mark.parametrize("task,hack", [
    (FN, "    return _Eq()\nclass _Eq:\n    def __eq__(self, other):\n        return True\n"),
    (FN, "    return _Int(0)\nclass _Int(int):\n    def __eq__(self, other):\n        return True\n"
         "    __hash__ = int.__hash__\n"),
    (FLOAT, "    return _Float(0.0)\nclass _Float(float):\n    def __sub__(self, other):\n        return 0.0\n"
            "    __add__ = __sub__\n"),
    (FLOAT, f"    return 0.0\nimport builtins\nbuiltins.abs = {_ZERO_ABS}\n"),
    (FLOAT, "    return 0.0\ndef abs(x):\n    return 0.0\n"),    # a global of the program shadowing the builtin
    (FLOAT, f"    import builtins\n    builtins.abs = {_ZERO_ABS}\n    return 0.0\n"),
    (FLOAT, "    import sys\n" + _EVERY_FRAME.format(f'f.f_globals["abs"] = {_ZERO_ABS}') + "    return 0.0\n"),
    (FLOAT, "    return 0.0\n" + _SKIP_CANDIDATE_LINES + "sys.settrace(_skip)\n"),
    (FLOAT, "    sys.settrace(_skip)\n" + _EVERY_FRAME.format("f.f_trace = _skip") + "    return 0.0\n"
            + _SKIP_CANDIDATE_LINES),
    (ISCLOSE, "    return 0.0\nimport math\nmath.isclose = lambda *a, **k: True\n"),   # a module the test uses
    (ISCLOSE, "    return 0.0\n" + _PATCH_FOREVER),
    (CASES, "    import sys\n" + _EVERY_FRAME.format("if 'want' in f.f_locals:\n            return f.f_locals['want']")
            + "    return 0\n"),
    (CASES, "    import sys\n" + _EVERY_FRAME.format("if 'cases' in f.f_locals:\n            f.f_locals['cases'][:] = []")
            + "    return 0\n"),
    (FN, "    return _EXPECTED.get((a, b))\n" + _READ_EXPECTED),
], ids=["always_equal", "int_subclass_eq", "float_subclass_arithmetic", "builtins_at_exec", "global_shadowing_builtin",
        "builtins_in_call", "frame_globals_in_call", "settrace_at_exec", "settrace_in_call", "patch_another_module",
        "thread_patching_during_the_check", "expected_value_from_the_callers_frame", "cases_emptied_through_frames",
        "expected_values_read_from_disk_or_memory"])
async def test_the_check_cannot_be_fooled_from_inside(pool, task, hack):
    reward, info = await grade_completion(pool, task, hack)
    assert reward == 0.0 and info["failure"] is not None, info
    if "class _Eq" in hack:
        assert "not plain data" in info["detail"], info
    elif "class _" in hack:   # a subclass of a plain type crosses to the check as its base's value
        assert info["failure"] == "wrong_answer", info


POINT = CodeTask("t/point", "function", "from collections import namedtuple\nPoint = namedtuple('Point', 'x y')\n"
                 "def point(x, y):\n", entry_point="point",
                 test="def check(candidate):\n    assert candidate(1, 2) == Point(1, 2) == (1, 2)\n"
                      "    assert candidate(1, 2).y == 2\n")
NEST = CodeTask("t/nest", "function", "def nest(n):\n", entry_point="nest",
                test="def check(candidate):\n    assert candidate(2) == {'a': [0, 1, {'b': (2, None)}], 1.5: {3}}\n")
SCALE = CodeTask("t/scale", "function", 'def scale(f, xs):\n    """xs[i] = f(xs[i]) in place"""\n', entry_point="scale",
                 test="def check(candidate):\n    xs = [1, 2]\n    assert candidate(lambda v: v * 10, xs) is None\n"
                      "    assert xs == [10, 20]\n")


HISTOGRAM = CodeTask("t/hist", "function", "def hist(s):\n", entry_point="hist",
                     test="def check(candidate):\n    assert candidate('abca') == {'a': 2, 'b': 1, 'c': 1}\n")
COLOR = CodeTask("t/color", "function", "from enum import IntEnum\nclass Color(IntEnum):\n    RED = 1\n\n"
                 "def color(x):\n", entry_point="color", test="def check(candidate):\n    assert candidate(1) == 1\n")
ROOT = CodeTask("t/root", "function", "def root(n):\n", entry_point="root",
                test="def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        pass\n"
                     "    else:\n        assert False\n    assert candidate(16) == 4\n")
DECODE = CodeTask("t/decode", "function", 'def encode(s):\n    return s[::-1]\n\n\ndef decode(s):\n    """encode\'s inverse"""\n',
                  entry_point="decode", test="def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n")
POWER = CodeTask("t/power", "function", "def power(a, b):\n", entry_point="power",
                 test="def check(candidate):\n    assert candidate(3, 9000) == 3 ** 9000\n"
                      "    assert candidate(b=3, a=2) == 8\n    assert candidate(-0.0, 1) == 0\n")
OPAQUE = CodeTask("t/opaque", "function", "def f(x):\n", entry_point="f",
                  test="def check(candidate):\n    assert candidate(object()) == 1\n")


@pytest.mark.parametrize("task,completion", [
    (POINT, "    return Point(x, y)\n"),
    (NEST, "    row = [0, 1, {'b': (n, None)}]\n    return {'a': row, 1.5: {n + 1}}\n"),
    (FLOAT, "    return a + b\n"),
    (SCALE, "    xs[:] = map(f, xs)\n"),          # returns None; the test's callable and list go in as they are
    (FN, "    return sum([a, b])\ndef sum(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
         "    return total\n"),
    (HISTOGRAM, "    from collections import Counter\n    return Counter(s)\n"),
    (COLOR, "    return Color(x)\n"),
    (ROOT, "    if n < 0:\n        raise ValueError('negative')\n    return int(n ** 0.5)\n"),
    (DECODE, "    return s[::-1]\n"),
    (POWER, "    return a ** b\n"),
], ids=["namedtuple", "nested", "float", "none_mutating_its_argument", "own_global_shadowing_a_builtin",
        "counter_as_dict", "intenum_as_int", "exception_the_test_expects", "prompt_helper_in_the_test",
        "huge_int_and_keywords"])
async def test_honest_results_of_any_plain_shape_pass(pool, task, completion):
    reward, info = await grade_completion(pool, task, completion)
    assert reward == 1.0, info


@pytest.mark.parametrize("task,completion,detail", [
    (FN, "    yield a + b\n", "the candidate returned generator, not plain data"),
    (FN, "    return [object()]\n", "the candidate returned object, not plain data"),
    (FN, "    x = []\n    x.append(x)\n    return x\n", "nested more than 100 deep"),
    (OPAQUE, "    return 1\n", "the test passes the candidate a object, which cannot cross to its process"),
    (FN, "    import os\n    os._exit(0)\n", "the program exited (status 0) before its tests finished"),
])
async def test_what_cannot_cross_between_the_processes_is_a_runtime_error_that_says_so(pool, task, completion, detail):
    reward, info = await grade_completion(pool, task, completion)
    assert reward == 0.0 and info["failure"] == "runtime_error" and detail in info["detail"], info


def test_plain_data_crosses_between_the_processes_exactly_and_nothing_else_does():
    """envs.code.runner's encoding, as the pipe carries it (JSON): every plain shape comes back equal
    and of its own type; the checker's decoder builds nothing but plain types from any JSON."""
    import math
    from collections import Counter, namedtuple
    from envs.code.runner import NotPlain, decode, encode
    pair = namedtuple("Pair", "a b")
    wire = lambda value, callables=None: json.loads(json.dumps(encode(value, callables)))
    shapes = [None, True, 0, -3 ** 9000, 0.1, -0.0, 1e308, 1 - 2j, "é\ud800", b"\x00\xff", [], [1, "a", None],
              (1, (2,)), {1, 2}, frozenset({"x"}), {"k": [1, {2: (3, b"")}], (1, 2): {4}}, pair(1, [2]),
              [[i, str(i)] for i in range(200)]]
    for value in shapes:
        back = decode(wire(value), {"Pair": pair})
        assert back == value and type(back) is type(value), (value, back)
    assert math.isnan(decode(wire(float("nan")))) and decode(wire(float("-inf"))) == float("-inf")
    assert type(decode(wire(Counter("aab")))) is dict and decode(wire(Counter("aab"))) == {"a": 2, "b": 1}
    assert type(decode(wire(pair(1, 2)))) is tuple        # a namedtuple the checker's prompt lacks: a tuple
    callables = []
    assert decode(wire([len, 1], callables), stub=lambda i: ("stub", i)) == [("stub", 0), 1] and callables == [len]
    nested = []
    for _ in range(150):
        nested = [nested, 0]
    for value in (object(), [1, object()], len, iter([]), nested):
        with pytest.raises(NotPlain):
            encode(value)
    for forged in ({"eq": 1}, {"t": 1}, {"fn": 0}, {"d": [[[1], 2]]}, {"y": "zz"}, {"c": ["1", 2]}, {"t": [], "S": []}):
        with pytest.raises((ValueError, TypeError)):
            decode(forged)


async def test_stdio_output_is_whitespace_normalized_and_counts_passed_tests(pool):
    reward, info = await grade_completion(pool, IO, "print('  ' + str(sum(map(int, input().split()))) + '  \\n\\n')")
    assert reward == 1.0 and info["passed"] == 2
    reward, info = await grade_completion(pool, IO, "x = input()\nprint(3 if x.startswith('1') else 0)")
    assert reward == 0.0 and (info["passed"], info["total"], info["failed_test"]) == (1, 2, 1)


def test_generator_is_deterministic_and_held_out_is_disjoint():
    a, b = generate(30, seed=7, difficulty=3), generate(30, seed=7, difficulty=3)
    assert [t.to_row() for t in a] == [t.to_row() for t in b]
    assert [t.task_id for t in generate(30, seed=8, difficulty=3)] != [t.task_id for t in a]
    assert len({t.task_id for t in a}) == 30
    for d in (2, 4, 6):
        train = {t.canonical_solution for t in generate(40, seed=1, difficulty=d)}
        held = {t.canonical_solution for t in generate(20, seed=1, difficulty=d, split="eval")}
        assert not train & held
        for t in generate(5, seed=2, difficulty=d, split="eval"):
            assert held_out(t.canonical_solution.strip()[len("return "):], t.prompt.splitlines()[0].count(",") + 1, 0.2)
    # harder = more arguments and longer expressions
    easy, hard = generate(20, 0, 1), generate(20, 0, 6)
    mean_len = lambda ts: sum(len(t.canonical_solution) for t in ts) / len(ts)
    assert mean_len(hard) > 2 * mean_len(easy) and "def f(a, b, c, d)" in hard[0].prompt


async def test_generated_oracles_pass_and_a_wrong_body_fails(pool):
    import asyncio
    tasks = [t for d in (1, 3, 5) for t in generate(3, seed=3, difficulty=d)]
    results = await asyncio.gather(*(grade_completion(pool, t, t.canonical_solution) for t in tasks))
    assert all(r == 1.0 for r, _ in results), results
    reward, info = await grade_completion(pool, tasks[0], "    return 12345\n")
    assert reward == 0.0 and info["failure"] == "wrong_answer"


@pytest.mark.parametrize("row,field", [
    ({"prompt": "p", "entry_point": "f", "test": "def check(c): pass"}, "task_id"),
    ({"task_id": "x", "entry_point": "f", "test": "def check(c): pass"}, "prompt"),
    ({"task_id": "x", "prompt": "p", "test": "def check(c): pass"}, "entry_point"),
    ({"task_id": "x", "prompt": "p", "entry_point": "f"}, "test"),
    ({"task_id": "x", "prompt": "p", "entry_point": "f", "test": 3}, "test"),
    ({"task_id": "x", "prompt": 1, "entry_point": "f", "test": "def check(c): pass"}, "prompt"),
    ({"task_id": "x", "prompt": "p", "tests": [{"input": "1"}]}, "output"),
    ({"task_id": "x", "prompt": "p", "tests": "1 2"}, "tests"),
    ({"task_id": "x", "prompt": "p", "tests": [{"input": "", "output": ""}], "canonical_solution": 5},
     "canonical_solution"),
    # json.dumps writes NaN and Infinity, json.loads reads them back: grading would crash far from the file
    ({"task_id": "x", "prompt": "p", "entry_point": "f", "test": "def check(c): pass", "timeout_s": float("nan")},
     "timeout_s"),
    ({"task_id": "x", "prompt": "p", "tests": [{"input": "", "output": ""}], "timeout_s": float("inf")}, "timeout_s"),
    ({"task_id": "x", "prompt": "p", "tests": [{"input": "", "output": ""}], "timeout_s": 1e300}, "timeout_s"),
])
def test_loader_errors_name_file_line_and_field(tmp_path, row, field):
    path = tmp_path / "tasks.jsonl"
    good = {"task_id": "ok", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c): pass"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(TaskFormatError) as err:
        load_tasks(path)
    assert f"{path}:3" in str(err.value) and repr(field) in str(err.value)


def test_loader_rejects_bad_json_and_duplicates(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"task_id": "a", "prompt": "p", "tests": [{"input": "", "output": ""}]}\n{not json\n')
    with pytest.raises(TaskFormatError, match=r"t\.jsonl:2: not JSON"):
        load_tasks(path)
    row = '{"task_id": "a", "prompt": "p", "tests": [{"input": "", "output": ""}]}\n'
    path.write_text(row * 2)
    with pytest.raises(TaskFormatError, match="duplicate task_id 'a'"):
        load_tasks(path)
    assert parse_task(json.loads(row)).kind == "stdio"


def test_loader_names_the_line_of_bytes_that_are_not_utf8_or_json_python_refuses(tmp_path):
    path = tmp_path / "t.jsonl"
    good = b'{"task_id": "a", "prompt": "p", "tests": [{"input": "", "output": ""}]}\n'
    path.write_bytes(good + b'{"task_id": "caf\xe9", "prompt": "p", "tests": []}\n')   # Latin-1
    with pytest.raises(TaskFormatError) as err:
        load_tasks(path)
    assert str(err.value) == f"{path}:2: not UTF-8 (byte 16: b'\\xe9')"
    for bad in (b'{"task_id": "b", "prompt": "p", "timeout_s": 1' + b"0" * 5000 + b"}\n", b"[" * 100_000 + b"\n"):
        path.write_bytes(good + bad)   # an integer past Python's digit limit; nesting too deep for the parser
        with pytest.raises(TaskFormatError) as err:
            load_tasks(path)
        assert str(err.value).startswith(f"{path}:2: not JSON")


@pytest.mark.parametrize("share", ["train", "eval"])
def test_code_env_with_too_few_tasks_to_split_trains_and_evaluates_on_all(tmp_path, caplog, share):
    from envs.code.generator import unit_hash
    ids = [i for i in map(str, range(200)) if (unit_hash("split:" + i) < 0.2) == (share == "eval")][:3]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"task_id": i, "prompt": "p", "tests": [{"input": "", "output": ""}]}) + "\n"
                            for i in ids))
    env = CodeEnv(CodeConfig(source=str(path)))
    assert [t.id for t in env.eval_tasks(10)] == ids and [t.task_id for t in env._train] == ids
    assert f"{path}: no {'held-out' if share == 'train' else 'training'} task among 3" in caplog.text
    with pytest.raises(ValueError, match="task.timeout_s=nan"):
        CodeEnv(CodeConfig(timeout_s=float("nan")))


async def test_code_env_samples_demonstrations_and_fenced_answers(pool):
    env = CodeEnv(CodeConfig(difficulty=2, eval_size=10), pool=pool)
    rng = random.Random(0)
    train = [env.sample(rng) for _ in range(30)]
    held = env.eval_tasks(10)
    assert len(held) == 10 and not {t.answer for t in train} & {t.answer for t in held}
    assert [t.id for t in env.eval_tasks(10)] == [t.id for t in held]   # a fixed held-out set
    task = held[0]
    reward, info = await env.verify(task, env.demonstration(task))
    assert reward == 1.0 and info["correct"] == 1.0
    assert (await env.verify(task, "    return None\n"))[0] == 0.0
    # a chat-style answer: the whole function in a fenced block
    fenced = f"Here you go:\n```python\ndef f{task.prompt[5:task.prompt.index(')') + 1]}:\n{task.answer}```\n"
    assert (await env.verify(task, fenced))[0] == 1.0
    # the shipped samples, and a Task that round-trips through vars() (as the grader does)
    samples = CodeEnv(CodeConfig(source="samples"), pool=pool)
    stdio = next(t for t in samples._train + samples._eval if t.kind == "stdio")
    task = samples._task(stdio)
    from envs.base import Task
    assert (await samples.verify(Task(**vars(task)), samples.demonstration(task)))[0] == 1.0


async def test_code_env_without_a_pool_starts_its_own():
    env = CodeEnv(CodeConfig(difficulty=1))
    try:
        task = env.sample(random.Random(1))
        assert (await env.verify(task, env.demonstration(task)))[0] == 1.0
    finally:
        await env.aclose()


async def test_verifier_through_a_ray_actor_handle(ray_session):
    ray = ray_session
    actor = ray.remote(SandboxPool).options(num_cpus=0, max_concurrency=100).remote(
        [code_profile("default")], min_idle=0, max_total=2, export_metrics=False)
    try:
        env = CodeEnv(CodeConfig(source="samples"), pool=actor)
        t = env._task(load_samples()[0])
        assert (await env.verify(t, t.answer))[0] == 1.0
        assert (await env.verify(t, "    return s\n"))[1]["failure"] == "wrong_answer"
    finally:
        await actor.shutdown.remote()
        ray.kill(actor)


def test_cli_grades_the_sample_set(tmp_path):
    tasks = load_samples()
    solutions = tmp_path / "solutions.jsonl"
    rows = [{"task_id": t.task_id, "completion": t.canonical_solution} for t in tasks]
    rows += [{"task_id": "code/gcd", "completion": "    return a\n"},      # wrong answer
             {"task_id": "no/such/task", "completion": ""},                # unknown task
             {"task_id": "code/fib"}]                                      # missing field
    solutions.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[1, 2]\n")
    out = subprocess.run([sys.executable, "-m", "envs.code.grade", "--tasks", "envs/code/samples.jsonl",
                          "--solutions", str(solutions), "--timeout", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"passed": len(tasks), "total": len(tasks) + 4}
    assert any("FAIL  code/gcd" in l and "wrong_answer" in l for l in lines)
    assert any("unknown task_id 'no/such/task'" in l for l in lines)
    assert any("field 'completion' is missing" in l for l in lines)
    # a malformed tasks file: a clear error naming the line and field, exit status 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "p", "test": "def check(c): pass"}\n')
    out = subprocess.run([sys.executable, "-m", "envs.code.grade", "--tasks", str(bad), "--solutions",
                          str(solutions)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "bad.jsonl:1" in out.stderr and "'entry_point'" in out.stderr
