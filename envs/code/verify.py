"""Run a candidate solution against a code task in a real sandbox.

Function tasks: `prompt + completion` is written to `solution.py` and run once by the runner
(envs/code/runner.py, passed with `python3 -c`): the candidate in a process of its own, the task's
test (given on stdin, never on disk) in the runner's, calling the entry point with plain data over a
pipe. A pass is a per-run random token at the end of stdout, which the candidate never holds.
Stdin/stdout tasks: the program is run once per test case with the input on stdin; its stdout is
compared with the expected output, whitespace normalized (trailing spaces, runs of blanks and blank
lines at either end ignored). The runner compiles the program first, so a syntax error is told apart
from a runtime error.

Reward 1.0 iff every test passes; the info holds `passed`/`total`, `failure` (None,
`syntax_error`, `wrong_answer`, `timeout`, `runtime_error` or `memory_limit`), a short `stderr`
tail and `detail`. `SandboxInfraError` propagates: the caller decides what an infrastructure
failure means.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from rayrl.sandbox.base import ExecResult, Limits, Outcome, Profile
from rayrl.sandbox.client import PoolClient  # noqa: F401  (re-exported for envs.code)

from envs.code import runner
from envs.code.tasks import CodeTask

DEFAULT_TIMEOUT_S = 5.0
STDERR_TAIL = 600
FAILURES = ("syntax_error", "wrong_answer", "timeout", "runtime_error", "memory_limit")

# The program run in the sandbox, by source (python3 -c): see envs/code/runner.py for how a function
# task's candidate and its check are kept apart.
RUNNER = Path(runner.__file__).read_text(encoding="utf-8")


def code_profile(name: str = "code", timeout_s: float = DEFAULT_TIMEOUT_S) -> Profile:
    """A sandbox profile suited to running candidate programs."""
    return Profile(name=name, limits=Limits(cpu_seconds=max(2, int(timeout_s * 2)), memory_mb=512,
                                            processes=32, file_size_mb=16, tmp_mb=32, work_mb=64,
                                            output_bytes=256 << 10))


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
    if result.exit_code == runner.SYNTAX_EXIT:
        return "syntax_error", last
    if result.exit_code == runner.ASSERT_EXIT:
        return "wrong_answer", last or "AssertionError"
    if last.startswith("MemoryError"):
        return "memory_limit", last
    if result.exit_code == runner.EARLY_EXIT:
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
            token = secrets.token_hex(16)   # the test goes on stdin: never on the sandbox's disk
            given = json.dumps({"token": token, "prompt": task.prompt, "test": task.test}).encode()
            result = await sb.exec(_python("function", "solution.py", task.entry_point), stdin=given, timeout=timeout)
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
