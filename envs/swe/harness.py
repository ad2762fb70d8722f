"""Grading in a sandbox: build the repository state, apply the model patch, put the tests back to the
task's own state, apply the test patch, run the named pytest tests, and decide: resolved iff every
FAIL_TO_PASS and every PASS_TO_PASS test passes.

The model patch cannot change what decides its reward: test files, conftest.py and pytest's config
files are restored (model-made symlinks and bytecode dropped), pytest starts with the repository
off sys.path until pytest and the reporter are loaded, plugin autoloading is off, and report lines
count only when signed with a per-run key that the reporter read from stdin. What remains possible:
the code under test runs inside pytest's process, so code that sets out to can still patch pytest
or the reporter in memory (or find the key there).

Everything the model can get wrong (a diff that does not apply, tests that fail, crash, hang or
vanish) is a reward of 0 with a reason; only `SandboxInfraError` (the sandbox itself failed)
propagates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from envs.swe.runtime import PROFILE_NAME
from rayrl.sandbox.client import PoolClient
from envs.swe.tasks import SWETask, is_test_file, tar_bytes, task_files

REPO_DIR = "repo"            # under the sandbox work directory
_PASS = {"passed", "xfailed"}
# files that configure pytest: like the tests, the model's patch may not change them (so a fix that
# needs a change to pyproject.toml or setup.cfg does not get it)
_PYTEST_FILES = {"conftest.py", "pytest.ini", ".pytest.ini", "pytest.toml", ".pytest.toml", "tox.ini",
                 "setup.cfg", "pyproject.toml"}
# `-c` puts the work directory first on sys.path: off it, so that the repository cannot stand in for
# the runner or what it imports (the runner puts the repository back before pytest runs). Nor can it
# hook the interpreter's start: sitecustomize and .pth files are read from site directories only,
# which the repository is not, and `-s` turns off the user site (HOME is the writable /tmp).
_RUN = "import sys; del sys.path[0]; import rayrl_swe_report; sys.exit(rayrl_swe_report.main())"


@dataclass
class PytestRun:
    status: dict[str, str]       # node id -> passed | failed | error | skipped | xfailed
    messages: dict[str, str]     # node id -> failure message
    collect_errors: dict[str, str]
    timed_out: bool
    exit_code: int | None
    output: str                  # tail of pytest's output
    duration_s: float


def sign(key: str, line: str) -> str:
    """The reporter's signature of a report line (`sign` in runtime.REPORT_PLUGIN)."""
    return hmac.new(key.encode(), line.encode(), hashlib.sha256).hexdigest()


def parse_report(text: str, key: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """The reporter's JSON lines -> (status, messages, collect errors) per node id. Lines not signed
    with `key` are ignored: the code under test wrote them, or a kill at the timeout cut them."""
    status: dict[str, str] = {}
    messages: dict[str, str] = {}
    collect: dict[str, str] = {}
    for line in text.splitlines():
        mac, _, body = line.partition(" ")
        if not hmac.compare_digest(mac.encode(), sign(key, body).encode()):
            continue
        row = json.loads(body)
        node, when, outcome = row.get("nodeid", ""), row.get("when"), row.get("outcome")
        if when == "collect":
            collect[node] = row.get("message", "")
            continue
        prev = status.get(node)
        if outcome == "failed":
            new = "failed" if when == "call" else "error"
            if prev not in ("failed", "error"):
                status[node] = new
                messages[node] = row.get("message", "")
        elif outcome == "skipped":
            if prev is None:
                status[node] = "xfailed" if row.get("xfail") else "skipped"
        elif outcome == "passed":
            if when == "call" and prev is None:
                status[node] = "passed"
            if when == "call" and row.get("xfail"):   # xpass, non-strict
                status[node] = "passed"
    return status, messages, collect


async def run_pytest(session, args: list[str], timeout: float) -> PytestRun:
    """Run pytest in the sandbox's repository copy with the reporter."""
    key, report = secrets.token_hex(16), f"/tmp/rayrl-{secrets.token_hex(8)}.jsonl"
    cmd = (f"cd {REPO_DIR} && exec python3 -s -c {shlex.quote(_RUN)} -p no:cacheprovider -q -rA --color=no "
           + " ".join(shlex.quote(a) for a in args))
    result = await session.exec(["/bin/sh", "-c", cmd], stdin=f"{key} {report}\n".encode(), timeout=timeout)
    try:
        text = (await session.read_file(report)).decode("utf-8", "replace")
    except Exception:   # no report at all: pytest did not start (the cause is in the output)
        text = ""
    status, messages, collect = parse_report(text, key)
    out = (result.stdout + result.stderr).decode("utf-8", "replace")
    return PytestRun(status, messages, collect, result.outcome.value == "timeout", result.exit_code,
                   out[-4000:], result.duration_s)


async def apply_patch(session, diff: str, name: str) -> tuple[bool, str]:
    """`git apply` (checked first), falling back to `patch -p1`; (applied, log)."""
    path = f"/tmp/{name}.diff"
    data = diff if diff.endswith("\n") else diff + "\n"
    await session.write_file(path, data.encode("utf-8"))
    git = ["git", "-c", "core.quotepath=off", "apply", "--whitespace=nowarn", "--unidiff-zero"]
    check = await session.exec(["/bin/sh", "-c",
                                      f"cd {REPO_DIR} && {' '.join(git)} --check {path}"], timeout=30)
    if check.ok:
        done = await session.exec(["/bin/sh", "-c", f"cd {REPO_DIR} && {' '.join(git)} {path}"], timeout=30)
        if done.ok:
            return True, ""
    log = (check.stdout + check.stderr).decode("utf-8", "replace")
    dry = await session.exec(["/bin/sh", "-c",
                                    f"cd {REPO_DIR} && patch -p1 --batch --forward --dry-run -i {path}"], timeout=30)
    if dry.ok:
        done = await session.exec(["/bin/sh", "-c",
                                         f"cd {REPO_DIR} && patch -p1 --batch --forward -s -i {path}"], timeout=30)
        if done.ok:
            return True, ""
    log += (dry.stdout + dry.stderr).decode("utf-8", "replace")
    return False, log[-2000:]


async def setup_repo(session, files: dict[str, bytes]) -> None:
    await session.write_file("/tmp/state.tar", tar_bytes(files))
    r = await session.exec(["/bin/sh", "-c", f"mkdir -p {REPO_DIR} && tar -xf /tmp/state.tar -C {REPO_DIR}"
                                                    " && rm /tmp/state.tar"], timeout=60)
    if not r.ok:
        from rayrl.sandbox.base import SandboxInfraError
        raise SandboxInfraError(f"could not unpack the repository in the sandbox: "
                                f"{(r.stdout + r.stderr).decode('utf-8', 'replace')[-500:]}")


def node_files(nodes: list[str]) -> list[str]:
    return list(dict.fromkeys(n.split("::", 1)[0] for n in nodes))


def guarded(path: str) -> bool:
    """A file the model's patch may not change: test code, pytest's configuration, bytecode."""
    p = PurePosixPath(path)
    return (is_test_file(path) or p.name in _PYTEST_FILES or "__pycache__" in p.parts
            or p.suffix in (".pyc", ".pyo"))


def patch_paths(diff: str) -> set[str]:
    """The files a unified diff names in its `--- a/x` / `+++ b/x` headers, as `patch -p1` takes them."""
    lines = diff.splitlines()
    paths = set()
    for old, new in zip(lines, lines[1:]):
        if old.startswith("--- ") and new.startswith("+++ "):
            for name in (old[4:], new[4:]):
                name = name.split("\t")[0].strip()
                if name != "/dev/null" and "/" in name:
                    paths.add(name.split("/", 1)[1])
    return paths


async def restore_tests(session, task: SWETask, files: dict[str, bytes]) -> str:
    """Put the guarded files, the named tests' files and the test patch's files back as they are in
    `files` (the task's state): what the model's patch added among them, and any symlink it made,
    is deleted. "" when done, else what went wrong."""
    own = set(node_files(task.test_nodes)) | patch_paths(task.test_patch)
    listed = await session.exec(["find", REPO_DIR, "-mindepth", "1", "(", "-type", "f", "-o", "-type", "l", ")",
                                 "-printf", r"%y %P\0"], timeout=30)
    if not listed.ok or listed.stdout_truncated:
        return "could not list the repository's files"
    entries = [e.decode("utf-8", "surrogateescape").split(" ", 1) for e in listed.stdout.split(b"\0") if e]
    drop = own | {path for kind, path in entries if kind == "l" or guarded(path)}
    await session.write_file("/tmp/tests.tar", tar_bytes({p: d for p, d in files.items() if guarded(p) or p in own}))
    done = await session.exec(["/bin/sh", "-c", f"cd {REPO_DIR} && xargs -0 -r rm -rf -- && tar -xf /tmp/tests.tar"],
                              stdin=b"\0".join(p.encode("utf-8", "surrogateescape") for p in drop), timeout=60)
    return "" if done.ok else (done.stdout + done.stderr).decode("utf-8", "replace")[-500:]


def decide(task: SWETask, status: dict[str, str]) -> tuple[bool, dict]:
    f2p = {n: status.get(n, "missing") for n in task.FAIL_TO_PASS}
    p2p = {n: status.get(n, "missing") for n in task.PASS_TO_PASS}
    ok_f2p = all(s in _PASS for s in f2p.values())
    ok_p2p = all(s in _PASS for s in p2p.values())
    return ok_f2p and ok_p2p, {"FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p,
                               "f2p_passed": sum(s in _PASS for s in f2p.values()),
                               "p2p_passed": sum(s in _PASS for s in p2p.values())}


async def grade(pool, task: SWETask, model_patch: str, timeout: float = 120.0,
                files: dict[str, bytes] | None = None, profile: str = PROFILE_NAME) -> tuple[float, dict]:
    """(1.0 if resolved else 0.0, info). `pool`: a SandboxPool, a Ray handle of one, a
    SandboxRouter or a PoolClient."""
    client = pool if isinstance(pool, PoolClient) else PoolClient(pool)
    files = task_files(task) if files is None else files
    async with client.session(profile, ttl_s=600.0 + timeout) as session:
        return await _grade_in(session, task, model_patch, timeout, files)


async def _grade_in(session, task, model_patch, timeout, files) -> tuple[float, dict]:
    info: dict = {"instance_id": task.instance_id, "resolved": False}
    await setup_repo(session, files)
    if not model_patch.strip():
        info["patch_applied"] = False
        info["note"] = "empty patch"
    else:
        ok, log = await apply_patch(session, model_patch, "model")
        info["patch_applied"] = ok
        if not ok:
            info["reason"] = "patch does not apply"
            info["apply_log"] = log
            return 0.0, info
        error = await restore_tests(session, task, files)
        if error:
            info["reason"] = "the tests could not be restored after the patch"
            info["restore_log"] = error
            return 0.0, info
    if task.test_patch.strip():
        ok, log = await apply_patch(session, task.test_patch, "test")
        if not ok:
            info["reason"] = "test patch does not apply"
            info["apply_log"] = log
            return 0.0, info
    run = await run_pytest(session, node_files(task.test_nodes), timeout)
    resolved, detail = decide(task, run.status)
    info.update(detail)
    info["resolved"] = resolved
    info["duration_s"] = round(run.duration_s, 3)
    if run.timed_out:
        info["timed_out"] = True
    if not resolved:
        if run.timed_out:
            info["reason"] = "test run timed out"
        elif run.collect_errors:
            info["reason"] = "tests could not be collected"
            info["collect_errors"] = run.collect_errors
        elif not run.status:
            info["reason"] = "pytest did not run"
        else:
            info["reason"] = "tests failed"
        info["messages"] = {n: m for n, m in run.messages.items() if n in task.test_nodes}
        info["output_tail"] = run.output[-1500:]
    return float(resolved), info
