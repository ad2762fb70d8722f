"""Functional tests of the Docker sandbox backend against a real (private) engine.

The engine and image come from the session fixture in tests/docker_engine.py; without a dockerd
that can start, these tests are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from rayrl.sandbox.base import Limits, Outcome, SandboxInfraError, WORKDIR
from rayrl.sandbox.docker import DockerBackend, DockerSandbox
from tests.docker_engine import docker_backend  # noqa: F401  (session fixture)

# uid-1000 (sandbox user) processes other than the lister itself: "pid name" lines
PS = ("import os\n"
      "for p in filter(str.isdigit, os.listdir('/proc')):\n"
      "    try:\n"
      "        st = open(f'/proc/{p}/status').read().split('\\n')\n"
      "    except OSError:\n"
      "        continue\n"
      "    uid = [l.split()[1] for l in st if l.startswith('Uid:')][0]\n"
      "    if uid == '1000' and int(p) != os.getpid():\n"
      "        print(p, st[0].split()[1])\n")


@contextlib.asynccontextmanager
async def sandbox(engine, limits: Limits = Limits(), files=(), env=()):
    sb = await engine.backend.create(engine.profile_for(limits=limits, files=files, env=env))
    try:
        yield sb
    finally:
        await sb.close()


async def user_processes(sb: DockerSandbox) -> list[str]:
    """Processes of the sandbox user left in the container (the lister excluded)."""
    r = await sb.exec(["python3", "-c", PS])
    assert r.ok, r
    return r.stdout.decode().splitlines()


async def test_echo_exit_codes_stdin_env(docker_backend):
    async with sandbox(docker_backend, env=(("PROFILE_VAR", "p"),)) as sb:
        r = await sb.exec("echo hello; echo oops >&2")
        assert (r.exit_code, r.stdout, r.stderr, r.outcome) == (0, b"hello\n", b"oops\n", Outcome.NORMAL)
        assert r.ok and r.signal is None and r.duration_s > 0
        r = await sb.exec("exit 3")
        assert (r.exit_code, r.outcome, r.ok) == (3, Outcome.NORMAL, False)
        r = await sb.exec("cat; echo; wc -c", stdin=b"line one\nline two")
        assert r.stdout.startswith(b"line one\nline two\n") and r.exit_code == 0
        big = bytes(range(256)) * 4096          # 1 MiB of binary stdin
        r = await sb.exec(["python3", "-c", "import sys, hashlib; "
                           "print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"], stdin=big)
        import hashlib
        assert r.stdout.decode().strip() == hashlib.sha256(big).hexdigest()
        r = await sb.exec("cat", timeout=5)     # no stdin given: EOF at once, no hang
        assert r.outcome == Outcome.NORMAL and r.stdout == b""
        r = await sb.exec('echo "$PROFILE_VAR $CALL_VAR $HOME $(id -u) $(pwd)"', env={"CALL_VAR": "c"})
        assert r.stdout == f"p c {WORKDIR} 1000 {WORKDIR}\n".encode()
        r = await sb.exec(["printf", "%s|", "a b", "$HOME"])      # argv: no shell
        assert r.stdout == b"a b|$HOME|"
        r = await sb.exec(["no-such-program"])
        assert r.exit_code == 127 and b"No such file" in r.stderr
        r = await sb.exec("kill -TERM $$")
        assert (r.outcome, r.signal, r.exit_code) == (Outcome.SIGNAL, 15, None)
        r = await sb.exec("echo hi > /etc/x; echo hi > /usr/x; echo hi > /x; touch /work/ok && echo fine")
        assert r.stderr.count(b"Read-only file system") == 3 and r.stdout == b"fine\n"
        # the root wrapper's environment (which carries the status nonce) is not readable
        r = await sb.exec("cat /proc/$PPID/environ")
        assert r.exit_code != 0 and b"Permission denied" in r.stderr, r
        # commands on one sandbox run one after the other, never killing each other
        a, b = await asyncio.gather(sb.exec("sleep 0.3; echo a"), sb.exec("echo b"))
        assert (a.stdout, b.stdout) == (b"a\n", b"b\n")
        with pytest.raises(ValueError):
            await sb.exec("echo", env={"BAD": "nul\x00byte"})


async def test_output_caps(docker_backend):
    async with sandbox(docker_backend, limits=Limits(output_bytes=1000)) as sb:
        r = await sb.exec("head -c 5000 /dev/zero | tr '\\0' a; head -c 3000 /dev/zero | tr '\\0' b >&2")
        assert len(r.stdout) == 1000 and r.stdout_truncated and r.stdout == b"a" * 1000
        assert len(r.stderr) == 1000 and r.stderr_truncated and r.stderr == b"b" * 1000
        assert r.exit_code == 0
        r = await sb.exec("printf %1000s x | tr ' ' y")       # exactly at the cap: not truncated
        assert len(r.stdout) == 1000 and not r.stdout_truncated
        t0 = time.monotonic()
        r = await sb.exec("head -c 200M /dev/zero; echo done >&2", timeout=30)   # drained, not blocked
        assert r.outcome == Outcome.NORMAL and r.exit_code == 0 and r.stderr == b"done\n"
        assert r.stdout_truncated and len(r.stdout) == 1000
        print(f"200 MB of output drained in {time.monotonic() - t0:.2f} s")


async def test_files_round_trip(docker_backend):
    files = (("hello.txt", b"hi\n"), ("pkg/sub/mod.py", b"X = 1\n"))
    async with sandbox(docker_backend, files=files) as sb:
        assert await sb.read_file("hello.txt") == b"hi\n"
        assert await sb.read_file(f"{WORKDIR}/pkg/sub/mod.py") == b"X = 1\n"
        blob = bytes(range(256)) * 1000
        await sb.write_file("data/blob.bin", blob)
        await sb.write_file("/tmp/t.txt", b"in tmp\n")
        assert await sb.read_file("data/blob.bin") == blob
        r = await sb.exec("python3 -c 'import pkg.sub.mod as m; print(m.X)'; cat /tmp/t.txt; "
                          "stat -c %U data/blob.bin; echo new > made.txt; ln -s made.txt link")
        assert r.stdout == b"1\nin tmp\nsandbox\n", r.stderr
        assert await sb.read_file("made.txt") == b"new\n"
        assert await sb.read_file("link") == b"new\n"
        await sb.write_file("hello.txt", b"overwritten")
        assert (await sb.exec("cat hello.txt")).stdout == b"overwritten"
        assert await sb.read_file("/etc/os-release") != b""
        with pytest.raises(FileNotFoundError):
            await sb.read_file("missing.txt")
        with pytest.raises(IsADirectoryError):
            await sb.read_file("pkg")
        with pytest.raises(ValueError):
            await sb.write_file("/etc/passwd", b"no")
        with pytest.raises(ValueError):
            await sb.write_file("../escape", b"no")


async def test_reset_restores_initial_state(docker_backend):
    async with sandbox(docker_backend, files=(("seed.txt", b"seed"),)) as sb:
        await sb.exec("echo junk > junk.txt; mkdir -p d/e; chmod 000 d; echo t > /tmp/t; "
                      "echo s > /dev/shm/s; rm seed.txt")
        t0 = time.monotonic()
        await sb.reset()
        print(f"reset in {(time.monotonic() - t0) * 1000:.0f} ms")
        r = await sb.exec("ls -A /work /tmp /dev/shm")
        assert r.stdout.split() == [b"/dev/shm:", b"/tmp:", b"/work:", b"seed.txt"], r.stdout
        assert await sb.read_file("seed.txt") == b"seed"
        assert await sb.alive()


async def test_timeout_kills_the_process_tree(docker_backend):
    async with sandbox(docker_backend) as sb:
        # the lister sees what runs beside it
        r = await sb.exec(["sh", "-c", 'sleep 30 & exec python3 -c "$0"', PS])
        assert r.stdout.decode().split()[1::2] == ["sleep"], r
        t0 = time.monotonic()
        r = await sb.exec("sleep 100 & sleep 100 & (sleep 100; echo never) & echo started; wait", timeout=1.0)
        elapsed = time.monotonic() - t0
        assert r.outcome == Outcome.TIMEOUT and r.exit_code is None and r.signal == 9
        assert r.stdout == b"started\n"
        assert 1.0 <= elapsed < 3.0, elapsed
        assert await user_processes(sb) == []
        # a daemonized process that tries to outlive its (successful) command
        r = await sb.exec("setsid sh -c 'while :; do sleep 1; done' </dev/null >/dev/null 2>&1 & echo bye")
        assert r.ok and r.stdout == b"bye\n"
        assert await user_processes(sb) == []
        # a command's own `kill -9 -1` cannot take the sandbox down
        r = await sb.exec("kill -9 -1; echo still here")
        assert r.stdout == b"still here\n" and await sb.alive()
        assert (await sb.exec("echo next")).stdout == b"next\n"


async def test_cpu_time_limit_is_a_timeout(docker_backend):
    async with sandbox(docker_backend, limits=Limits(cpu_seconds=1)) as sb:
        r = await sb.exec(["python3", "-c", "while True: pass"], timeout=20)
        assert r.outcome == Outcome.TIMEOUT and r.duration_s < 10, r


async def test_network_none(docker_backend):
    async with sandbox(docker_backend) as sb:
        r = await sb.exec("ls /sys/class/net")
        assert r.stdout.split() == [b"lo"]
        r = await sb.exec(["python3", "-c", "import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)"])
        assert r.exit_code != 0 and b"unreachable" in r.stderr.lower()
        cfg = docker_backend.backend.container_config(sb.profile)
        assert cfg["HostConfig"]["NetworkMode"] == "none"


async def test_memory_limit_is_oom(docker_backend):
    async with sandbox(docker_backend, limits=Limits(memory_mb=64)) as sb:
        r = await sb.exec(["python3", "-c", "x = bytearray(256 << 20); print('allocated')"], timeout=20)
        assert r.outcome == Outcome.OOM and b"allocated" not in r.stdout, r
        r = await sb.exec("python3 -c 'l = []\nwhile True: l.append(bytearray(8 << 20))'", timeout=20)
        assert r.outcome == Outcome.OOM, r
        assert await sb.alive()
        r = await sb.exec("echo fine")                 # the sandbox serves the next command
        assert r.ok and r.stdout == b"fine\n"


async def test_pids_limit(docker_backend):
    async with sandbox(docker_backend, limits=Limits(processes=16)) as sb:
        r = await sb.exec("n=0; for i in $(seq 40); do sleep 5 & n=$((n+1)); done 2>/dev/null; "
                          "ls /proc | grep -c '^[0-9]'", timeout=10)
        assert b"fork" in r.stderr.lower() or r.exit_code != 0, r
        assert await user_processes(sb) == []
        t0 = time.monotonic()
        r = await sb.exec("bomb() { bomb | bomb & }; bomb; sleep 10", timeout=2)
        assert r.outcome == Outcome.TIMEOUT, r
        assert time.monotonic() - t0 < 6
        assert await user_processes(sb) == []
        assert (await sb.exec("echo recovered")).stdout == b"recovered\n"


async def test_close_removes_the_container(docker_backend):
    from aiodocker.exceptions import DockerError
    backend = docker_backend.backend
    sb = await backend.create(docker_backend.profile_for())
    assert sb.id in await backend.list_containers()
    await sb.close()
    await sb.close()                                   # idempotent
    assert sb.id not in await backend.list_containers()
    with pytest.raises(DockerError) as e:
        await backend._client().containers.container(sb.id).show()
    assert e.value.status == 404
    assert not await sb.alive()
    with pytest.raises(SandboxInfraError):
        await sb.exec("echo no")


async def test_infrastructure_failures_raise_infra_error(docker_backend):
    backend = docker_backend.backend
    # container removed behind the sandbox's back
    sb = await backend.create(docker_backend.profile_for())
    await backend._client().containers.container(sb.id).delete(force=True)
    with pytest.raises(SandboxInfraError, match="vanished|not running"):
        await sb.exec("echo hi")
    assert not await sb.alive()
    await sb.close()                                   # still fine
    # a missing image is named, and never pulled
    with pytest.raises(SandboxInfraError, match="rayrl-sandbox:no-such-tag"):
        await backend.create(docker_backend.profile_for().__class__(
            name="x", backend="docker", image="rayrl-sandbox:no-such-tag"))
    # no engine at the address
    dead = DockerBackend("unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxInfraError, match="unreachable|nonexistent"):
        await dead.create(docker_backend.profile_for())
    await dead.shutdown()


async def test_container_start_latency(docker_backend):
    backend = docker_backend.backend
    profile = docker_backend.profile_for(files=(("a.txt", b"a"),))
    starts, execs = [], []
    for _ in range(3):
        t0 = time.monotonic()
        sb = await backend.create(profile)
        starts.append(time.monotonic() - t0)
        try:
            for _ in range(5):
                t0 = time.monotonic()
                r = await sb.exec("true")
                execs.append(time.monotonic() - t0)
                assert r.ok
        finally:
            await sb.close()
    # several at once
    t0 = time.monotonic()
    many = await asyncio.gather(*(backend.create(profile) for _ in range(4)))
    parallel = time.monotonic() - t0
    await asyncio.gather(*(sb.close() for sb in many))
    starts.sort(), execs.sort()
    print(f"docker create+start: median {starts[1] * 1000:.0f} ms, max {starts[-1] * 1000:.0f} ms; "
          f"4 in parallel {parallel * 1000:.0f} ms; exec median {execs[len(execs) // 2] * 1000:.0f} ms; "
          f"engine timings {docker_backend.timings}")
    assert starts[1] < 5.0 and execs[len(execs) // 2] < 2.0


# ---------------------------------------------------------------- no engine needed

def test_dockerd_says_why_it_cannot_start(tmp_path):
    from rayrl.sandbox.dockerd import PrivateDockerd, start_private_dockerd
    reason = start_private_dockerd(tmp_path / "a", binary="/nonexistent/dockerd")
    assert isinstance(reason, str) and "not found" in reason
    d = PrivateDockerd(tmp_path / "b", extra_args=("--no-such-flag",))
    reason = d.start(timeout=20)
    if d.binary and reason and "needs root" in reason:
        pytest.skip(reason)
    assert reason is not None and "no-such-flag" in reason, reason
    assert d.pid is None


def test_apt_mirror_reads_both_source_formats(tmp_path):
    from rayrl.sandbox.image import apt_mirror, image_name
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
                      "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
                      "Suites: bookworm-security\nComponents: main\n")
    assert apt_mirror("bookworm", [str(deb822)]) == "http://mirror.example/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("# comment\ndeb-src http://src.example/debian bookworm main\n"
                      "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n")
    assert apt_mirror("bookworm", [str(legacy)]) == "http://one.example/debian"
    assert image_name().startswith("rayrl-sandbox:bookworm-")


def test_dockerd_root_is_held_by_one_process_at_a_time(tmp_path):
    import subprocess
    import sys
    from rayrl.sandbox.dockerd import PrivateDockerd
    # another process holds the root's lock (as a concurrent test session's daemon would)
    (tmp_path / "r").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / 'r' / 'lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        reason = PrivateDockerd(tmp_path / "r").start(timeout=5)
        assert reason is not None and "in use" in reason and "4242" in reason, reason
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


async def test_recovery_paths(docker_backend, monkeypatch):
    import rayrl.sandbox.docker as dmod
    async with sandbox(docker_backend, files=(("seed.txt", b"seed"),)) as sb:
        # the client stops waiting before the in-container wrapper does: the fallback kills the
        # command and the wrapper, and the next command is unaffected by the old wrapper
        monkeypatch.setattr(dmod, "EXEC_GRACE_S", -1.0)
        r = await sb.exec("sleep 30", timeout=1.5)
        assert r.outcome == Outcome.TIMEOUT and r.duration_s < 3, r
        monkeypatch.undo()
        r = await sb.exec("sleep 2; echo survived", timeout=10)
        assert r.ok and r.stdout == b"survived\n", r
        # the last resort: the container restarts and comes back in its initial state
        await sb.exec("echo x > extra.txt")
        await sb._restart()
        assert await sb.alive()
        r = await sb.exec("ls")
        assert r.stdout == b"seed.txt\n", r


async def test_code_grading_in_the_image(docker_backend):
    """The code runner (envs/code/runner.py) under the image's own python3: the candidate's
    process and the checker's, plain data over their pipe, the pass token after the check."""
    from envs.code import CodeTask, code_profile, grade_completion
    from rayrl.sandbox.pool import SandboxPool
    limits = code_profile().limits
    pool = SandboxPool([docker_backend.profile_for(limits=limits, name="default")], min_idle=0, max_total=1,
                       export_metrics=False, backends={"docker": docker_backend.backend})
    task = CodeTask("t/pairs", "function", "from collections import namedtuple\nPair = namedtuple('Pair', 'a b')\n"
                    "def pairs(xs, key):\n", entry_point="pairs",
                    test="def check(candidate):\n    xs = [3, 1, 2]\n    assert candidate(xs, lambda v: -v) == Pair(3, 1)\n"
                         "    assert xs == [3, 2, 1] and candidate([5], abs).b == 5\n")
    honest = "    xs.sort(key=key)\n    return Pair(xs[0], xs[-1])\n"
    from_frames = "    import sys\n    f = sys._getframe()\n    while f:\n        f.f_globals['Pair'] = lambda *a: 0\n" \
                  "        f = f.f_back\n    return 0\n"
    try:
        results = [await grade_completion(pool, task, c) for c in (honest, "    return Pair(0, 0)\n", from_frames)]
    finally:
        await pool.shutdown()
    assert [r for r, _ in results] == [1.0, 0.0, 0.0], results
    assert [info["failure"] for _, info in results] == [None, "wrong_answer", "wrong_answer"], results
