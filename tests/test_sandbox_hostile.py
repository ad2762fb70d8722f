"""The hostile battery: the same attacks in every sandbox backend (`sandbox_factory`).

After each attack: the outcome is classified, the host is unaffected (planted files unchanged, no
new entries in the host's /etc, /usr, /), the planted secret was not read, no process of the
sandbox survives on the host (each command carries a unique marker in its command line; /proc is
scanned for it) and the same sandbox, after reset, serves the next command.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from rayrl.sandbox.base import Limits, Outcome, Profile
from tests.sandbox_backends import sandbox_backend, sandbox_factory  # noqa: F401  (fixtures)

try:  # the Docker engine fixture, once tests/docker_engine.py exists
    from tests.docker_engine import docker_backend  # noqa: F401
except ImportError:
    pass

pytestmark = [pytest.mark.hostile, pytest.mark.asyncio(loop_scope="session")]

LIMITS = Limits(cpu_seconds=10, memory_mb=256, processes=64, file_size_mb=16, open_files=128,
                tmp_mb=16, work_mb=32, output_bytes=64 << 10, cpus=1.0)
PROFILE = Profile(name="hostile", limits=LIMITS, files=(("seed.txt", b"seed\n"),))
# (not /root, /var or /tmp: other programs on the host change those; the attacks' targets there
# are checked one by one)
WATCHED_DIRS = ("/", "/etc", "/usr", "/usr/bin", "/usr/local/bin")
WATCHED_FILES = ("/etc/passwd", "/etc/hosts", "/etc/shadow", "/usr/bin/python3")


def _scan(marker: str) -> list[tuple[int, str]]:
    """Host processes whose command line contains `marker`."""
    found, m = [], marker.encode()
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if m in cmd:
            found.append((int(d), cmd.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return found


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None
    except PermissionError:
        return "unreadable"


def _snapshot() -> dict:
    snap = {}
    for d in WATCHED_DIRS:
        try:
            # secrets planted by other runs of this battery come and go
            snap[d] = sorted(n for n in os.listdir(d) if not n.startswith("rayrl-secret-"))
        except OSError:
            snap[d] = None
    for f in WATCHED_FILES:
        snap[f] = _digest(f)
    return snap


class Host:
    """Plants a secret on the host and checks, after an attack, that the host is unaffected."""

    def __init__(self, marker: str):
        self.marker = marker
        self.secret = f"SECRET-{uuid.uuid4().hex}"
        self.secret_paths = [f"/root/rayrl-secret-{marker}", f"/tmp/rayrl-secret-{marker}"]
        for p in self.secret_paths:
            with open(p, "w") as f:
                f.write(self.secret + "\n")
            os.chmod(p, 0o644)        # readable by anyone who can reach it: the path must not be
        self.before = _snapshot()

    def check(self, *outputs: bytes) -> None:
        for out in outputs:
            assert self.secret.encode() not in out, "the sandbox read the host secret"
        for p in self.secret_paths:
            with open(p) as f:
                assert f.read() == self.secret + "\n", f"host file {p} changed"
        after = _snapshot()
        for k, v in self.before.items():
            assert after[k] == v, f"host {k} changed"
        # nothing of the sandbox survives its command (give a remote engine a moment)
        deadline = time.monotonic() + 3.0
        while (left := _scan(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"sandbox processes survived on the host: {left}"

    def cleanup(self) -> None:
        for p in self.secret_paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


@pytest.fixture
def host():
    h = Host(uuid.uuid4().hex[:12])
    try:
        yield h
    finally:
        h.cleanup()


def _no_children(sb) -> None:
    """bwrap: the agent (pid 1 inside) has no process left after a command."""
    pid = getattr(sb, "agent_pid", None)
    if pid:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            assert f.read().split() == [], "processes left in the sandbox after the command"


async def _serves_next(make, sb, host: Host) -> None:
    """The attacked sandbox goes back to its pool, which serves the next lease: the same sandbox
    after a reset (bwrap: it must survive every attack) or, if the reset failed, a fresh one."""
    pool = sb.pool
    await pool.release(sb.lease)
    lease = await pool.lease(PROFILE.name)
    r = await pool.exec(lease, "cat seed.txt; ls -A /work | wc -l; echo ok", timeout=10)
    assert r.ok, r
    assert r.stdout.split() == [b"seed", b"1", b"ok"], r.stdout
    if make.name == "bwrap":
        assert pool.stats()["started"] == 1 and pool._leases[lease].sandbox is sb
    _no_children(pool._leases[lease].sandbox)
    host.check(r.stdout, r.stderr)
    await pool.release(lease)


async def test_fork_bomb(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    code = ("import os, time\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n")
    t0 = time.monotonic()
    r = await sb.exec(["python3", "-c", code, host.marker], timeout=2)
    assert r.outcome == Outcome.TIMEOUT, r
    assert time.monotonic() - t0 < 15
    _no_children(sb)
    subprocess.run(["true"], check=True)          # the host can still fork
    host.check(r.stdout, r.stderr)
    # the classic shell bomb too: it may return at once (its top call backgrounds itself)
    r = await sb.exec(f"b(){{ b|b& }}; b; sleep 1 # {host.marker}", timeout=2)
    assert r.outcome in (Outcome.NORMAL, Outcome.TIMEOUT), r
    _no_children(sb)
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_memory_bomb(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    code = "a = []\nwhile True:\n    a.append(bytearray(16 << 20))\n"
    r = await sb.exec(["python3", "-c", code, host.marker], timeout=10)
    # an OOM kill, or (rlimit on the address space) a MemoryError that exits non-zero
    assert (r.outcome == Outcome.OOM
            or (r.outcome == Outcome.NORMAL and r.exit_code != 0 and b"MemoryError" in r.stderr)), r
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_memory_bomb_many_processes(sandbox_factory, host):
    """Each process stays under the per-process limit; together they pass the sandbox's memory:
    where a memory cgroup bounds the sandbox that is an OOM kill."""
    sb = await sandbox_factory(PROFILE)
    code = ("import os, time\n"
            "kids = []\n"
            "for i in range(8):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        b = bytearray(150 << 20)\n"
            "        time.sleep(1.0)\n"
            "        os._exit(0)\n"
            "    kids.append(pid)\n"
            "for p in kids:\n"
            "    print(os.waitpid(p, 0)[1], end=' ')\n")
    r = await sb.exec(["python3", "-c", code, host.marker], timeout=15)
    if sandbox_factory.memory_cgroup:
        assert r.outcome == Outcome.OOM, r
    else:
        assert r.outcome in (Outcome.NORMAL, Outcome.OOM), r
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_cpu_spin_past_timeout(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    t0 = time.monotonic()
    r = await sb.exec(["python3", "-c", "while True: pass", host.marker], timeout=1.5)
    assert r.outcome == Outcome.TIMEOUT, r
    assert r.exit_code is None
    assert time.monotonic() - t0 < 10
    _no_children(sb)
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_sleep_past_timeout(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    t0 = time.monotonic()
    r = await sb.exec(["python3", "-c", "import time; print('x', flush=True); time.sleep(60)",
                       host.marker], timeout=1)
    assert r.outcome == Outcome.TIMEOUT, r
    assert r.stdout == b"x\n"                   # output written before the timeout is kept
    assert 0.9 < r.duration_s < 5, r.duration_s
    assert time.monotonic() - t0 < 10
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_gigabyte_of_output(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = await sb.exec(f"(yes {host.marker} | head -c 1000000000) & "
                      f"(yes {host.marker} | head -c 1000000000 >&2); wait", timeout=20)
    assert r.outcome in (Outcome.NORMAL, Outcome.TIMEOUT), r.outcome
    assert r.stdout_truncated and r.stderr_truncated
    assert len(r.stdout) == LIMITS.output_bytes and len(r.stderr) == LIMITS.output_bytes
    # bounded memory here: nowhere near a gigabyte was held
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_writes_outside_the_work_directory(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    m = host.marker
    targets = [f"/etc/rayrl-{m}", f"/usr/rayrl-{m}", f"/usr/bin/rayrl-{m}", f"/rayrl-{m}",
               f"/root/rayrl-{m}", f"/var/rayrl-{m}", f"/usr/local/bin/rayrl-{m}"]
    script = " ".join(f"echo x > {t} 2>/dev/null;" for t in targets)
    script += " echo pwned >> /etc/passwd; echo pwned >> /etc/hosts; rm -f /usr/bin/python3;"
    script += f" echo pwned > /root/rayrl-secret-{m}; echo pwned > /tmp/rayrl-secret-{m}; true"
    r = await sb.exec(script + f" # {m}", timeout=10)
    assert r.outcome == Outcome.NORMAL, r
    for t in targets:
        assert not os.path.exists(t), f"{t} appeared on the host"
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_read_host_secret(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    m = host.marker
    script = (f"cat /root/rayrl-secret-{m} /tmp/rayrl-secret-{m} /proc/1/root/root/rayrl-secret-{m};"
              f" cat /proc/*/root/tmp/rayrl-secret-{m};"
              f" find / -path /proc -prune -o -name 'rayrl-secret-*' -print 2>/dev/null | xargs -r cat; true # {m}")
    r = await sb.exec(script, timeout=20)
    assert r.outcome == Outcome.NORMAL, r
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_connect_to_host_loopback(sandbox_factory, host):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                accepted.append(c)
            except OSError:
                pass

    th = threading.Thread(target=accept_loop, daemon=True)
    th.start()
    try:
        sb = await sandbox_factory(PROFILE)
        code = ("import socket, sys\n"
                f"for h in ('127.0.0.1', 'localhost', '::1'):\n"
                "    try:\n"
                f"        socket.create_connection((h, {port}), timeout=2)\n"
                "        print('CONNECTED', h)\n"
                "    except OSError as e:\n"
                "        print('refused', h, e)\n")
        r = await sb.exec(["python3", "-c", code, host.marker], timeout=15)
        assert r.outcome == Outcome.NORMAL, r
        assert b"CONNECTED" not in r.stdout, r.stdout
        assert not accepted, "the host server accepted a connection from the sandbox"
        host.check(r.stdout, r.stderr)
        await _serves_next(sandbox_factory, sb, host)
    finally:
        stop.set()
        th.join()
        srv.close()


async def test_kill_everything(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    r = await sb.exec(f"sleep 30 & kill -9 -1; echo after # {host.marker}", timeout=5)
    assert r.outcome in (Outcome.NORMAL, Outcome.SIGNAL), r
    # the sandbox is still there, without a reset
    r2 = await sb.exec("echo still-here", timeout=10)
    assert r2.ok and r2.stdout == b"still-here\n", r2
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)


async def test_daemon_does_not_outlive_its_command(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    m = host.marker
    r = await sb.exec(
        f"setsid nohup python3 -c 'import time; time.sleep(1000)' {m} >/dev/null 2>&1 & "
        f"(python3 -c 'import os, time; os.fork() or os.setsid(); time.sleep(1000)' {m} "
        f">/dev/null 2>&1 &) ; echo started", timeout=10)
    assert r.ok and r.stdout == b"started\n", r
    _no_children(sb)
    host.check(r.stdout, r.stderr)
    r = await sb.exec("ps -eo pid,args 2>/dev/null || ls /proc", timeout=10)
    assert m.encode() not in r.stdout
    await _serves_next(sandbox_factory, sb, host)


async def test_fill_the_disk(sandbox_factory, host):
    sb = await sandbox_factory(PROFILE)
    free0 = shutil.disk_usage("/").free
    # at most 64 x 4 MB per place; a capped work dir (32 MB) and /tmp (16 MB) stop it early
    script = ("n=0; for d in /work /tmp /dev/shm; do i=0; while [ $i -lt 64 ]; do "
              "head -c 4000000 /dev/zero > $d/fill$i 2>/dev/null || break; i=$((i+1)); n=$((n+1)); "
              f"done; done; echo $n # {host.marker}")
    r = await sb.exec(script, timeout=30)
    assert r.outcome == Outcome.NORMAL, r
    written_mb = int(r.stdout.split()[-1]) * 4
    cap = LIMITS.work_mb + 2 * LIMITS.tmp_mb
    assert written_mb <= cap + 8, f"wrote {written_mb} MB past the caps ({cap} MB)"
    assert free0 - shutil.disk_usage("/").free < 64 << 20, "the host disk filled"
    # the sandbox cannot write more now, and reset frees the space again
    r = await sb.exec("head -c 8000000 /dev/zero > /work/more", timeout=10)
    assert r.exit_code != 0 or r.outcome != Outcome.NORMAL
    host.check(r.stdout, r.stderr)
    await _serves_next(sandbox_factory, sb, host)
    r = await sb.exec("head -c 8000000 /dev/zero > /work/more && echo ok", timeout=10)
    assert r.ok, r


async def test_concurrent_attacks_leave_the_host_alone(sandbox_factory, host):
    """A few attacks at once in separate sandboxes; each is contained on its own."""
    sbs = await asyncio.gather(*[sandbox_factory(PROFILE) for _ in range(3)])
    m = host.marker
    rs = await asyncio.gather(
        sbs[0].exec(["python3", "-c", "while True: pass", m], timeout=1.5),
        sbs[1].exec(f"b(){{ b|b& }}; b; sleep 5 # {m}", timeout=1.5),
        sbs[2].exec(f"yes {m} | head -c 300000000", timeout=10),
    )
    assert rs[0].outcome == Outcome.TIMEOUT
    assert rs[1].outcome in (Outcome.TIMEOUT, Outcome.NORMAL)
    assert rs[2].stdout_truncated
    host.check(*(r.stderr for r in rs))
    for sb in sbs:
        await _serves_next(sandbox_factory, sb, host)
