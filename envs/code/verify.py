"""Run a candidate solution against a code task in a real sandbox.

Function tasks: `prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"` is written to
`solution.py` and run once with python3. Stdin/stdout tasks: the program is run once per test
case with the input on stdin; its stdout is compared with the expected output, whitespace
normalized (trailing spaces, runs of blanks and blank lines at either end ignored).

A small runner (passed with `python3 -c`) compiles the program first (so a syntax error is told
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

# argv: mode ("function" | "stdio"), program file. Function mode: stdin holds the pass token.
#
# Why a keeper process: the program runs in this interpreter, so whatever this interpreter holds (a
# global, a buffer, an open fd) the program can read. A keeper, forked before the program runs, reads
# the token from stdin and prints it only when this process reports, after check() returned, on a
# pipe. This process never reads stdin (its fd 0 becomes /dev/null), and the keeper is non-dumpable,
# so the program (same uid) may not read the keeper's memory or fds through /proc or ptrace.
# Exiting early (os._exit, sys.exit, a signal), an atexit hook, printing or patching print/stdout
# therefore never pass. Still possible, on purpose only: replaying the report (writing b"ok" to the
# pipe, e.g. from an atexit hook, then exiting 0), or tampering with the interpreter the check runs
# in (sys.settrace skipping the asserts, patched builtins, a result whose __eq__ is always true).
# Closing those needs the check in another interpreter, fed the candidate's results as plain data.
RUNNER = f"""
import os, sys, traceback
mode, path = sys.argv[1], sys.argv[2]
try:
    with open(path, encoding="utf-8", errors="replace") as f:
        code = compile(f.read(), path, "exec")
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
sys.argv = [path]
sys.path.insert(0, os.getcwd())
scope = {{"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}}
if mode != "function":
    exec(code, scope)
    sys.exit(0)
try:
    exec(code, scope)
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


def function_program(task: CodeTask, completion: str) -> str:
    return task.prompt + completion + "\n" + task.test + f"\ncheck({task.entry_point})\n"


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


def _python(mode: str) -> list[str]:
    return ["python3", "-I", "-c", RUNNER, mode, "solution.py"]


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
            await sb.write_file("solution.py", function_program(task, completion).encode())
            token = secrets.token_hex(16)
            result = await sb.exec(_python("function"), stdin=(token + "\n").encode(), timeout=timeout)
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
                result = await sb.exec(_python("stdio"), stdin=case["input"].encode(), timeout=timeout)
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
