"""Run a candidate solution against a code task in a real sandbox.

Function tasks: `prompt + completion` is written to `solution.py`, the task's test to
`solution_test.py`, and both are run once with python3: the program, then the test in a scope of its own,
then `check(entry_point)` through a guard (see RUNNER). Stdin/stdout tasks: the program is run once per
test case with the input on stdin; its stdout is compared with the expected output, whitespace
normalized (trailing spaces, runs of blanks and blank lines at either end ignored).

A small runner (passed with `python3 -c`) compiles the files first (so a syntax error is told
apart from a runtime error). For function tasks a pass is a per-run random token at the end of
stdout, which the tested code never holds: see RUNNER.

Reward 1.0 iff every test passes; the info holds `passed`/`total`, `failure` (None,
`syntax_error`, `wrong_answer`, `timeout`, `runtime_error` or `memory_limit`), a short `stderr`
tail and `detail`. `SandboxInfraError` propagates: the caller decides what an infrastructure
failure means.
"""

from __future__ import annotations

import secrets

from rayrl.sandbox.base import ExecResult, Limits, Outcome, Profile
from rayrl.sandbox.client import PoolClient  # noqa: F401  (re-exported for envs.code)

from envs.code.tasks import CodeTask

DEFAULT_TIMEOUT_S = 5.0
STDERR_TAIL = 600
FAILURES = ("syntax_error", "wrong_answer", "timeout", "runtime_error", "memory_limit")

_SYNTAX_EXIT, _ASSERT_EXIT, _EARLY_EXIT = 97, 98, 99

# argv: mode ("function" | "stdio"), program file; in function mode also the test file and the entry
# point, and stdin holds the pass token.
#
# Why a keeper process: the program runs in this interpreter, so whatever this interpreter holds (a
# global, a buffer, an open fd) the program can read. A keeper, forked before the program runs, reads
# the token from stdin and prints it only when this process reports, after check() returned, on a
# pipe. This process never reads stdin (its fd 0 becomes /dev/null), and the keeper is non-dumpable,
# so the program (same uid) may not read the keeper's memory or fds through /proc or ptrace.
# Exiting early (os._exit, sys.exit, a signal), an atexit hook, printing or patching print/stdout
# therefore never pass.
#
# Why a guard around the entry point: check() runs in this interpreter too. The program (prompt +
# completion) is exec'd first; then the builtins are put back as they were before it ran, trace and
# profile hooks (sys, threading) cleared, and the test exec'd in a scope of its own: a copy of the
# program's globals less those shadowing a builtin (bar the entry point). check() gets the entry point
# wrapped: after each call the builtins, the test's globals and this runner's are put back, the hooks
# cleared again, and the result must be plain data (int, float, complex, bool, str, bytes, None, list,
# tuple, dict, set, frozenset, recursively, at most 100 deep and acyclic; a subclass only if it
# redefines nothing of its base but construction and repr, as namedtuples do) or the run is a runtime
# error (a generator, a Fraction or an enum member is not plain data either). So a result that
# compares equal to anything, patched builtins or test globals (from the program's top level or from
# inside a call) and a tracer skipping the asserts never pass. The arguments are the test's own
# (callables, lists the candidate may mutate), unchecked. Still possible, on purpose only: replaying
# the report (writing b"ok" to the pipe, found in /proc/self/fd, then exiting 0: no cheap fix, the
# program can do whatever this process does); code the program leaves running outside a call (threads,
# finalizers, audit hooks, sys.monitoring callbacks on Python 3.12+); patching other modules the test
# uses (math.isclose) or the prompt's helpers it calls; mutating the test's objects reached through
# frames (the list of cases check() loops over) or reading the expected values there; and tampering
# with this runner (its closures and frames, ctypes). Closing those needs the check in another
# process, fed the candidate's results as plain data.
RUNNER = f"""
import os, sys, traceback
mode, path = sys.argv[1], sys.argv[2]
test_path, entry_point = sys.argv[3:] or (None, None)


def compiled(name):
    with open(name, encoding="utf-8", errors="replace") as f:
        return compile(f.read(), name, "exec")


try:
    code = compiled(path)
    test = compiled(test_path) if test_path else None
except (SyntaxError, ValueError):
    traceback.print_exc(limit=0)
    sys.exit({_SYNTAX_EXIT})
if mode == "function":
    import ctypes
    prctl = ctypes.CDLL(None).prctl
    prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE 0: the keeper is born non-dumpable (no window for the program)
    verdict, report = os.pipe()
    keeper = os.fork()
    if keeper == 0:
        os.close(report)
        token = sys.stdin.readline().strip()
        if os.read(verdict, 2) == b"ok":
            os.write(1, ("\\n" + token + "\\n").encode())
        os._exit(0)
    prctl(4, 1, 0, 0, 0)   # this process dumpable again, as the program expects
    os.close(verdict)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def run_tests(code, test, entry_point, scope):
    \"\"\"Exec the program in `scope`, then its test, and call check() on the guarded entry point (see above).
    Everything the guard needs after a call is bound here, before the program runs.\"\"\"
    import builtins
    builtins_dict, modules, settrace, setprofile = vars(builtins), sys.modules, sys.settrace, sys.setprofile
    write, exit_now = os.write, os._exit
    clean_builtins = tuple(builtins_dict.items())   # tuples: the program may find but not change them
    scalars = {{int, float, complex, bool, str, bytes, type(None)}}
    plain = scalars | {{list, tuple, dict, set, frozenset}}
    # what a subclass may not redefine: every attribute of its base but these (namedtuple redefines them)
    not_redefinable = {{base: frozenset(dir(base)) - {{"__doc__", "__new__", "__init__", "__repr__", "__getnewargs__"}}
             for base in plain}}

    def restore(*namespaces):
        threading = modules.get("threading")
        if threading:
            threading.settrace(None)
            threading.setprofile(None)
        setprofile(None)   # before the namespaces: no hook may run while they are rebuilt
        settrace(None)
        for namespace, items in namespaces:
            namespace.clear()
            namespace.update(items)

    def plain_base(kind):
        if kind in plain:
            return kind
        if type(kind) is not type:   # a metaclass could change what the class seems to define
            return None
        mro = kind.__mro__
        base = next((b for b in mro if b in plain), None)
        if base is None or any(not_redefinable[base].intersection(vars(c)) for c in mro[:mro.index(base)]):
            return None
        return base

    def impurity(value, depth, path):
        \"\"\"None if `value` is plain data, else what in it is not.\"\"\"
        kind = type(value)
        base = plain_base(kind)
        if base is None or (kind is not base and getattr(value, "__dict__", None)):
            return kind.__qualname__   # (an instance's own attributes would shadow its base's methods)
        if base in scalars:
            return None
        if depth == 100 or id(value) in path:
            return "a %s nested 100 deep or holding itself" % kind.__qualname__
        elements = (*dict.keys(value), *dict.values(value)) if base is dict else value
        if set(map(type, elements)) <= scalars:
            return None
        path.add(id(value))
        found = next(filter(None, (impurity(element, depth + 1, path) for element in elements)), None)
        path.discard(id(value))
        return found

    exec(code, scope)
    restore((builtins_dict, clean_builtins))
    test_scope = {{name: value for name, value in scope.items()
                  if name not in builtins_dict or name.startswith("__") or name == entry_point}}
    test_scope["__builtins__"] = builtins
    exec(test, test_scope)
    candidate = test_scope[entry_point]
    runner_globals = globals()
    pinned = (builtins_dict, clean_builtins), (runner_globals, tuple(runner_globals.items()))

    def call(*args, **kwargs):
        test_items = tuple(test_scope.items())
        try:
            result = candidate(*args, **kwargs)
        finally:
            restore(*pinned, (test_scope, test_items))
        found = impurity(result, 0, set())
        if found is not None:
            what = type(result).__qualname__
            write(2, ("the candidate returned %s, not plain data%s\\n"
                      % (what, "" if found == what else " (it holds %s)" % found)).encode())
            exit_now(1)
        return result

    test_scope["check"](call)


sys.argv = [path]
sys.path.insert(0, os.getcwd())
scope = {{"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}}
if mode != "function":
    exec(code, scope)
    sys.exit(0)
try:
    run_tests(code, test, entry_point, scope)
except AssertionError:
    traceback.print_exc()
    sys.exit({_ASSERT_EXIT})
except SystemExit as e:
    sys.stderr.write("the program exited (SystemExit %r) before its tests finished\\n" % (e.code,))
    os._exit({_EARLY_EXIT})
sys.stdout.flush()
os.write(report, b"ok")
os.waitpid(keeper, 0)
"""


def code_profile(name: str = "code", timeout_s: float = DEFAULT_TIMEOUT_S) -> Profile:
    """A sandbox profile suited to running candidate programs."""
    return Profile(name=name, limits=Limits(cpu_seconds=max(2, int(timeout_s * 2)), memory_mb=512,
                                            processes=32, file_size_mb=16, tmp_mb=32, work_mb=64,
                                            output_bytes=256 << 10))


# ----------------------------------------------------------------------------- pool adapter


# ------------------------------------------------------------------------------- grading


def normalize_output(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.strip().splitlines()]
    return "\n".join(lines)


def _tail(data: bytes, n: int = STDERR_TAIL) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= n else "..." + text[-n:]


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _classify(result: ExecResult) -> tuple[str, str]:
    """(failure kind, detail) of a run that did not pass."""
    if result.outcome == Outcome.TIMEOUT:
        return "timeout", f"killed after {result.duration_s:.2f}s"
    if result.outcome == Outcome.OOM:
        return "memory_limit", "killed at the memory limit"
    if result.outcome == Outcome.SIGNAL:
        return "runtime_error", f"killed by signal {result.signal}"
    err = result.stderr.decode("utf-8", "replace").rstrip()
    last = err.splitlines()[-1] if err else ""
    if result.exit_code == _SYNTAX_EXIT:
        return "syntax_error", last
    if result.exit_code == _ASSERT_EXIT:
        return "wrong_answer", last or "AssertionError"
    if last.startswith("MemoryError"):
        return "memory_limit", last
    if result.exit_code == _EARLY_EXIT:
        return "runtime_error", last
    return "runtime_error", last or f"exit code {result.exit_code}"


def _python(*args: str) -> list[str]:
    return ["python3", "-I", "-c", RUNNER, *args]


async def grade_completion(pool, task: CodeTask, completion: str, *, timeout_s: float | None = None,
                profile: str = "default") -> tuple[float, dict]:
    """Reward (1.0 iff all tests pass) and info for `completion` on `task`.

    `pool`: a `SandboxPool`, a Ray actor handle to one, a `SandboxRouter` or a `PoolClient`.
    For function tasks the completion is appended to the prompt; for stdio tasks it is the
    whole program."""
    client = pool if isinstance(pool, PoolClient) else PoolClient(pool)
    timeout = float(timeout_s or task.timeout_s or DEFAULT_TIMEOUT_S)
    info = {"kind": task.kind, "passed": 0, "total": 1 if task.kind == "function" else len(task.tests),
            "failure": None, "detail": "", "stderr": "", "failed_test": None}
    async with client.session(profile, ttl_s=600.0 + timeout * info["total"]) as sb:
        if task.kind == "function":
            await sb.write_file("solution.py", (task.prompt + completion).encode())
            await sb.write_file("solution_test.py", task.test.encode())
            token = secrets.token_hex(16)
            argv = _python("function", "solution.py", "solution_test.py", task.entry_point)
            result = await sb.exec(argv, stdin=(token + "\n").encode(), timeout=timeout)
            stdout = result.stdout.decode("utf-8", "replace").rstrip()
            if result.outcome == Outcome.NORMAL and result.exit_code == 0 and stdout.endswith(token):
                info["passed"] = 1
            elif result.outcome == Outcome.NORMAL and result.exit_code == 0:
                info["failure"], info["detail"] = "runtime_error", "the program exited before its tests finished"
            else:
                info["failure"], info["detail"] = _classify(result)
            info["stderr"] = _tail(result.stderr)
        else:
            await sb.write_file("solution.py", completion.encode())
            for i, case in enumerate(task.tests):
                result = await sb.exec(_python("stdio", "solution.py"), stdin=case["input"].encode(), timeout=timeout)
                if result.outcome == Outcome.NORMAL and result.exit_code == 0:
                    got = normalize_output(result.stdout.decode("utf-8", "replace"))
                    want = normalize_output(case["output"])
                    if got == want and not result.stdout_truncated:
                        info["passed"] += 1
                        continue
                    kind = "wrong_answer"
                    detail = (f"test {i}: expected {_short(want)!r}, got {_short(got)!r}"
                              + (" (output truncated)" if result.stdout_truncated else ""))
                else:
                    kind, detail = _classify(result)
                    detail = f"test {i}: {detail}"
                if info["failure"] is None:
                    info["failure"], info["detail"], info["stderr"] = kind, detail, _tail(result.stderr)
                    info["failed_test"] = i
                if kind in ("syntax_error", "timeout", "memory_limit"):
                    break   # the remaining cases would fail the same way (and cost as much)
    reward = 1.0 if info["passed"] == info["total"] and info["failure"] is None else 0.0
    return reward, info
