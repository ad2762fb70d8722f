"""SandboxPool: warm sandboxes per profile, leased to episodes (wrapped with ray.remote at spawn).

A lease has a time-to-live that its holder extends with heartbeats (every exec is one); a lease
that expires is reclaimed and its sandbox closed, so a crashed episode never leaks a sandbox. A
returned sandbox is reset and reused, or replaced when the reset or a health check fails. When
`max_total` sandboxes are leased, requests wait in a bounded queue; past it they fail at once
with `PoolSaturated`. Infrastructure failures close the sandbox, are counted, and reach the
caller as `SandboxInfraError`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass

from rayrl.sandbox.base import Backend, ExecResult, Profile, Sandbox, SandboxInfraError


_COUNTERS = ("started", "leases", "execs", "expired", "rejected", "infra_failures", "close_errors")


class PoolSaturated(RuntimeError):
    """Every sandbox is leased and the wait queue is full."""


class LeaseExpired(SandboxInfraError):
    """The lease ran past its time-to-live without a heartbeat and its sandbox was reclaimed."""


@dataclass
class _Lease:
    sandbox: Sandbox
    profile: Profile
    expires: float


def make_backend(name: str, **options) -> Backend:
    """`options` go to the backend's constructor (docker: url=...; bwrap: see BwrapBackend)."""
    if name == "bwrap":
        from rayrl.sandbox.bwrap import BwrapBackend
        return BwrapBackend(**options)
    if name == "docker":
        from rayrl.sandbox.docker import DockerBackend
        return DockerBackend(**options)
    raise ValueError(f"sandbox backend {name!r} is not one of bwrap, docker")


class _Metrics:
    """ray.util.metrics when running inside Ray, plain counters always (stats())."""

    def __init__(self, export: bool):
        self.export = export
        if export:
            from ray.util.metrics import Counter as RCounter, Gauge, Histogram
            ms = [0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000]
            self.gauges = {k: Gauge(f"rayrl_sandbox_{k}", description=f"sandboxes {k}", tag_keys=("profile",))
                           for k in ("live", "idle", "leased")}
            self.hist = {k: Histogram(f"rayrl_sandbox_{k}_ms", description=f"sandbox {k} latency (ms)",
                                      boundaries=ms, tag_keys=("profile",))
                         for k in ("queue_wait", "start", "exec")}
            self.infra = RCounter("rayrl_sandbox_infra_failures", description="sandbox infrastructure failures",
                                  tag_keys=("profile",))

    def observe(self, kind: str, profile: str, seconds: float) -> None:
        if self.export:
            self.hist[kind].observe(seconds * 1000.0, tags={"profile": profile})

    def gauge(self, kind: str, profile: str, value: int) -> None:
        if self.export:
            self.gauges[kind].set(value, tags={"profile": profile})

    def infra_failure(self, profile: str) -> None:
        if self.export:
            self.infra.inc(tags={"profile": profile})


class SandboxPool:
    def __init__(self, profiles: list[Profile], min_idle: int = 2, max_total: int = 64, max_queue: int = 256,
                 health_interval_s: float = 10.0, export_metrics: bool = True,
                 backend_options: dict[str, dict] | None = None, backends: dict[str, Backend] | None = None):
        names = [p.name for p in profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"sandbox profile names must be unique: {names}")
        if min_idle > max_total:
            raise ValueError(f"min_idle={min_idle} exceeds max_total={max_total}")
        self.profiles = {p.name: p for p in profiles}
        self.min_idle, self.max_total, self.max_queue = min_idle, max_total, max_queue
        self.health_interval_s = health_interval_s
        self._backends: dict[str, Backend] = dict(backends or {})   # given ones are shared, not shut down
        self._own_backends: set[str] = set()
        self._backend_options = backend_options or {}
        self._idle: dict[str, deque[Sandbox]] = {n: deque() for n in self.profiles}
        self._starting: Counter = Counter()
        self._leases: dict[str, _Lease] = {}
        self._ids = itertools.count()
        self._waiters = 0
        self._freed = asyncio.Condition()
        self._refilling = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.counts: Counter = Counter()
        self.metrics = _Metrics(export_metrics)

    # -- bookkeeping -----------------------------------------------------------------------
    def _backend(self, profile: Profile) -> Backend:
        if profile.backend not in self._backends:
            self._backends[profile.backend] = make_backend(profile.backend,
                                                           **self._backend_options.get(profile.backend, {}))
            self._own_backends.add(profile.backend)
        return self._backends[profile.backend]

    def _profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise KeyError(f"sandbox profile {name!r} is not one of {', '.join(self.profiles)}")
        return self.profiles[name]

    def _live(self) -> int:
        return len(self._leases) + sum(len(q) for q in self._idle.values()) + sum(self._starting.values())

    def _publish_gauges(self) -> None:
        for name, idle in self._idle.items():
            leased = sum(1 for lease in self._leases.values() if lease.profile.name == name)
            self.metrics.gauge("idle", name, len(idle))
            self.metrics.gauge("leased", name, leased)
            self.metrics.gauge("live", name, len(idle) + leased + self._starting[name])

    def _ensure_background(self) -> None:
        if not self._tasks and not self._closed:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._maintain())]

    async def _start(self, profile: Profile) -> Sandbox:
        self._starting[profile.name] += 1
        start = time.perf_counter()
        try:
            sandbox = await self._backend(profile).create(profile)
        except SandboxInfraError:
            self._infra_failure(profile.name)
            raise
        finally:
            self._starting[profile.name] -= 1
        self.metrics.observe("start", profile.name, time.perf_counter() - start)
        self.counts["started"] += 1
        return sandbox

    def _infra_failure(self, profile: str) -> None:
        self.counts["infra_failures"] += 1
        self.metrics.infra_failure(profile)

    async def _discard(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.close()
        except Exception:  # closing a broken sandbox must not mask the original failure
            self.counts["close_errors"] += 1
        async with self._freed:
            self._freed.notify_all()

    # -- background: expiry, refill, health -----------------------------------------------
    async def _maintain(self) -> None:
        last_health = time.monotonic()
        while not self._closed:
            now = time.monotonic()
            for lease_id in [i for i, lease in self._leases.items() if lease.expires < now]:
                lease = self._leases.pop(lease_id)
                self.counts["expired"] += 1
                await self._discard(lease.sandbox)
            if now - last_health > self.health_interval_s:
                last_health = now
                await self._check_idle()
            await self._refill()
            self._publish_gauges()
            await asyncio.sleep(0.05)

    async def _refill(self) -> None:
        async with self._refilling:   # warm() and the background task must not both top up
            await self._top_up()

    async def _top_up(self) -> None:
        for name, profile in self.profiles.items():
            missing = min(self.min_idle - len(self._idle[name]) - self._starting[name], self.max_total - self._live())
            if missing > 0:
                results = await asyncio.gather(*(self._start(profile) for _ in range(missing)), return_exceptions=True)
                for r in results:
                    if isinstance(r, Sandbox):
                        self._idle[name].append(r)
                async with self._freed:
                    self._freed.notify_all()

    async def _check_idle(self) -> None:
        for queue in self._idle.values():
            for sandbox in list(queue):
                # While the check awaits, a lease may take the sandbox, or a shutdown clear the queue.
                if not await sandbox.alive() and sandbox in queue:
                    queue.remove(sandbox)
                    self._infra_failure(sandbox.profile.name)
                    await self._discard(sandbox)

    # -- leases ---------------------------------------------------------------------------
    async def warm(self) -> dict:
        """Start the background refill and wait until every profile has min_idle sandboxes."""
        self._ensure_background()
        await self._refill()
        return self.stats()

    async def lease(self, profile: str = "default", ttl_s: float = 600.0) -> str:
        """A sandbox of `profile` for `ttl_s` seconds (renewed by exec and heartbeat)."""
        self._ensure_background()
        prof = self._profile(profile)
        start = time.perf_counter()
        sandbox = None
        while sandbox is None:
            if self._closed:
                raise SandboxInfraError("the sandbox pool is shut down")
            if self._idle[profile]:
                sandbox = self._idle[profile].popleft()
            elif self._live() < self.max_total:
                sandbox = await self._start(prof)
            elif any(self._idle.values()):
                # Full, but with idle sandboxes of other profiles: make room for this one.
                victim = next(q for q in self._idle.values() if q).popleft()
                await self._discard(victim)
            else:
                if self._waiters >= self.max_queue:
                    self.counts["rejected"] += 1
                    raise PoolSaturated(f"sandbox pool saturated: {self.max_total} sandboxes live and "
                                        f"{self._waiters} lease requests queued (max_queue={self.max_queue})")
                self._waiters += 1
                try:
                    async with self._freed:
                        await self._freed.wait()
                finally:
                    self._waiters -= 1
        lease_id = f"{profile}-{next(self._ids)}"
        self._leases[lease_id] = _Lease(sandbox, prof, time.monotonic() + ttl_s)
        self.metrics.observe("queue_wait", profile, time.perf_counter() - start)
        self.counts["leases"] += 1
        return lease_id

    def _get(self, lease_id: str, ttl_s: float | None = None) -> _Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseExpired(f"lease {lease_id} is unknown or expired (its sandbox was reclaimed)")
        if ttl_s is not None:
            lease.expires = max(lease.expires, time.monotonic() + ttl_s)
        return lease

    def heartbeat(self, lease_id: str, ttl_s: float = 600.0) -> None:
        self._get(lease_id, ttl_s)

    async def _call(self, lease_id: str, method: str, *args, **kwargs):
        lease = self._get(lease_id)
        # A call in flight keeps its lease alive for at least its own timeout.
        lease.expires = max(lease.expires, time.monotonic() + kwargs.get("timeout", 0.0) + 30.0)
        try:
            return await getattr(lease.sandbox, method)(*args, **kwargs)
        except SandboxInfraError:
            self._infra_failure(lease.profile.name)
            if self._leases.pop(lease_id, None) is not None:
                await self._discard(lease.sandbox)
            raise

    async def exec(self, lease_id: str, cmd, stdin: bytes = b"", timeout: float = 10.0,
                   env: dict | None = None) -> ExecResult:
        profile, start = self._get(lease_id).profile.name, time.perf_counter()
        result = await self._call(lease_id, "exec", cmd, stdin=stdin, timeout=timeout, env=env)
        self.metrics.observe("exec", profile, time.perf_counter() - start)
        self.counts["execs"] += 1
        return result

    async def write_file(self, lease_id: str, path: str, data: bytes) -> None:
        await self._call(lease_id, "write_file", path, data)

    async def read_file(self, lease_id: str, path: str) -> bytes:
        return await self._call(lease_id, "read_file", path)

    async def release(self, lease_id: str, reuse: bool = True) -> None:
        """Return the sandbox: reset and kept warm (reuse), or closed and replaced."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if reuse and not self._closed and len(self._idle[lease.profile.name]) < self.max_total:
            try:
                await lease.sandbox.reset()
                self._idle[lease.profile.name].append(lease.sandbox)
                async with self._freed:
                    self._freed.notify_all()
                return
            except SandboxInfraError:
                self._infra_failure(lease.profile.name)
        await self._discard(lease.sandbox)

    # -- introspection and shutdown -------------------------------------------------------
    def load(self) -> float:
        """Share of capacity in use (leased plus queued), for routing."""
        return (len(self._leases) + self._waiters) / self.max_total

    def stats(self) -> dict:
        return {"live": self._live(), "leased": len(self._leases),
                "idle": sum(len(q) for q in self._idle.values()), "queued": self._waiters,
                **{k: self.counts[k] for k in _COUNTERS}}

    async def shutdown(self) -> dict:
        """Close every sandbox, leased or idle; nothing is left running."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # Ended before the sandboxes go, and their errors retrieved (none is logged after shutdown).
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sandboxes = [lease.sandbox for lease in self._leases.values()] + [s for q in self._idle.values() for s in q]
        self._leases.clear()
        for q in self._idle.values():
            q.clear()
        await asyncio.gather(*(s.close() for s in sandboxes), return_exceptions=True)
        for name in self._own_backends:
            await self._backends[name].shutdown()
        async with self._freed:
            self._freed.notify_all()
        return self.stats()
