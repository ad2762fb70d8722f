"""A private Docker engine: start `dockerd` on its own socket and data root, stop it by its PID.

Nothing here touches a system daemon: the data root, exec root (where dockerd keeps its managed
containerd's state), pidfile and socket all live in directories this module owns, and the
containerd namespace is private too. `start()` never raises for the ordinary ways an engine fails
to come up (no binary, not root, timeout): it returns the reason as a string, so a caller can skip
Docker work and print why.

    d = PrivateDockerd("~/.cache/rayrl/dockerd")
    reason = d.start()          # None when the engine answers
    ... aiodocker.Docker(url=d.url) ...
    d.stop()                    # SIGTERM to its PID, SIGKILL after a grace period

A started daemon is registered with `atexit`, so it stops when the interpreter exits, whatever
happened before.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DEFAULT_ROOT = Path.home() / ".cache" / "rayrl" / "dockerd"

# Flags measured to work on these machines (see DESIGN.md): no iptables, no default bridge, so the
# engine needs no network privileges beyond what `--network none` containers use.
BASE_FLAGS = ("--iptables=false", "--ip6tables=false", "--bridge=none", "--log-level=warn")


def _ping(sock: Path, timeout: float = 1.0) -> bool:
    """True when an engine answers `GET /_ping` with OK on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.startswith(b"HTTP/1.1 200") and data.rstrip().endswith(b"OK")
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still "exists"; reap it if it is ours
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _die_with_parent():
    """A preexec_fn that has the kernel send dockerd SIGTERM when its parent dies, so a killed
    test process (SIGKILL, or SIGTERM, where atexit does not run) still stops its daemon. The
    death signal fires when the *thread* that started it exits, so it is only set from the main
    thread."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def set_pdeathsig() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)      # PR_SET_PDEATHSIG
        if os.getppid() != parent:                  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_pdeathsig


class PrivateDockerd:
    """One private `dockerd`: its own data root, exec root, pidfile, socket and containerd
    namespace, under `root`."""

    def __init__(self, root: str | os.PathLike | None = None, *, sock: str | os.PathLike | None = None,
                 binary: str = "dockerd", extra_args: tuple[str, ...] = ()):
        self.root = Path(os.path.expanduser(str(root or DEFAULT_ROOT))).absolute()
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.pidfile = self.root / "dockerd.pid"
        self.log_path = self.root / "dockerd.log"
        if sock is None:
            sock = self.root / "docker.sock"
            if len(str(sock)) > 100:        # sun_path holds 108 bytes
                tag = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
                sock = Path(tempfile.gettempdir()) / f"rayrl-dockerd-{tag}" / "docker.sock"
        self.sock = Path(sock)
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self.namespace = "rayrl-" + hashlib.sha1(str(self.root).encode()).hexdigest()[:8]
        self.pid: int | None = None
        self.owned = False           # True when this object started (or adopted) the daemon
        self.start_s: float | None = None
        self._proc: subprocess.Popen | None = None
        self._atexit = False
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid) and _ping(self.sock)

    def _log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def _lock(self) -> str | None:
        """Take the root's lock (kept until stop()); None when held, else who holds it."""
        import fcntl
        if self._lock_fd is not None:
            return None
        path = self.root / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.pread(fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            return f"pid {who}" if who else "another holder"
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        return None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.close(self._lock_fd)
            finally:
                self._lock_fd = None

    def _existing_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) and _comm(pid) == "dockerd" else None

    def start(self, timeout: float = 60.0) -> str | None:
        """Start the engine and wait until it answers. Returns None on success, else the reason.

        The root is held with an exclusive lock (a file lock, released by `stop()` or when the
        process dies), so two processes never share one private daemon: the second one's `start()`
        returns an "in use" reason (`start_in_free_slot` then tries the next root). A dockerd
        still running for this root while nobody holds the lock is an orphan of a process that died
        without stopping it: it is adopted when it answers (and stopped by `stop()`), else killed."""
        reason = self._start(timeout)
        if reason is not None and self.pid is None:
            self._unlock()
        return reason

    def _start(self, timeout: float) -> str | None:
        if self.running():
            return None
        t0 = time.monotonic()
        exe = shutil.which(self.binary) or (self.binary if os.path.isabs(self.binary) and os.access(self.binary, os.X_OK) else None)
        if exe is None:
            return f"dockerd not found ({self.binary!r} is not on PATH; apt-get install -y docker.io)"
        if os.geteuid() != 0:
            return f"dockerd needs root (running as uid {os.geteuid()}); rootless Docker is not set up here"
        try:
            for d in (self.root, self.data_root, self.exec_root, self.sock.parent):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create dockerd directories under {self.root}: {e}"
        holder = self._lock()
        if holder is not None:
            return f"{self.root} is in use by another process ({holder})"
        pid = self._existing_pid()
        if pid is not None:
            if not self._atexit:
                atexit.register(self.stop)
                self._atexit = True
            self.pid, self.owned = pid, True
            deadline = time.monotonic() + min(timeout, 10.0)
            while time.monotonic() < deadline:
                if _ping(self.sock):
                    self.start_s = time.monotonic() - t0
                    return None
                time.sleep(0.1)
            self.stop(grace=10.0)           # an orphan that does not answer: replace it
            if self._lock() is not None:
                return f"{self.root} was taken by another process while an orphan dockerd stopped"
        if self.sock.exists() or self.sock.is_symlink():
            try:
                self.sock.unlink()
            except OSError as e:
                return f"stale socket {self.sock} cannot be removed: {e}"
        cmd = [exe, "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
               "--pidfile", str(self.pidfile), "-H", f"unix://{self.sock}",
               "--containerd-namespace", self.namespace,
               "--containerd-plugins-namespace", self.namespace + "-plugins",
               *BASE_FLAGS, *self.extra_args]
        try:
            log = open(self.log_path, "wb")     # this start's log only, for the reason string
        except OSError as e:
            return f"cannot open dockerd log {self.log_path}: {e}"
        try:
            # Its own session: a Ctrl-C in the terminal does not reach it; we stop it ourselves.
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True, close_fds=True,
                                          preexec_fn=_die_with_parent())
        except PermissionError as e:
            return f"permission denied starting dockerd: {e}"
        except OSError as e:
            return f"cannot start dockerd: {e}"
        finally:
            log.close()
        self.pid, self.owned = self._proc.pid, True
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.pid, self.owned = None, False
                self._unmount_leftovers()
                return f"dockerd exited with code {code} during start-up: {self._log_tail()}"
            if _ping(self.sock):
                self.start_s = time.monotonic() - t0
                return None
            time.sleep(0.05)
        self.stop()
        return f"dockerd did not answer on {self.sock} within {timeout:.0f} s: {self._log_tail()}"

    def stop(self, grace: float = 20.0) -> None:
        """Stop the daemon we started, by its PID: SIGTERM, then SIGKILL after `grace` seconds.
        dockerd stops its running containers on SIGTERM (with --init a sleeping container stops at
        once). Only a daemon this object started (or adopted as an orphan) is stopped. Idempotent."""
        try:
            self._stop(grace)
        finally:
            self._unlock()

    def _stop(self, grace: float) -> None:
        pid, owned = self.pid, self.owned
        self.pid, self.owned = None, False
        if pid is None or not owned:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            self._reap()
            self._unmount_leftovers()
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                break
            time.sleep(0.05)
        else:
            # it did not stop in time: kill it, and the containerd it supervises (by its pidfile)
            cpid = self._containerd_pid()
            for p in (pid, cpid):
                if p is not None:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self._reap()
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        """Detach mounts dockerd left under its root when it did not shut down cleanly (a kill, or
        a stop during start-up leaves the data root's private bind mount behind)."""
        import ctypes
        try:
            with open("/proc/self/mountinfo") as f:
                points = [line.split()[4] for line in f]
        except OSError:
            return
        root = str(self.root)
        mine = [p.replace("\\040", " ") for p in points if p == root or p.startswith(root + "/")]
        if not mine:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        for p in sorted(set(mine), key=len, reverse=True):
            libc.umount2(p.encode(), 2)          # MNT_DETACH

    def _containerd_pid(self) -> int | None:
        try:
            pid = int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _comm(pid) == "containerd" else None

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None

    def __enter__(self) -> "PrivateDockerd":
        reason = self.start()
        if reason is not None:
            raise RuntimeError(reason)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_free_slot(base: str | os.PathLike | None = None, slots: int = 8, timeout: float = 60.0,
                       **kw) -> PrivateDockerd | str:
    """Start a private engine under `base`, or `base-2`, `base-3`, … when a concurrent process
    holds it: sequential runs reuse the first root (and the images in it), parallel runs get their
    own. Returns the daemon object, or the reason no slot could start."""
    base = Path(os.path.expanduser(str(base or DEFAULT_ROOT))).absolute()
    reasons = []
    for i in range(1, slots + 1):
        root = base if i == 1 else base.with_name(f"{base.name}-{i}")
        d = PrivateDockerd(root, **kw)
        reason = d.start(timeout=timeout)
        if reason is None:
            return d
        reasons.append(reason)
        if "in use by another process" not in reason:
            return reason
    return "every dockerd slot is in use: " + "; ".join(reasons)


def start_private_dockerd(root: str | os.PathLike | None = None, timeout: float = 60.0,
                          **kw) -> PrivateDockerd | str:
    """Start a private engine under `root`; the daemon object when it answers, else the reason."""
    d = PrivateDockerd(root, **kw)
    reason = d.start(timeout=timeout)
    return d if reason is None else reason
