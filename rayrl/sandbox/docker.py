"""Docker backend: one sleeping container per sandbox, commands through the exec API (aiodocker).

The container (`sleep infinity` under the engine's `--init`) has no network (`NetworkMode none`), a
read-only root file system, memory (swap included), pids and CPU limits, ulimits (open files, file
size, CPU seconds), and two size-capped tmpfs mounts: the work directory `/work` and `/tmp`. The
tmpfs mounts are anonymous `local` volumes of type tmpfs rather than `HostConfig.Tmpfs`, because the
engine's archive API (used by `write_file` / `read_file`) cannot reach plain tmpfs mounts of a
container with a read-only root, but does reach volumes.

Every command runs through a small Python wrapper started as root by one exec:
  * it forks; the child drops to the unprivileged `sandbox` user (uid 1000), raises its own OOM
    score so a memory bomb is the OOM killer's victim rather than the wrapper, and execs the command;
  * the parent waits for the child with the wall-clock deadline (a pidfd), then, as uid 1000 with no
    exec in between, sends `kill(-1, SIGKILL)`: the kernel kills every process of that user in the
    container's pid namespace in one pass under the task-list lock, so fork bombs and daemonized
    processes that try to outlive their command die with it, while init and the root `sleep` are
    out of reach (also of a command's own `kill -9 -1`);
  * it reads the container's OOM-kill counter (cgroup v1 `memory.oom_control`, v2
    `memory.events`) before and after, and reports exit status, signal, CPU time, timeout and OOM as
    one line at the very end of stderr, tagged with a per-exec nonce that only the wrapper sees
    (its environment is unreadable to uid 1000). The line is cut off before stderr is returned.
So a command costs one exec (~60 ms round trip here), and the outcome is exact: a signal is told
apart from an exit code, an OOM kill from a timeout. The image needs `python3` (the project's base
image from `rayrl.sandbox.image` has it); without it every exec raises `SandboxInfraError` saying so.

Anything wrong with the engine or the container (daemon unreachable, container gone, API error)
raises `SandboxInfraError` naming the cause; what the command did is always an `ExecResult`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import posixpath
import secrets
import signal
import tarfile
import time
from typing import Any

import aiohttp

from rayrl.sandbox.base import (WORKDIR, Backend, ExecResult, Limits, Outcome, Profile, Sandbox,
                                SandboxInfraError)

log = logging.getLogger(__name__)

SANDBOX_UID = 1000            # the user commands run as (the image has a `sandbox` entry for it)
TMPDIR = "/tmp"
LABEL = "rayrl.sandbox"       # every container this backend creates carries it
API_TIMEOUT_S = 60.0          # any single engine call slower than this is an infrastructure failure
EXEC_GRACE_S = 5.0            # the client waits this long past a command's timeout for the wrapper
PIDS_RESERVE = 3              # init, sleep and the wrapper, on top of limits.processes

# Runs as root inside the container: `python3 -I -S -c WRAPPER`; parameters come in RAYRL_* env.
WRAPPER = r"""
import os, sys, json, time, select, signal
E = os.environ
nonce = E.pop("RAYRL_NONCE", "")
uid = int(E.pop("RAYRL_UID", "1000"))
tmo = float(E.pop("RAYRL_TIMEOUT", "10"))
argv = json.loads(E.pop("RAYRL_ARGV", "[]"))
cwd = E.pop("RAYRL_CWD", "/work")
def oom():
    for p in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(p) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == "oom_kill":
                        return int(v)
        except (OSError, ValueError):
            pass
    return -1
def report(**kw):
    try:
        os.write(2, nonce.encode() + json.dumps(kw).encode() + b"\n")
    except OSError:
        pass
dropped = []
def killall():
    if not dropped:
        try:
            os.setgroups([]); os.setgid(uid); os.setuid(uid)
        except OSError:
            return
        dropped.append(1)
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
o0 = oom()
t0 = time.monotonic()
try:
    pid = os.fork()
except OSError as e:
    report(error="fork: %s" % e, oom0=o0, oom1=oom())
    sys.exit(125)
if pid == 0:
    code = 127
    try:
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
        os.chdir(cwd)
        os.execvpe(argv[0], argv, E)
    except PermissionError as e:
        code = 126
        os.write(2, ("%s: %s\n" % (argv[0] if argv else "", e.strerror)).encode())
    except BaseException as e:
        os.write(2, ("%s: %s\n" % (argv[0] if argv else "", getattr(e, "strerror", None) or e)).encode())
    os._exit(code)
try:
    os.close(0)
except OSError:
    pass
timed_out = False
deadline = t0 + tmo
try:
    fd = os.pidfd_open(pid)
except (AttributeError, OSError):
    fd = None
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        timed_out = True
        break
    if fd is not None:
        try:
            if select.select([fd], [], [], left)[0]:
                break
        except InterruptedError:
            pass
    else:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            break
        time.sleep(min(left, 0.005))
if timed_out:
    killall()
_, status, ru = os.wait4(pid, 0)
dur = time.monotonic() - t0
killall()
sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
report(exit=code, signal=sig, timeout=timed_out, oom0=o0, oom1=oom(),
       cpu=ru.ru_utime + ru.ru_stime, dur=dur)
sys.exit(code if code is not None else 128 + sig)
"""

# Root-side maintenance in one exec: kill every uid-1000 process, clear the writable directories.
ADMIN = r"""
import os, sys, json, signal, shutil
uid = int(sys.argv[1]); ops = sys.argv[2].split(","); dirs = sys.argv[3:]
out = {}
if "kill" in ops:
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setgid(uid); os.setuid(uid); os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
if "killroot" in ops:
    # wrappers (or other root execs) still running: exec'd processes have no parent inside the
    # namespace (PPid 0); init (pid 1) and its child, the sleep, are kept
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in (1, me):
            continue
        try:
            st = dict(l.split(":", 1) for l in open("/proc/%s/status" % d).read().splitlines() if ":" in l)
            if st["Uid"].split()[0] == "0" and st["PPid"].strip() == "0":
                os.kill(int(d), signal.SIGKILL)
        except (OSError, KeyError, ValueError, IndexError):
            pass
if "clear" in ops:
    left = []
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError as e:
            left.append("%s: %s" % (d, e)); continue
        for n in names:
            p = os.path.join(d, n)
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
            except OSError as e:
                left.append("%s: %s" % (p, e))
    out["left"] = left
for p in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
    try:
        for line in open(p):
            if line.startswith("oom_kill "):
                out["oom"] = int(line.split()[1])
        break
    except (OSError, ValueError):
        pass
print(json.dumps(out))
"""


def _infra(what: str, exc: BaseException | None = None) -> SandboxInfraError:
    if exc is None:
        return SandboxInfraError(f"docker: {what}")
    detail = str(exc) or type(exc).__name__
    return SandboxInfraError(f"docker: {what}: {type(exc).__name__}: {detail}")


def _default_url() -> str | None:
    return os.environ.get("RAYRL_DOCKER_HOST") or os.environ.get("DOCKER_HOST") or None


class _Capped:
    """One output stream: keeps the first `cap` bytes, counts the rest, remembers a short tail."""

    TAIL = 4096

    def __init__(self, cap: int):
        self.cap = cap
        self.buf = bytearray()
        self.total = 0
        self.tail = bytearray()

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += data[:room]
        self.tail += data
        if len(self.tail) > 2 * self.TAIL:
            del self.tail[:-self.TAIL]


class DockerSandbox(Sandbox):
    """A running container created by `DockerBackend.create`."""

    def __init__(self, backend: "DockerBackend", profile: Profile, container_id: str, start_s: float):
        self.backend = backend
        self.profile = profile
        self.id = container_id
        self.start_s = start_s          # create + start latency
        self.closed = False
        self._lock_of: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def __repr__(self) -> str:
        return f"DockerSandbox({self.id[:12]}, profile={self.profile.name!r})"

    # ------------------------------------------------------------------ helpers

    def _lock(self) -> asyncio.Lock:
        """One command at a time (a command's end kills every user process in the container);
        one lock per event loop, so a sandbox survives being used from several loops."""
        loop = asyncio.get_running_loop()
        if self._lock_of is None or self._lock_of[0] is not loop:
            self._lock_of = (loop, asyncio.Lock())
        return self._lock_of[1]

    def _check_open(self) -> None:
        if self.closed:
            raise SandboxInfraError(f"docker: sandbox {self.id[:12]} is closed")

    async def _api(self, what: str, coro):
        return await self.backend._api(what, coro, container=self.id)

    def _container(self):
        return self.backend._client().containers.container(self.id)

    async def _admin(self, ops: str) -> dict:
        """Root maintenance exec (see ADMIN); returns its JSON report."""
        c = self._container()
        cmd = ["python3", "-I", "-S", "-c", ADMIN, str(SANDBOX_UID), ops, WORKDIR, TMPDIR, "/dev/shm"]
        ex = await self._api("exec create (admin)", c.exec(cmd, user="0", workdir="/"))
        out = bytearray()
        err = bytearray()

        async def run():
            async with ex.start(detach=False) as stream:
                while (msg := await stream.read_out()) is not None:
                    (out if msg.stream == 1 else err).extend(msg.data)

        await self._api("exec (admin)", run())
        info = await self._api("exec inspect (admin)", ex.inspect())
        if info.get("ExitCode") != 0:
            raise _infra(f"maintenance exec in {self.id[:12]} failed (exit {info.get('ExitCode')}): "
                         f"{bytes(err[-500:]).decode(errors='replace')}")
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise _infra(f"maintenance exec in {self.id[:12]} said {bytes(out[-200:])!r}", e)

    async def _restart(self) -> None:
        """Last resort when no exec can start (the pids limit is held by processes that escaped the
        wrapper): kill the container (its pid namespace dies with init) and start it again. The
        tmpfs mounts come back empty, so the profile's files are written again."""
        log.warning("docker sandbox %s: restarting the container to recover", self.id[:12])
        c = self._container()
        try:
            await self._api("kill", c.kill(signal="SIGKILL"))
        except SandboxInfraError:
            pass
        await self._api("wait", c.wait())
        await self._api("start", c.start())
        await self._put_files(self.profile.files)

    async def _put_files(self, files) -> None:
        """Write (path, bytes) pairs with one archive upload per top directory."""
        groups: dict[str, list[tuple[str, bytes]]] = {}
        for path, data in files:
            top, rel = self._split(path)
            groups.setdefault(top, []).append((rel, bytes(data)))
        c = self._container()
        for top, items in groups.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                dirs: set[str] = set()
                now = time.time()
                for rel, data in items:
                    parent = posixpath.dirname(rel)
                    chain = []
                    while parent and parent not in dirs:
                        chain.append(parent)
                        dirs.add(parent)
                        parent = posixpath.dirname(parent)
                    for d in reversed(chain):
                        ti = tarfile.TarInfo(d)
                        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.DIRTYPE, 0o755, SANDBOX_UID, SANDBOX_UID, now
                        tf.addfile(ti)
                    ti = tarfile.TarInfo(rel)
                    ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), 0o644, SANDBOX_UID, SANDBOX_UID, now
                    tf.addfile(ti, io.BytesIO(data))
            await self._api(f"put_archive {top}", c.put_archive(top, buf.getvalue()))

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        """(mount point, relative path) of a writable path: under /work or /tmp."""
        full = posixpath.normpath(path if path.startswith("/") else posixpath.join(WORKDIR, path))
        for top in (WORKDIR, TMPDIR):
            if full.startswith(top + "/"):
                return top, full[len(top) + 1:]
        raise ValueError(f"{path!r}: only files under {WORKDIR} and {TMPDIR} can be written")

    # ------------------------------------------------------------------ interface

    async def exec(self, cmd: str | list[str], stdin: bytes = b"", timeout: float = 10.0,
                   env: dict[str, str] | None = None) -> ExecResult:
        self._check_open()
        async with self._lock():
            return await self._exec(cmd, stdin, timeout, env)

    async def _exec(self, cmd, stdin: bytes, timeout: float, env) -> ExecResult:
        limits = self.profile.limits
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise ValueError("empty command")
        timeout = max(float(timeout), 0.001)
        nonce = "rayrl-status-" + secrets.token_hex(16) + ":"
        child_env = {"HOME": WORKDIR, "USER": "sandbox", "LOGNAME": "sandbox"}
        child_env.update(dict(self.profile.env))
        child_env.update(env or {})
        for text in (*argv, *child_env, *child_env.values()):
            if "\x00" in text:
                raise ValueError(f"NUL byte in the command or its environment: {text!r}")
            # (the engine refuses them with an error that would look like an infrastructure one)
        child_env.update(RAYRL_NONCE=nonce, RAYRL_UID=str(SANDBOX_UID), RAYRL_TIMEOUT=repr(timeout),
                         RAYRL_ARGV=json.dumps(argv), RAYRL_CWD=WORKDIR)
        c = self._container()
        out, err = _Capped(limits.output_bytes), _Capped(limits.output_bytes)
        t0 = time.monotonic()
        ex = await self._api("exec create", c.exec(
            ["python3", "-I", "-S", "-c", WRAPPER], stdin=bool(stdin), user="0", workdir=WORKDIR,
            environment=[f"{k}={v}" for k, v in child_env.items()]))
        client_timeout = False

        async def feed(stream) -> None:
            try:
                await stream.write_in(stdin)
                transport = stream._resp.connection.transport if stream._resp and stream._resp.connection else None
                if transport is not None and transport.can_write_eof():
                    transport.write_eof()       # the command sees EOF on its stdin
            except (ConnectionError, RuntimeError, AttributeError, aiohttp.ClientError):
                pass                            # the command exited without reading it all

        async def pump() -> None:
            async with ex.start(detach=False) as stream:
                feeder = asyncio.ensure_future(feed(stream)) if stdin else None
                try:
                    while (msg := await stream.read_out()) is not None:
                        (out if msg.stream == 1 else err).add(msg.data)
                finally:
                    if feeder is not None:
                        feeder.cancel()
                        await asyncio.gather(feeder, return_exceptions=True)

        try:
            await asyncio.wait_for(pump(), timeout + EXEC_GRACE_S)
        except asyncio.TimeoutError:
            client_timeout = True
        except (aiohttp.ClientError, OSError) as e:
            raise _infra(f"exec stream in {self.id[:12]}", e)
        except Exception as e:
            from aiodocker.exceptions import DockerError
            if isinstance(e, DockerError):
                await self._raise_if_gone(e)
                raise _infra(f"exec start in {self.id[:12]}", e)
            raise
        duration = time.monotonic() - t0

        status = self._parse_status(err, nonce)
        if status is None or client_timeout:
            return await self._exec_fallback(ex, out, err, duration, client_timeout, limits)
        if "error" in status:
            # the wrapper could not fork: the pids limit is held by something that escaped it
            await self._restart()
            return self._result(None, signal.SIGKILL, out, err, duration, Outcome.SIGNAL, limits)
        code, sig = status.get("exit"), status.get("signal")
        oom = status.get("oom0", -1) >= 0 and status.get("oom1", -1) > status.get("oom0", -1)
        if status.get("timeout"):
            outcome = Outcome.TIMEOUT
        elif oom:
            # the OOM killer struck in the container during this command: the command or one of
            # its processes hit the memory limit (even if the command itself then exited 0)
            outcome = Outcome.OOM
        elif self._cpu_limited(sig, code, status.get("cpu", 0.0), limits):
            outcome = Outcome.TIMEOUT
        elif sig is not None:
            outcome = Outcome.SIGNAL
        else:
            outcome = Outcome.NORMAL
        return self._result(code, sig, out, err, duration, outcome, limits)

    @staticmethod
    def _cpu_limited(sig: int | None, code: int | None, cpu: float, limits: Limits) -> bool:
        """Killed at RLIMIT_CPU: SIGXCPU at the soft limit (only that limit sends it), SIGKILL at
        the hard one; a shell that ran the killed program reports 128 + the signal."""
        if sig == signal.SIGXCPU or code == 128 + signal.SIGXCPU:
            return True
        return (sig == signal.SIGKILL or code == 128 + signal.SIGKILL) and cpu >= limits.cpu_seconds - 0.1

    @staticmethod
    def _parse_status(err: _Capped, nonce: str) -> dict | None:
        tail = bytes(err.tail)
        key = nonce.encode()
        i = tail.rfind(key)
        if i < 0 or not tail.endswith(b"\n"):
            return None
        try:
            status = json.loads(tail[i + len(key):].decode())
        except ValueError:
            return None
        if not isinstance(status, dict):
            return None
        # cut the status line off the captured stderr
        real = err.total - (len(tail) - i)
        del err.buf[real:]
        err.total = real
        return status

    def _result(self, code, sig, out: _Capped, err: _Capped, duration: float, outcome: Outcome,
                limits: Limits) -> ExecResult:
        cap = limits.output_bytes
        return ExecResult(exit_code=code if sig is None else None, stdout=bytes(out.buf[:cap]),
                          stderr=bytes(err.buf[:cap]), stdout_truncated=out.total > cap,
                          stderr_truncated=err.total > cap, duration_s=duration, outcome=outcome,
                          signal=sig)

    async def _exec_fallback(self, ex, out: _Capped, err: _Capped, duration: float,
                             client_timeout: bool, limits: Limits) -> ExecResult:
        """The wrapper's report is missing: it was killed (OOM) or the client gave up waiting.
        Kill what is left, then classify from the exec's exit code and the OOM counter."""
        head = bytes(out.buf[:300]) + bytes(err.buf[:300])
        if b"OCI runtime exec failed" in head:        # the engine could not start the wrapper
            await self._raise_if_gone(None)
            hint = (f" (the image {self.profile.image!r} needs python3 for the exec wrapper)"
                    if b"python3" in head else "")
            raise _infra(f"exec in {self.id[:12]} could not start{hint}: "
                         f"{head.decode(errors='replace').strip()[:300]}")
        try:
            before = await self._admin("oom")
            # a wrapper that is still running would, at its own deadline, kill the next command
            report = await self._admin("killroot,kill" if client_timeout else "kill")
        except SandboxInfraError:
            await self._raise_if_gone(None)
            await self._restart()
            report, before = {}, {}
        info = {}
        if not client_timeout:
            try:
                info = await self._api("exec inspect", ex.inspect())
            except SandboxInfraError:
                info = {}
        code = info.get("ExitCode")
        if client_timeout:
            return self._result(None, signal.SIGKILL, out, err, duration, Outcome.TIMEOUT, limits)
        stderr_text = bytes(err.buf[-300:]).decode(errors="replace")
        if code in (126, 127) and "python3" in stderr_text:
            raise _infra(f"the image {self.profile.image!r} has no usable python3, which the Docker "
                         f"backend's exec wrapper needs: {stderr_text.strip()}")
        oomed = await self._oom_state()
        if report.get("oom", -1) > before.get("oom", -1) >= 0:
            oomed = True
        sig = code - 128 if isinstance(code, int) and 128 < code < 160 else None
        if oomed:
            outcome = Outcome.OOM
        elif sig is not None:
            outcome = Outcome.SIGNAL
        else:
            outcome = Outcome.NORMAL
        return self._result(code if sig is None else None, sig, out, err, duration, outcome, limits)

    async def _oom_state(self) -> bool:
        try:
            info = await self._api("inspect", self._container().show())
        except SandboxInfraError:
            return False
        return bool(info.get("State", {}).get("OOMKilled"))

    async def _raise_if_gone(self, exc) -> None:
        """Raise a SandboxInfraError that says so when the container is gone or stopped."""
        from aiodocker.exceptions import DockerError
        try:
            info = await self.backend._client().containers.container(self.id).show()
        except DockerError as e:
            if e.status == 404:
                raise _infra(f"container {self.id[:12]} vanished (removed behind the backend's back)", exc)
            return
        except Exception:
            return
        state = info.get("State", {})
        if not state.get("Running"):
            raise _infra(f"container {self.id[:12]} is not running (status {state.get('Status')}, "
                         f"exit code {state.get('ExitCode')}, OOMKilled {state.get('OOMKilled')})", exc)

    async def write_file(self, path: str, data: bytes) -> None:
        self._check_open()
        async with self._lock():
            await self._put_files([(path, data)])

    async def read_file(self, path: str) -> bytes:
        self._check_open()
        full = posixpath.normpath(path if path.startswith("/") else posixpath.join(WORKDIR, path))
        from aiodocker.exceptions import DockerError
        for _ in range(8):                  # follow symbolic links, inside the container
            try:
                tf = await asyncio.wait_for(self._container().get_archive(full), API_TIMEOUT_S)
            except DockerError as e:
                if e.status == 404:
                    await self._raise_if_gone(e)
                    raise FileNotFoundError(f"{path}: no such file in sandbox {self.id[:12]}") from None
                raise _infra(f"get_archive {full} in {self.id[:12]}", e)
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
                raise _infra(f"get_archive {full} in {self.id[:12]}", e)
            with tf:
                member = tf.getmembers()[0] if tf.getmembers() else None
                if member is None:
                    raise FileNotFoundError(path)
                if member.issym():
                    full = posixpath.normpath(posixpath.join(posixpath.dirname(full), member.linkname))
                    continue
                if member.isdir():
                    raise IsADirectoryError(path)
                f = tf.extractfile(member)
                if f is None:
                    raise OSError(f"{path}: not a regular file")
                return f.read()
        raise OSError(f"{path}: too many levels of symbolic links")

    async def reset(self) -> None:
        self._check_open()
        async with self._lock():
            try:
                report = await self._admin("kill,clear")
                if report.get("left"):
                    raise _infra(f"reset of {self.id[:12]} left files behind: {report['left'][:5]}")
            except SandboxInfraError:
                await self._raise_if_gone(None)
                await self._restart()       # comes back empty
                return
            await self._put_files(self.profile.files)

    async def alive(self) -> bool:
        if self.closed:
            return False
        try:
            info = await self._api("inspect", self._container().show())
        except SandboxInfraError:
            return False
        state = info.get("State", {})
        return bool(state.get("Running")) and not state.get("Paused") and not state.get("Restarting")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.backend._remove(self.id)


class DockerBackend(Backend):
    """Sandboxes as containers of a Docker engine reached through aiodocker.

    `url` is the engine's address (unix:///…/docker.sock); default: $RAYRL_DOCKER_HOST, then
    $DOCKER_HOST, then aiodocker's search of the usual sockets. One aiodocker client per event loop
    (an aiohttp session cannot cross loops), created on first use."""

    def __init__(self, url: str | None = None):
        self.url = url or _default_url()
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, Any]] = {}
        self._images_ok: set[str] = set()
        self._ncpu: int | None = None
        self.created = 0
        self.owner = secrets.token_hex(8)   # labels this backend's containers (rayrl.owner)

    def __repr__(self) -> str:
        return f"DockerBackend({self.url!r})"

    def __getstate__(self) -> dict:
        # picklable (e.g. as a Ray actor argument): clients are per process and per loop
        state = dict(self.__dict__)
        state["_clients"] = {}
        return state

    # ------------------------------------------------------------------ engine access

    def _client(self):
        import aiodocker
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is not None and entry[0] is loop:
            return entry[1]
        for key, (old_loop, old) in list(self._clients.items()):
            if old_loop.is_closed() or old_loop is not loop and key == id(loop):
                self._clients.pop(key, None)
                self._drop(old)
        timeout = aiohttp.ClientTimeout(total=None, connect=API_TIMEOUT_S, sock_connect=API_TIMEOUT_S)
        if self.url and self.url.startswith("unix://"):
            # No keep-alive pool: a new unix-socket connection per call costs microseconds, and no
            # idle connection outlives the event loop that opened it (loops come and go: pytest,
            # asyncio.run), so a client is dropped cleanly once its loop is closed.
            connector = aiohttp.UnixConnector(path=self.url[len("unix://"):], force_close=True)
            client = aiodocker.Docker(url="unix://localhost", connector=connector, timeout=timeout)
        else:
            client = aiodocker.Docker(url=self.url, timeout=timeout)
        self._clients[id(loop)] = (loop, client)
        return client

    @staticmethod
    def _drop(client) -> None:
        """Forget a client whose loop is closed, closing its connector without that loop."""
        try:
            conn = client.session.connector
            if conn is not None:
                conn._close()
        except Exception:
            pass

    async def _api(self, what: str, coro, container: str | None = None):
        from aiodocker.exceptions import DockerError
        where = f" ({container[:12]})" if container else ""
        try:
            return await asyncio.wait_for(coro, API_TIMEOUT_S)
        except asyncio.TimeoutError as e:
            raise _infra(f"{what}{where}: no answer from the engine at {self.url} within "
                         f"{API_TIMEOUT_S:.0f} s", e)
        except DockerError as e:
            if e.status == 900:
                raise _infra(f"{what}{where}: engine unreachable at {self.url}", e)
            if container and e.status == 404 and "container" in str(e.message).lower():
                raise _infra(f"{what}: container {container[:12]} vanished", e)
            if container and e.status == 409:
                raise _infra(f"{what}: container {container[:12]} is not running", e)
            raise _infra(f"{what}{where}", e)
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise _infra(f"{what}{where}: engine at {self.url}", e)

    async def connect(self) -> "DockerBackend":
        """Check the engine answers (raises SandboxInfraError otherwise); returns self."""
        info = await self._api("info", self._client().system.info())
        self._ncpu = int(info.get("NCPU") or os.cpu_count() or 1)
        return self

    async def version(self) -> dict:
        return await self._api("version", self._client().version())

    async def image_exists(self, image: str) -> bool:
        from aiodocker.exceptions import DockerError
        try:
            await asyncio.wait_for(self._client().images.inspect(image), API_TIMEOUT_S)
            return True
        except DockerError as e:
            if e.status == 404:
                return False
            raise _infra(f"image inspect {image}", e)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            raise _infra(f"image inspect {image}: engine at {self.url}", e)

    async def _check_image(self, image: str) -> None:
        if image in self._images_ok:
            return
        if not image:
            raise SandboxInfraError("docker: the profile names no image (Profile.image)")
        if not await self.image_exists(image):
            raise SandboxInfraError(
                f"docker: image {image!r} is not in the engine at {self.url}; no registry is "
                f"reachable, so it is never pulled: build it locally "
                f"(rayrl.sandbox.image.ensure_image)")
        self._images_ok.add(image)

    # ------------------------------------------------------------------ sandboxes

    def container_config(self, profile: Profile) -> dict:
        """The engine's create body for a profile (public so tests and tools can inspect it)."""
        lim = profile.limits
        ncpu = self._ncpu or os.cpu_count() or 1
        cpus = min(max(lim.cpus, 0.01), float(ncpu))

        def tmpfs_volume(target: str, size_mb: int, extra: str) -> dict:
            return {"Type": "volume", "Target": target, "VolumeOptions": {
                "Labels": {LABEL: "1"},
                "DriverConfig": {"Name": "local", "Options": {
                    "type": "tmpfs", "device": "tmpfs",
                    "o": f"size={int(size_mb)}m,nosuid,nodev,{extra}"}}}}

        return {
            "Image": profile.image,
            "Cmd": ["sleep", "infinity"],
            "Entrypoint": [],
            "User": "0",
            "WorkingDir": WORKDIR,
            "Env": [f"{k}={v}" for k, v in profile.env],
            "Labels": {LABEL: "1", "rayrl.profile": profile.name, "rayrl.owner": self.owner},
            "NetworkDisabled": True,
            "HostConfig": {
                "Init": True,
                "NetworkMode": "none",
                "ReadonlyRootfs": True,
                "Memory": int(lim.memory_mb) << 20,
                "MemorySwap": int(lim.memory_mb) << 20,
                "PidsLimit": int(lim.processes) + PIDS_RESERVE,
                "NanoCpus": int(cpus * 1e9),
                "Ulimits": [
                    {"Name": "nofile", "Soft": int(lim.open_files), "Hard": int(lim.open_files)},
                    {"Name": "fsize", "Soft": int(lim.file_size_mb) << 20, "Hard": int(lim.file_size_mb) << 20},
                    {"Name": "cpu", "Soft": int(lim.cpu_seconds), "Hard": int(lim.cpu_seconds) + 1},
                    {"Name": "core", "Soft": 0, "Hard": 0},
                ],
                "Mounts": [
                    tmpfs_volume(WORKDIR, lim.work_mb, f"uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0755"),
                    tmpfs_volume(TMPDIR, lim.tmp_mb, "mode=1777"),
                ],
                "ShmSize": int(lim.tmp_mb) << 20,
                "CapDrop": ["ALL"],
                # root in the container only starts commands and cleans up after them
                "CapAdd": ["SETUID", "SETGID", "DAC_OVERRIDE", "FOWNER", "KILL"],
                "SecurityOpt": ["no-new-privileges"],
                "IpcMode": "private",
                "AutoRemove": False,
            },
        }

    async def create(self, profile: Profile) -> DockerSandbox:
        if profile.backend not in ("docker", ""):
            raise ValueError(f"profile {profile.name!r} is for backend {profile.backend!r}, not docker")
        if self._ncpu is None:
            await self.connect()
        await self._check_image(profile.image)
        client = self._client()
        t0 = time.monotonic()
        try:
            container = await self._api(f"create from {profile.image}",
                                        client.containers.create(self.container_config(profile)))
        except SandboxInfraError as e:
            if "No such image" in str(e):
                self._images_ok.discard(profile.image)
            raise
        try:
            await self._api("start", container.start(), container=container.id)
            sb = DockerSandbox(self, profile, container.id, time.monotonic() - t0)
            if profile.files:
                await sb._put_files(profile.files)
        except BaseException:
            await asyncio.shield(self._remove(container.id))
            raise
        self.created += 1
        return sb

    async def _remove(self, container_id: str) -> None:
        from aiodocker.exceptions import DockerError
        c = self._client().containers.container(container_id)
        try:
            await asyncio.wait_for(c.delete(force=True, v=True), API_TIMEOUT_S)
        except DockerError as e:
            if e.status == 404 or (e.status == 409 and "in progress" in str(e.message)):
                return              # already gone (or going)
            raise _infra(f"remove {container_id[:12]}", e)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            raise _infra(f"remove {container_id[:12]}: engine at {self.url}", e)

    async def list_containers(self, mine_only: bool = True) -> list[str]:
        """Ids of the sandbox containers this backend created (label rayrl.owner), or of every
        rayrl sandbox container in the engine (label rayrl.sandbox) with mine_only=False."""
        label = f"rayrl.owner={self.owner}" if mine_only else LABEL
        cs = await self._api("list", self._client().containers.list(
            all=True, filters=json.dumps({"label": [label]})))
        return [c.id for c in cs]

    async def remove_all(self, mine_only: bool = True) -> int:
        """Remove this backend's sandbox containers (or, mine_only=False, every rayrl sandbox
        container in the engine: leaks of crashed owners). Returns how many."""
        ids = await self.list_containers(mine_only)
        await asyncio.gather(*(self._remove(i) for i in ids))
        return len(ids)

    async def shutdown(self) -> None:
        """Close the aiodocker client of the running loop and forget the others."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for key, (lp, client) in list(self._clients.items()):
            self._clients.pop(key, None)
            if lp is loop:
                try:
                    await client.close()
                except Exception:
                    pass
            self._drop(client)
