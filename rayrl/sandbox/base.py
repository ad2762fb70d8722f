"""The sandbox interface every backend implements, and the types it speaks.

A sandbox is a long-lived isolated environment created from a `Profile`. Commands run in it with
`exec`; what the command did (exit code, output, timeout, out of memory, signal) is an
`ExecResult`, never an exception. An exception (`SandboxInfraError`) means the infrastructure
failed (the sandbox died, the engine did not answer): not the model's fault, so an episode that
hits one is marked as an infrastructure failure and kept out of the advantages.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field


class SandboxInfraError(RuntimeError):
    """The sandbox or its backend failed; the command's outcome is unknown."""


class Outcome(str, enum.Enum):
    NORMAL = "normal"      # the command exited by itself (any exit code)
    TIMEOUT = "timeout"    # killed at its wall-clock or CPU-time limit
    OOM = "oom"            # killed (or failed to allocate) at its memory limit
    SIGNAL = "signal"      # killed by a signal it did not get from the limits


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 30          # RLIMIT_CPU of each command
    memory_mb: int = 512           # address space (rlimit) and cgroup memory limit
    processes: int = 128           # RLIMIT_NPROC / pids.max
    file_size_mb: int = 64         # RLIMIT_FSIZE: largest file a command may write
    open_files: int = 256          # RLIMIT_NOFILE
    tmp_mb: int = 64               # size of the private /tmp
    work_mb: int = 256             # size of the private work directory
    output_bytes: int = 1 << 20    # stdout and stderr are each cut after this many bytes
    cpus: float = 1.0              # CPU share (Docker; cgroup cpu where offered)


@dataclass(frozen=True)
class Profile:
    """What a sandbox is made from. Hashable, so pools key on it."""

    name: str = "default"
    backend: str = "bwrap"                          # bwrap | docker
    image: str = ""                                 # docker: a locally built image
    limits: Limits = field(default_factory=Limits)
    files: tuple[tuple[str, bytes], ...] = ()       # initial files, relative to the work directory
    env: tuple[tuple[str, str], ...] = ()           # environment of every command


@dataclass
class ExecResult:
    exit_code: int | None          # None when killed by a signal
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float
    outcome: Outcome
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == Outcome.NORMAL and self.exit_code == 0


WORKDIR = "/work"   # the sandbox's private writable directory, as seen from inside


class Sandbox(abc.ABC):
    profile: Profile

    @abc.abstractmethod
    async def exec(self, cmd: str | list[str], stdin: bytes = b"", timeout: float = 10.0,
                   env: dict[str, str] | None = None) -> ExecResult:
        """Run `cmd` (a shell string, or argv) in the work directory; its whole process tree ends
        with it, whatever it spawned."""

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes) -> None:
        """Write `data` at `path` (relative paths are under the work directory). A path the
        sandbox refuses (read-only, a directory, a NUL in it) raises OSError or ValueError: the
        caller's fault, unlike SandboxInfraError."""

    @abc.abstractmethod
    async def read_file(self, path: str) -> bytes: ...

    @abc.abstractmethod
    async def reset(self) -> None:
        """Back to the profile's initial state (work directory and /tmp), for reuse by a new lease."""

    @abc.abstractmethod
    async def alive(self) -> bool:
        """Cheap health check."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill everything inside and free the resources; idempotent."""


class Backend(abc.ABC):
    @abc.abstractmethod
    async def create(self, profile: Profile) -> Sandbox: ...

    async def shutdown(self) -> None:
        """Release backend-wide resources (connections); sandboxes are closed by their owners."""
