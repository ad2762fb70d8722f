"""The bubblewrap backend: daemon-free sandboxes, each a `bwrap` process with a small C agent inside.

One sandbox = one `bwrap` (outer, on the host) + the agent (pid 1 of the sandbox's pid namespace),
started once and then driven over a socketpair with length-prefixed frames (see agent.c), so a
warm sandbox serves many commands without a new start.

Isolation, per sandbox:

- new user, pid, network (loopback only), ipc, uts and cgroup namespaces (`--unshare-all
  --unshare-user --disable-userns --die-with-parent --as-pid-1`);
- the host's (or `profile.image`'s) /usr and the /bin, /lib* links bound read-only; /etc is a
  read-only snapshot of the few entries programs need (ld.so.cache, alternatives, ssl, python3 ...,
  only what any host user may read) with a generated passwd/group/hosts; the root is a read-only
  tmpfs, so nothing else of the host (its /tmp, /root, /home, /work ...) is visible;
- a size-capped tmpfs at /work (`limits.work_mb`), /tmp and /dev/shm (`limits.tmp_mb` each); all
  files are read and written through the agent, so nothing of a sandbox lives on the host disk;
- when running as root, every sandbox runs as its own unprivileged host uid (a random uid in a
  range no account uses; uid 1000 "sandbox" inside), so RLIMIT_NPROC counts only that sandbox's
  processes and nothing in it is root on the host; otherwise it runs as the calling user;
- rlimits per command (CPU, address space, processes, file size, open files) and, where the
  machine offers them (cgroup v1 memory / pids / cpu as root), a cgroup per sandbox with
  `memory.limit_in_bytes`, `pids.max` and a CPU quota; without cgroups the rlimits alone apply;
- after every command (exit or timeout) the agent SIGKILLs every other process of the namespace,
  so nothing a command started or daemonized outlives it; `close()` kills the namespace.

Outcomes: TIMEOUT at the wall-clock timeout or the CPU-time rlimit (SIGXCPU, or a shell passing
that death on as 128+SIGXCPU); OOM when the sandbox's memory cgroup OOM-killed any of its processes
during the command, or (rlimit only) a process that died of SIGKILL/SEGV/BUS/ABRT with a peak
resident set at the memory limit; SIGNAL for other deaths by signal (SIGXFSZ at the file-size
limit included); NORMAL otherwise, whatever the exit code (a Python MemoryError at the address-space
limit is NORMAL with exit code 1).

The memory cgroup is sized `memory_mb + work_mb + 2 * tmp_mb + 16` MB, since the tmpfs mounts
(/work, /tmp, /dev/shm) are charged to it; each process is also held to `memory_mb` of address
space. `pids.max` is `processes + 2` (the agent, slack).

Failures of the machinery (bwrap does not start, the agent dies, the protocol breaks) raise
`SandboxInfraError` naming the cause; what the command did is an `ExecResult`.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import glob
import hashlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from .base import (
    WORKDIR,
    Backend,
    ExecResult,
    Limits,
    Outcome,
    Profile,
    Sandbox,
    SandboxInfraError,
)

__all__ = ["BwrapBackend", "BwrapSandbox", "agent_path", "runtime_dir"]

MAGIC = b"RAYRLAG1"
AGENT_SOURCE = Path(__file__).with_name("agent.c")
AGENT_VERSION = 1                 # bump when the wire format changes (part of the cache key)
SANDBOX_UID = 1000                # uid and gid inside the sandbox
UID_BASE = 0x5A000000             # per-sandbox host uids: UID_BASE + [0, UID_SPAN)
UID_SPAN = 1 << 24
MAX_FRAME = 1 << 31
_MB = 1 << 20

# /etc entries bound read-only (when present); passwd, group and hosts are generated.
ETC_ENTRIES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "timezone",
    "nsswitch.conf", "host.conf", "protocols", "services", "ssl", "ca-certificates",
    "ca-certificates.conf", "mime.types", "os-release", "debian_version", "bash.bashrc", "profile",
    "inputrc", "terminfo", "gai.conf", "magic", "magic.mime", "login.defs", "environment",
)
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": WORKDIR,
    "PWD": WORKDIR,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "USER": "sandbox",
    "LOGNAME": "sandbox",
    "SHELL": "/bin/sh",
}


# ---------------------------------------------------------------------------------------- agent


def _cache_root() -> Path:
    """Where the compiled agent lives. It must be readable by the sandboxes' uids: as root (one
    uid per sandbox) ~/.cache under /root is not, so root uses /var/cache/rayrl."""
    env = os.environ.get("RAYRL_SANDBOX_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/rayrl/sandbox")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "rayrl" / "sandbox"


_PASSWD = (f"root:x:0:0:root:/root:/bin/sh\n"
           f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:{WORKDIR}:/bin/sh\n"
           "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
_GROUP = f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def runtime_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The read-only directory bound at /.rayrl in every sandbox: the agent binary (compiled with
    gcc on first use, keyed by the hash of its source) and generated passwd/group/hosts.

    Built in a temporary directory and renamed into place, so concurrent builders (several
    processes, Ray workers) never see a half-written agent. `RAYRL_SANDBOX_AGENT` may name a
    prebuilt agent binary instead (no gcc needed)."""
    root = Path(cache_dir) if cache_dir else _cache_root()
    prebuilt = os.environ.get("RAYRL_SANDBOX_AGENT")
    src = AGENT_SOURCE.read_bytes()
    h = hashlib.sha256()
    h.update(src if not prebuilt else Path(prebuilt).read_bytes())
    h.update(f"v{AGENT_VERSION}|{_PASSWD}|{_GROUP}|{_HOSTS}".encode())
    final = root / h.hexdigest()[:16]
    if (final / "agent").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        if prebuilt:
            shutil.copy2(prebuilt, tmp / "agent")
        else:
            _compile_agent(tmp / "agent")
        for name, text in (("passwd", _PASSWD), ("group", _GROUP), ("hosts", _HOSTS)):
            (tmp / name).write_text(text)
            os.chmod(tmp / name, 0o644)
        os.chmod(tmp / "agent", 0o755)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "agent").exists():    # lost a race is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def etc_snapshot(etc: Path, cache_root: Path) -> Path:
    """A copy of the few /etc entries a sandbox needs (ETC_ENTRIES, python3*), plus generated
    passwd, group and hosts: bound as the sandbox's /etc in one mount (one bind per entry costs
    about a third of a sandbox start). Only what any user of the host may read is copied; the copy
    is keyed by a fingerprint of the sources (names, modes, sizes, mtimes), so a change to the
    host's /etc (a new ld.so.cache after an install) gives a new snapshot."""
    names = [n for n in ETC_ENTRIES if os.path.lexists(etc / n)]
    names += sorted(os.path.basename(p) for p in glob.glob(str(etc / "python3*")))
    items = []                          # (relative path, kind, mode, payload)

    def walk(rel: str) -> None:
        src = etc / rel
        try:
            st = os.lstat(src)
        except OSError:
            return
        if os.path.islink(src):
            items.append((rel, "l", 0o777, os.readlink(src), 0))
        elif os.path.isdir(src):
            if st.st_mode & 0o005 != 0o005:
                return
            items.append((rel, "d", 0o755, "", 0))
            try:
                children = sorted(os.listdir(src))
            except OSError:
                return
            for c in children:
                walk(f"{rel}/{c}")
        elif os.path.isfile(src) and st.st_mode & 0o004:
            items.append((rel, "f", 0o755 if st.st_mode & 0o001 else 0o644,
                          f"{st.st_size}:{st.st_mtime_ns}", st.st_size))

    for n in names:
        if n not in ("passwd", "group", "hosts"):
            walk(n)
    h = hashlib.sha256(f"{etc}|{_PASSWD}|{_GROUP}|{_HOSTS}".encode())
    for it in items:
        h.update(repr(it[:4]).encode())
    final = cache_root / f"etc-{h.hexdigest()[:16]}"
    if final.is_dir():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".etc-", dir=cache_root))
    try:
        for rel, kind, mode, payload, _ in items:
            dst = tmp / rel
            if kind == "l":
                os.symlink(payload, dst)
            elif kind == "d":
                dst.mkdir()
                os.chmod(dst, mode)
            else:
                try:
                    shutil.copyfile(etc / rel, dst)
                    os.chmod(dst, mode)
                except OSError:
                    pass
        for name, text in (("passwd", _PASSWD), ("group", _GROUP), ("hosts", _HOSTS)):
            (tmp / name).write_text(text)
            os.chmod(tmp / name, 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def agent_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The compiled agent binary (built on first use)."""
    return runtime_dir(cache_dir) / "agent"


def _compile_agent(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise SandboxInfraError(
            "cannot build the bwrap sandbox agent: no C compiler (gcc) found; install gcc "
            "(apt-get install gcc) or set RAYRL_SANDBOX_AGENT to a prebuilt agent binary")
    errors = []
    # static first (smaller resident set per sandbox, no loader work at start), then dynamic
    for extra in (["-static"], []):
        cmd = [cc, "-O2", "-s", *extra, "-o", str(out), str(AGENT_SOURCE)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return
        errors.append(f"{' '.join(cmd)}: {r.stderr.strip()[-2000:]}")
    raise SandboxInfraError("cannot build the bwrap sandbox agent:\n" + "\n".join(errors))


# -------------------------------------------------------------------------------------- cgroups


class _Cgroups:
    """Per-sandbox cgroup v1 directories (memory, pids, cpu) under a backend-wide parent created
    inside this process's own cgroup, so the parent's limits still bound the sandboxes.
    Detected at runtime; `detect()` returns None where nothing usable is offered."""

    CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, parents: dict[str, Path]):
        self.parents = parents

    @classmethod
    def detect(cls) -> "_Cgroups | None":
        if os.geteuid() != 0:
            return None
        try:
            own = {}
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, ctrls, path = line.split(":", 2)
                for c in ctrls.split(","):
                    own[c] = path
            mounts = {}
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                left, right = line.split(" - ", 1)
                fstype, _src, opts = right.split(" ", 2)
                if fstype != "cgroup":
                    continue
                mnt = left.split(" ")[4]
                for o in opts.split(","):
                    if o in cls.CONTROLLERS:
                        mounts[o] = mnt
        except (OSError, ValueError):
            return None
        parents = {}
        tag = f"rayrl-{os.getpid()}-{random.getrandbits(32):08x}"
        for c in cls.CONTROLLERS:
            if c in mounts and c in own:
                _sweep_stale(Path(mounts[c] + own[c].rstrip("/")))
        for c in cls.CONTROLLERS:
            if c not in mounts or c not in own:
                continue
            parent = Path(mounts[c] + own[c].rstrip("/")) / tag
            try:
                parent.mkdir()
                if c == "memory":
                    # a real limit must be writable here, and OOM kills countable
                    (parent / "memory.limit_in_bytes").write_text(str(1 << 62))
                    if "oom_kill" not in (parent / "memory.oom_control").read_text():
                        raise OSError("no oom_kill counter")
                elif c == "pids":
                    (parent / "pids.max").write_text("max")
                elif c == "cpu":
                    if not (parent / "cpu.cfs_quota_us").exists():
                        raise OSError("no cfs quota")
                parents[c] = parent
            except OSError:
                try:
                    parent.rmdir()
                except OSError:
                    pass
        if "memory" not in parents and "pids" not in parents:
            for p in parents.values():
                _rmdir_quiet(p)
            return None
        return cls(parents)

    def create(self, name: str, limits: Limits) -> dict[str, Path]:
        dirs = {}
        try:
            for c, parent in self.parents.items():
                d = parent / name
                d.mkdir()
                dirs[c] = d
                if c == "memory":
                    # the tmpfs mounts live in memory too: the cgroup holds the processes plus them
                    mb = limits.memory_mb + limits.work_mb + 2 * limits.tmp_mb + 16
                    (d / "memory.limit_in_bytes").write_text(str(mb * _MB))
                    try:
                        (d / "memory.memsw.limit_in_bytes").write_text(str(mb * _MB))
                    except OSError:
                        pass
                elif c == "pids":
                    (d / "pids.max").write_text(str(limits.processes + 2))
                elif c == "cpu" and limits.cpus and limits.cpus > 0:
                    period = int((d / "cpu.cfs_period_us").read_text())
                    (d / "cpu.cfs_quota_us").write_text(str(max(1000, int(limits.cpus * period))))
        except OSError:
            self.remove(dirs)
            raise
        return dirs

    @staticmethod
    def attach(dirs: dict[str, Path], pid: int) -> None:
        for d in dirs.values():
            (d / "cgroup.procs").write_text(str(pid))

    @staticmethod
    def oom_kills(dirs: dict[str, Path], default: int = 0) -> int:
        """The memory cgroup's OOM-kill counter (`default` if it cannot be read)."""
        d = dirs.get("memory")
        if d is None:
            return default
        for _ in range(3):
            try:
                for line in (d / "memory.oom_control").read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
            except (OSError, ValueError):
                pass
        return default

    @staticmethod
    def remove(dirs: dict[str, Path]) -> bool:
        ok = True
        for d in dirs.values():
            ok &= _rmdir_quiet(d)
        return ok

    def shutdown(self) -> None:
        for parent in self.parents.values():
            for child in list(parent.glob("*/")):
                _rmdir_quiet(child)
            _rmdir_quiet(parent)


def _sweep_stale(base: Path) -> None:
    """Remove (empty) cgroup parents left by backends of processes that are gone."""
    try:
        entries = list(base.glob("rayrl-*-*"))
    except OSError:
        return
    for parent in entries:
        try:
            pid = int(parent.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        for child in list(parent.glob("*/")):
            _rmdir_quiet(child)
        _rmdir_quiet(parent)


def _rmdir_quiet(p: Path) -> bool:
    try:
        p.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------- protocol


def _str(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def _frame(kind: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<I", len(payload) + 1) + kind + payload


def _files_payload(files) -> bytes:
    parts = [struct.pack("<I", len(files))]
    for path, data in files:
        parts.append(_str(os.fsencode(path)))
        parts.append(_str(bytes(data)))
    return b"".join(parts)


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


@dataclass
class _Reply:
    kind: bytes
    body: memoryview


def _agent_error(body: memoryview) -> OSError:
    err = struct.unpack_from("<i", body, 0)[0]
    (n,) = struct.unpack_from("<I", body, 4)
    msg = bytes(body[8:8 + n]).decode("utf-8", "replace")
    return OSError(err, msg)


# -------------------------------------------------------------------------------------- sandbox


class BwrapSandbox(Sandbox):
    """A live bubblewrap sandbox. One request at a time (an asyncio lock serializes them)."""

    def __init__(self, backend: "BwrapBackend", profile: Profile, proc: subprocess.Popen,
                 reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter | None,
                 host_uid: int | None, sock: socket.socket | None = None):
        self.profile = profile
        self._backend = backend
        self._proc = proc
        self._reader = reader
        self._writer = writer
        self._sock = sock
        self.host_uid = host_uid
        self.agent_pid: int | None = None          # host pid of the agent (pid 1 inside)
        self._agent_pidfd: int | None = None
        self._cgroups: dict[str, Path] = {}
        self._oom_seen = 0
        self._lock = asyncio.Lock()
        self._closed = False
        self._broken: str | None = None            # why the sandbox is unusable, once it is
        self.created_at = time.monotonic()
        self.exec_count = 0

    # -- properties ------------------------------------------------------------------------
    @property
    def bwrap_pid(self) -> int:
        return self._proc.pid

    @property
    def cgroups(self) -> dict[str, Path]:
        return dict(self._cgroups)

    @property
    def closed(self) -> bool:
        return self._closed

    def pids(self) -> list[int]:
        """Host pids of bwrap, the agent and everything running in the sandbox (for tests)."""
        out = [self._proc.pid]
        if self.agent_pid:
            todo = [self.agent_pid]
            while todo:
                p = todo.pop()
                out.append(p)
                try:
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
                except (OSError, ValueError):
                    pass
        return out

    def memory(self) -> dict[str, int]:
        """Resident memory of bwrap + the agent + whatever runs inside, in bytes: `rss`, `pss`
        (shared pages split among their users) and `uss` (private pages). Kernel memory
        (namespaces, page tables, tmpfs contents) is not included."""
        tot = {"rss": 0, "pss": 0, "uss": 0}
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        k, _, rest = line.partition(":")
                        v = rest.split()
                        if not v or not v[0].isdigit():
                            continue
                        kb = int(v[0]) * 1024
                        if k == "Rss":
                            tot["rss"] += kb
                        elif k == "Pss":
                            tot["pss"] += kb
                        elif k in ("Private_Clean", "Private_Dirty"):
                            tot["uss"] += kb
            except OSError:
                pass
        return tot

    # -- the protocol ------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise SandboxInfraError("bwrap sandbox is closed")
        if self._broken:
            raise SandboxInfraError(f"bwrap sandbox is unusable: {self._broken}")

    async def _request(self, frame: bytes, timeout: float | None) -> _Reply:
        """Send one frame and wait for its reply; any failure kills the sandbox (the stream can
        no longer be trusted) and raises SandboxInfraError."""
        try:
            self._writer.write(frame)
            await self._writer.drain()
            hdr = await asyncio.wait_for(self._reader.readexactly(4), timeout)
            (n,) = struct.unpack("<I", hdr)
            if not 1 <= n <= MAX_FRAME:
                raise _Protocol(f"bad frame length {n}")
            body = await asyncio.wait_for(self._reader.readexactly(n), timeout)
            return _Reply(body[:1], memoryview(body)[1:])
        except BaseException as e:
            why = await self._why_dead(e)
            self._broken = why
            self._kill_now()
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            raise SandboxInfraError(why) from (e if not isinstance(e, _Protocol) else None)

    async def _why_dead(self, e: BaseException) -> str:
        if self._closed:
            return "bwrap sandbox was closed during the request"
        if isinstance(e, asyncio.CancelledError):
            return "a request was cancelled mid-way (the sandbox was killed)"
        if isinstance(e, asyncio.TimeoutError):
            return "the sandbox agent did not answer in time (killed)"
        if isinstance(e, _Protocol):
            return f"protocol error from the sandbox agent: {e}"
        if isinstance(e, (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError, OSError)):
            # the agent (or bwrap) died: give bwrap a moment to exit so its status can be named
            for _ in range(20):
                if self._proc.poll() is not None:
                    break
                await asyncio.sleep(0.005)
            rc = self._proc.poll()
            state = "still running" if rc is None else (
                f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
            agent = "gone"
            if self.agent_pid and _pid_alive(self.agent_pid):
                agent = "alive"
            return f"the sandbox agent died (connection lost: {e!r}; bwrap {state}; agent {agent})"
        return f"sandbox request failed: {e!r}"

    # -- Sandbox API ---------------------------------------------------------------------------
    async def exec(self, cmd: str | list[str], stdin: bytes = b"", timeout: float = 10.0,
                   env: dict[str, str] | None = None) -> ExecResult:
        if isinstance(cmd, str):
            argv, flags = [cmd], 0
        else:
            argv, flags = [str(a) for a in cmd], 1
            if not argv:
                raise ValueError("exec: empty argv")
        lim = self.profile.limits
        full_env = dict(BASE_ENV)
        full_env.update(self.profile.env)
        if env:
            full_env.update(env)
        strings = argv + [f"{k}={v}" for k, v in full_env.items()]
        if any("\0" in a for a in strings) or any("=" in k or not k for k in full_env):
            raise ValueError("exec: NUL in the command or environment, or a bad variable name")
        timeout_ms = max(1, min(int(timeout * 1000), 0xFFFFFFFF))
        nproc = self._backend._nproc_limit(lim)
        parts = [
            struct.pack("<II", timeout_ms, flags),
            struct.pack("<6Q", max(0, int(lim.cpu_seconds)), max(0, lim.memory_mb) * _MB, nproc,
                        max(0, lim.file_size_mb) * _MB, max(0, lim.open_files),
                        max(0, lim.output_bytes)),
            struct.pack("<I", len(argv)), *(_str(_encode(a)) for a in argv),
            struct.pack("<I", len(full_env)),
            *(_str(_encode(f"{k}={v}")) for k, v in full_env.items()),
            _str(_encode(WORKDIR)), _str(bytes(stdin or b"")),
        ]
        frame = _frame(b"E", b"".join(parts))
        async with self._lock:
            self._check()
            # the agent enforces `timeout`; the host only guards against a wedged agent
            reply = await self._request(frame, timeout + self._backend.grace_s)
            self.exec_count += 1
            if reply.kind == b"F":
                e = _agent_error(reply.body)
                self._broken = f"the agent could not run the command: {e.strerror}"
                self._kill_now()
                raise SandboxInfraError(self._broken)
            if reply.kind != b"Z":
                self._broken = f"unexpected reply {reply.kind!r} to exec"
                self._kill_now()
                raise SandboxInfraError(self._broken)
            oom_before = self._oom_seen
            if self._cgroups:
                self._oom_seen = _Cgroups.oom_kills(self._cgroups, oom_before)
            return self._result(reply.body, self._oom_seen > oom_before)

    def _result(self, body: memoryview, oom_killed: bool) -> ExecResult:
        fl, code, sig, dur_ns, cpu_ns, maxrss_kb = struct.unpack_from("<BiiQQQ", body, 0)
        off = struct.calcsize("<BiiQQQ")
        (n_out,) = struct.unpack_from("<I", body, off)
        out = bytes(body[off + 4: off + 4 + n_out])
        off += 4 + n_out
        (n_err,) = struct.unpack_from("<I", body, off)
        err = bytes(body[off + 4: off + 4 + n_err])
        exited, signaled, timed_out = bool(fl & 1), bool(fl & 2), bool(fl & 4)
        lim = self.profile.limits
        exit_code = code if exited else None
        signum = sig if signaled else None
        cpu_hit = lim.cpu_seconds > 0 and cpu_ns >= lim.cpu_seconds * 1e9 * 0.9
        if timed_out:
            outcome = Outcome.TIMEOUT
        elif oom_killed:
            outcome = Outcome.OOM
        elif exited and cpu_hit and code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            outcome = Outcome.TIMEOUT          # a shell passing on its child's CPU-limit death
        elif signaled:
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_hit):
                outcome = Outcome.TIMEOUT
            elif (sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
                  and lim.memory_mb > 0 and maxrss_kb * 1024 >= 0.9 * lim.memory_mb * _MB):
                # rlimit-only: it died at the edge of its address space (failed allocation)
                outcome = Outcome.OOM
            else:
                outcome = Outcome.SIGNAL
        else:
            outcome = Outcome.NORMAL
        return ExecResult(exit_code=exit_code, stdout=out, stderr=err,
                          stdout_truncated=bool(fl & 8), stderr_truncated=bool(fl & 16),
                          duration_s=dur_ns / 1e9, outcome=outcome, signal=signum)

    async def write_file(self, path: str, data: bytes) -> None:
        # the agent holds the whole file in memory while writing it: refuse what cannot fit
        # anyway rather than let the sandbox's memory limit kill the agent
        cap = max(self.profile.limits.work_mb, self.profile.limits.tmp_mb) * _MB
        if len(data) > cap:
            raise OSError(_errno.EFBIG, f"write {path}: {len(data)} bytes exceed the sandbox's "
                                        f"largest file system ({cap} bytes)")
        if "\0" in path:
            raise ValueError("NUL in path")
        await self._files(b"W", [(path, data)])

    async def _files(self, kind: bytes, files) -> None:
        frame = _frame(kind, _files_payload(files))
        async with self._lock:
            self._check()
            reply = await self._request(frame, self._backend.file_timeout_s)
        if reply.kind == b"O":
            return
        if reply.kind == b"F":
            e = _agent_error(reply.body)
            if kind == b"X":
                self._broken = f"reset failed: {e.strerror}"
                self._kill_now()
                raise SandboxInfraError(self._broken)
            raise e
        self._broken = f"unexpected reply {reply.kind!r}"
        self._kill_now()
        raise SandboxInfraError(self._broken)

    async def read_file(self, path: str) -> bytes:
        if "\0" in path:
            raise ValueError("NUL in path")
        lim = self.profile.limits
        cap = max(lim.work_mb, lim.tmp_mb, lim.file_size_mb) * _MB
        frame = _frame(b"R", _str(os.fsencode(path)) + struct.pack("<Q", cap))
        async with self._lock:
            self._check()
            reply = await self._request(frame, self._backend.file_timeout_s)
        if reply.kind == b"D":
            return bytes(reply.body)
        if reply.kind == b"F":
            raise _agent_error(reply.body)
        self._broken = f"unexpected reply {reply.kind!r}"
        self._kill_now()
        raise SandboxInfraError(self._broken)

    async def reset(self) -> None:
        """Kill every process, empty /work, /tmp and /dev/shm, rewrite `profile.files`."""
        await self._files(b"X", self.profile.files)
        if self._cgroups:
            self._oom_seen = _Cgroups.oom_kills(self._cgroups, self._oom_seen)

    async def alive(self) -> bool:
        if self._closed or self._broken or self._proc.poll() is not None:
            return False
        if self._lock.locked():          # a command is running: the agent is busy, not dead
            return self.agent_pid is None or _pid_alive(self.agent_pid)
        try:
            async with self._lock:
                if self._closed or self._broken:
                    return False
                reply = await self._request(_frame(b"P"), self._backend.ping_timeout_s)
            return reply.kind == b"P"
        except SandboxInfraError:
            return False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kill_now()
        try:
            # the agent is pid 1 of its namespace: killing it kills everything inside; bwrap then
            # reaps it and exits. Wait for both, so nothing of the sandbox is left when we return.
            deadline = time.monotonic() + 5.0
            while self._proc.poll() is None and time.monotonic() < deadline:
                await _wait_pid_exit(self._proc.pid, 0.05)
            if self.agent_pid:
                while _pid_alive(self.agent_pid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
            if self._cgroups:
                for _ in range(100):
                    if _Cgroups.remove(self._cgroups):
                        self._cgroups = {}
                        break
                    await asyncio.sleep(0.005)
        finally:                         # even when cancelled: nothing may be left running
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            if self._cgroups:
                self._backend._leftover_cgroups.append(self._cgroups)
                self._cgroups = {}
            self._release()

    # -- teardown helpers ------------------------------------------------------------------------
    def _kill_now(self) -> None:
        """SIGKILL the agent: it is pid 1 of the sandbox, so the kernel kills everything inside
        and bwrap, having lost its child, exits (close() reaps it). Synchronous, idempotent."""
        killed = False
        if self._agent_pidfd is not None:
            try:
                signal.pidfd_send_signal(self._agent_pidfd, signal.SIGKILL)
                killed = True
            except OSError:
                pass
        elif self.agent_pid and _pid_alive(self.agent_pid):
            try:
                os.kill(self.agent_pid, signal.SIGKILL)
                killed = True
            except OSError:
                pass
        if not killed and self._proc.poll() is None:
            self._kill_unstarted()
        try:
            if self._writer is not None:
                self._writer.close()
            elif self._sock is not None:
                self._sock.close()
        except Exception:
            pass

    def _kill_unstarted(self) -> None:
        """Kill a sandbox whose agent is not known yet (start failed or was cancelled). bwrap's
        child, before it execs the agent, waits for bwrap and is not yet bound to die with it:
        freeze bwrap (no new child can appear), kill its child (pid 1 of the new namespace, so
        the namespace goes with it), then bwrap."""
        pid = self._proc.pid
        kids = []
        try:
            os.kill(pid, signal.SIGSTOP)
            # the stop takes effect when bwrap next leaves the kernel: until then it may still
            # clone its child, so read the children only once it is stopped
            for _ in range(2000):
                if _proc_state(pid) in (b"T", b"t", b"Z", b"X", b""):
                    break
                time.sleep(0.00005)
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                pass
            for k in kids:                   # bwrap is stopped: it cannot reap, pids are stable
                try:
                    os.kill(int(k), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        except OSError:
            pass
        if kids:
            try:                             # let bwrap reap its child and exit (close waits)
                os.kill(pid, signal.SIGCONT)
                return
            except OSError:
                pass
        try:
            self._proc.kill()
        except OSError:
            pass

    def _release(self) -> None:
        if self._agent_pidfd is not None:
            os.close(self._agent_pidfd)
            self._agent_pidfd = None
        self._backend._forget(self)

    def __del__(self):  # best effort for a sandbox dropped without close()
        if not getattr(self, "_closed", True):
            try:
                self._kill_now()
                if self._proc.poll() is None:
                    self._proc.kill()
                if self._agent_pidfd is not None:
                    os.close(self._agent_pidfd)
                    self._agent_pidfd = None
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._broken else "live")
        return f"<BwrapSandbox {self.profile.name} bwrap={self._proc.pid} agent={self.agent_pid} {state}>"


class _Protocol(Exception):
    pass


def _proc_state(pid: int) -> bytes:
    """The state letter of `pid` (b"R", b"S", b"T", b"Z" ...), b"" when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return b""
    i = stat.rfind(b")") + 2
    return stat[i:i + 1]


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    return _proc_state(pid) not in (b"", b"Z", b"X")


async def _wait_pid_exit(pid: int, timeout: float) -> None:
    """Wait (without a thread) until `pid` exits or `timeout` passes."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        await asyncio.sleep(min(timeout, 0.005))
        return
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        os.close(fd)


# -------------------------------------------------------------------------------------- backend


class BwrapBackend(Backend):
    """Creates bubblewrap sandboxes. No daemon: each sandbox is a `bwrap` child of this process.

    Options: `bwrap` (path), `cgroups` (None = use where offered, False = rlimits only, True =
    require), `unique_uids` (None = when root), `extra_ro_binds` (host paths bound read-only at
    the same place, e.g. a virtualenv), timeouts. `profile.image`, when set, names a root
    filesystem directory whose /usr, /bin, /lib* and /etc are used instead of the host's.
    """

    def __init__(self, *, bwrap: str | None = None, cgroups: bool | None = None,
                 unique_uids: bool | None = None, extra_ro_binds: tuple[str, ...] = (),
                 cache_dir: str | None = None, start_timeout_s: float = 20.0,
                 grace_s: float = 10.0, file_timeout_s: float = 60.0,
                 ping_timeout_s: float = 5.0):
        self.bwrap = bwrap or shutil.which("bwrap") or ""
        if not self.bwrap or not os.access(self.bwrap, os.X_OK):
            raise SandboxInfraError(
                "bubblewrap (bwrap) not found: install it (apt-get install bubblewrap)")
        self.runtime = runtime_dir(cache_dir)
        self.is_root = os.geteuid() == 0
        self.unique_uids = self.is_root if unique_uids is None else bool(unique_uids)
        if self.unique_uids and not self.is_root:
            raise SandboxInfraError("unique_uids=True needs root (to start bwrap as another uid)")
        if self.unique_uids:
            _check_world_readable(self.runtime / "agent")
            _kill_orphans()
        self.cgroup = None if cgroups is False else _Cgroups.detect()
        if cgroups is True and self.cgroup is None:
            raise SandboxInfraError("cgroups=True but no usable cgroup v1 memory/pids controller")
        self.extra_ro_binds = tuple(extra_ro_binds)
        self.start_timeout_s = start_timeout_s
        self.grace_s = grace_s
        self.file_timeout_s = file_timeout_s
        self.ping_timeout_s = ping_timeout_s
        self._uids: set[int] = set()
        self._live: "weakref.WeakSet[BwrapSandbox]" = weakref.WeakSet()
        self._leftover_cgroups: list[dict[str, Path]] = []
        self._args_cache: dict[str, list[str]] = {}
        self._nproc_cache = (0.0, 0)
        self._seq = 0
        _raise_nofile()

    # -- what this backend offers (for pools, tests and reports) --------------------------------
    @property
    def cgroup_controllers(self) -> tuple[str, ...]:
        return tuple(self.cgroup.parents) if self.cgroup else ()

    @property
    def live_sandboxes(self) -> int:
        return len(self._live)

    # -- bwrap command line ----------------------------------------------------------------------
    def _system_args(self, image: str) -> list[str]:
        key = image or "/"
        if key in self._args_cache:
            return self._args_cache[key]
        root = Path(image) if image else Path("/")
        if not (root / "usr").is_dir():
            raise SandboxInfraError(f"profile.image {image!r} is not a root filesystem (no usr/)")
        args = ["--ro-bind", str(root / "usr"), "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            p = root / name
            if p.is_symlink():
                args += ["--symlink", os.readlink(p), f"/{name}"]
            elif p.is_dir():
                args += ["--ro-bind", str(p), f"/{name}"]
        args += ["--ro-bind", str(etc_snapshot(root / "etc", self.runtime.parent)), "/etc",
                 "--ro-bind", str(self.runtime), "/.rayrl"]
        for p in self.extra_ro_binds:
            args += ["--ro-bind", p, p]
        self._args_cache[key] = args
        return args

    def _argv(self, profile: Profile, uid: int | None) -> list[str]:
        lim = profile.limits
        return [
            self.bwrap,
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--as-pid-1",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            *self._system_args(profile.image),
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--size", str(max(1, lim.tmp_mb) * _MB), "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev",
            "--perms", "0755", "--size", str(max(1, lim.work_mb) * _MB), "--tmpfs", WORKDIR,
            "--perms", "1777", "--size", str(max(1, lim.tmp_mb) * _MB), "--tmpfs", "/tmp",
            "--remount-ro", "/",
            "--chdir", WORKDIR,
            "/.rayrl/agent",
        ]

    # -- uids and process limits ---------------------------------------------------------------
    def _alloc_uid(self) -> int:
        while True:
            uid = UID_BASE + random.randrange(UID_SPAN)
            if uid not in self._uids:
                self._uids.add(uid)
                return uid

    def _nproc_limit(self, lim: Limits) -> int:
        if lim.processes <= 0:
            return 0
        if self.unique_uids:
            return lim.processes + 1            # + the agent
        # shared uid: RLIMIT_NPROC counts all of this user's processes; allow `processes` more
        now = time.monotonic()
        t, n = self._nproc_cache
        if now - t > 1.0:
            n = _count_user_processes(os.getuid())
            self._nproc_cache = (now, n)
        return n + lim.processes

    # -- lifecycle -----------------------------------------------------------------------------
    async def create(self, profile: Profile) -> BwrapSandbox:
        if profile.backend not in ("bwrap", ""):
            raise ValueError(f"BwrapBackend cannot create a {profile.backend!r} sandbox")
        uid = self._alloc_uid() if self.unique_uids else None
        argv = self._argv(profile, uid)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            kw = {}
            if uid is not None:
                kw = dict(user=uid, group=uid, extra_groups=[])
            try:
                proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd="/",
                                        env={"PATH": BASE_ENV["PATH"]}, close_fds=True, **kw)
            except OSError as e:
                raise SandboxInfraError(f"cannot start bwrap: {e}") from e
        except BaseException:
            parent.close()
            child.close()
            if uid is not None:
                self._uids.discard(uid)
            raise
        child.close()
        # the sandbox object owns bwrap from here on: whatever happens next (a cancellation
        # included), close() kills what was started
        sb = BwrapSandbox(self, profile, proc, None, None, uid, sock=parent)
        self._live.add(sb)
        try:
            parent.setblocking(False)
            sb._reader, sb._writer = await asyncio.open_unix_connection(sock=parent, limit=1 << 20)
            await self._start(sb)
        except BaseException:
            await sb.close()
            raise
        return sb

    async def _start(self, sb: BwrapSandbox) -> None:
        reader = sb._reader
        try:
            magic = await asyncio.wait_for(reader.readexactly(len(MAGIC)), self.start_timeout_s)
        except asyncio.IncompleteReadError as e:
            magic = e.partial
        except asyncio.TimeoutError:
            raise SandboxInfraError(
                f"bwrap sandbox did not start within {self.start_timeout_s:.0f} s") from None
        if magic != MAGIC:
            # not the agent talking: bwrap (or the loader) printed an error and exited
            rest = b""
            try:
                rest = await asyncio.wait_for(reader.read(65536), 2.0)
            except (asyncio.TimeoutError, OSError):
                pass
            try:
                rc = sb._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                rc = None
            msg = (magic + rest).decode("utf-8", "replace").strip() or "(no message)"
            raise SandboxInfraError(f"bwrap failed to start (exit status {rc}): {msg}")
        # the agent is bwrap's only child (pid 1 inside)
        pid = None
        for _ in range(200):
            try:
                kids = Path(f"/proc/{sb._proc.pid}/task/{sb._proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                pid = int(kids[0])
                break
            await asyncio.sleep(0.001)
        if pid is None:
            raise SandboxInfraError("bwrap started but its agent process cannot be found")
        sb.agent_pid = pid
        try:
            sb._agent_pidfd = os.pidfd_open(pid)
        except OSError:
            sb._agent_pidfd = None
        if self.is_root:
            # commands start at +1000 (the agent raises theirs); the agent itself at -500, so a
            # memory cgroup that runs out kills commands first, not the sandbox's pid 1
            try:
                with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                    f.write("-500")
            except OSError:
                pass
        if self.cgroup is not None:
            self._seq += 1
            name = f"sb-{os.getpid()}-{self._seq}"
            try:
                sb._cgroups = self.cgroup.create(name, sb.profile.limits)
                _Cgroups.attach(sb._cgroups, pid)
                sb._oom_seen = _Cgroups.oom_kills(sb._cgroups)
            except OSError as e:
                if sb._cgroups:
                    _Cgroups.remove(sb._cgroups)
                sb._cgroups = {}
                raise SandboxInfraError(f"cannot set up the sandbox cgroup: {e}") from e
        if sb.profile.files:
            await sb._files(b"W", sb.profile.files)

    async def run_raw(self, cmd: list[str], profile: Profile | None = None,
                      timeout: float = 30.0) -> int:
        """Start a fresh bwrap with the same isolation as a sandbox and run `cmd` directly (no
        agent, no cgroup, no reuse); returns its exit status. The baseline a warm pool is measured
        against ("raw start plus exec")."""
        profile = profile or Profile()
        uid = self._alloc_uid() if self.unique_uids else None
        argv = self._argv(profile, uid)[:-1] + list(cmd)
        kw = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd="/",
                                    env={"PATH": BASE_ENV["PATH"]}, **kw)
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise SandboxInfraError(f"raw bwrap run did not finish in {timeout} s")
                await _wait_pid_exit(proc.pid, deadline - time.monotonic())
            return proc.returncode
        finally:
            if uid is not None:
                self._uids.discard(uid)

    def _forget(self, sb: BwrapSandbox) -> None:
        self._live.discard(sb)
        if sb.host_uid is not None:
            self._uids.discard(sb.host_uid)

    async def shutdown(self) -> None:
        """Close any sandbox still open (owners should have), then remove the cgroup parents."""
        for sb in list(self._live):
            await sb.close()
        for dirs in self._leftover_cgroups:
            _Cgroups.remove(dirs)
        self._leftover_cgroups.clear()
        if self.cgroup is not None:
            self.cgroup.shutdown()


def _check_world_readable(path: Path) -> None:
    p = path.resolve()
    for d in [*reversed(p.parents)]:
        if not os.stat(d).st_mode & 0o001:
            raise SandboxInfraError(
                f"the sandbox agent at {path} is not reachable by other uids ({d} is not "
                "world-searchable): set RAYRL_SANDBOX_CACHE to a world-readable directory")
    if not os.stat(p).st_mode & 0o005 == 0o005:
        raise SandboxInfraError(f"the sandbox agent at {path} is not world-executable")


def _kill_orphans() -> int:
    """SIGKILL processes of per-sandbox uids that lost their backend (parent pid 1). A live
    sandbox's bwrap is a child of its backend's process and everything else in it descends from
    that bwrap, so only the remains of a backend killed mid-start (a bwrap child that had not yet
    tied itself to its parent's death) match."""
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{d}").st_uid
            if not UID_BASE <= uid < UID_BASE + UID_SPAN:
                continue
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read()
            fields = st[st.rfind(b")") + 2:].split()
            if fields[0] not in (b"Z", b"X") and int(fields[1]) == 1:
                os.kill(int(d), signal.SIGKILL)
                n += 1
        except (OSError, ValueError, IndexError):
            pass
    return n


def _count_user_processes(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _raise_nofile() -> None:
    """Each live sandbox holds two fds here (socket, pidfd): lift the soft limit to the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError, ImportError):
        pass
