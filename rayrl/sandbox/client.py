"""One calling convention over the places sandboxes come from: a local SandboxPool, a Ray actor
handle to one, or a SandboxRouter. Environments and the agent loop use sandboxes through it."""

from __future__ import annotations

import contextlib

from rayrl.sandbox.base import ExecResult, SandboxInfraError


class PoolClient:
    """One calling convention over a local `SandboxPool`, a Ray actor handle to one, or a
    `SandboxRouter` (whose `lease` returns the chosen pool actor with the lease id)."""

    def __init__(self, pool):
        self.pool = pool
        self.router = hasattr(pool, "pools") and not hasattr(pool, "exec")
        self.remote = self.router or hasattr(getattr(pool, "lease", None), "remote")

    @staticmethod
    async def _invoke(target, method: str, remote: bool, *args, **kwargs):
        fn = getattr(target, method)
        if not remote:
            return await fn(*args, **kwargs)
        import ray
        try:
            return await fn.remote(*args, **kwargs)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            raise SandboxInfraError(f"sandbox pool actor unavailable: {e}") from e

    @contextlib.asynccontextmanager
    async def session(self, profile: str, ttl_s: float = 600.0):
        """A leased sandbox for the block; released (reset for reuse) afterwards."""
        if self.router:
            try:
                target, lease = await self.pool.lease(profile, ttl_s)
            except Exception as e:
                import ray
                if isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)):
                    raise SandboxInfraError(f"sandbox pool actor unavailable: {e}") from e
                raise
        else:
            target = self.pool
            lease = await self._invoke(target, "lease", self.remote, profile, ttl_s)
        session = Session(self, target, lease)
        try:
            yield session
        finally:
            with contextlib.suppress(Exception):
                await self._invoke(target, "release", self.remote, lease)


class Session:
    """A leased sandbox: exec and files, whatever kind of pool it came from."""

    def __init__(self, client: PoolClient, target, lease: str):
        self.client, self.target, self.lease = client, target, lease

    async def exec(self, cmd, stdin: bytes = b"", timeout: float = 10.0, env: dict | None = None) -> ExecResult:
        return await self.client._invoke(self.target, "exec", self.client.remote, self.lease, cmd,
                                         stdin=stdin, timeout=timeout, env=env)

    async def write_file(self, path: str, data: bytes) -> None:
        await self.client._invoke(self.target, "write_file", self.client.remote, self.lease, path, data)

    async def read_file(self, path: str) -> bytes:
        return await self.client._invoke(self.target, "read_file", self.client.remote, self.lease, path)
