"""A private Docker engine for the test session: `from tests.docker_engine import docker_backend`.

The session fixture starts `dockerd` on its own socket and data root (under
~/.cache/rayrl/dockerd, so the imported image survives between runs on one machine), builds or
imports the project's sandbox image, and yields a `DockerEngine` whose `.backend` is a connected
`DockerBackend` and whose `.profile_for(...)` makes docker profiles for that image. At teardown it
removes any sandbox container a test leaked and stops the daemon by its PID. When dockerd cannot
start, every test that uses the fixture is skipped with the reason, which is also printed.

Set RAYRL_DOCKER_HOST to use an engine that is already running instead (nothing is started or
stopped then); RAYRL_DOCKERD_ROOT moves the private daemon's directories. Concurrent test
sessions on one machine each get their own daemon (the root is locked while in use; the next free
one of dockerd-2, dockerd-3, … is taken), so one session's teardown never stops another's engine.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import pytest

from rayrl.sandbox.base import Limits, Profile
from rayrl.sandbox.docker import DockerBackend
from rayrl.sandbox.dockerd import DEFAULT_ROOT, PrivateDockerd, start_in_free_slot


@dataclass
class DockerEngine:
    backend: DockerBackend
    image: str
    url: str
    daemon: PrivateDockerd | None = None          # None when an external engine is used
    timings: dict[str, float] = field(default_factory=dict)

    def profile_for(self, limits: Limits = Limits(), files=(), env=(), name: str = "docker-test") -> Profile:
        return Profile(name=name, backend="docker", image=self.image, limits=limits,
                       files=tuple((p, bytes(d)) for p, d in files), env=tuple(env))


def _say(request, msg: str) -> None:
    """A line on the terminal even while pytest captures output."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"[docker_backend] {msg}")
    else:
        print(f"[docker_backend] {msg}")


@pytest.fixture(scope="session")
def docker_backend(request):
    from rayrl.sandbox.image import ensure_image

    timings: dict[str, float] = {}
    daemon = None
    url = os.environ.get("RAYRL_DOCKER_HOST")
    if not url:
        # ~/.cache/rayrl/dockerd, or dockerd-2, -3, … while concurrent test sessions hold the others
        started = start_in_free_slot(os.environ.get("RAYRL_DOCKERD_ROOT") or DEFAULT_ROOT, timeout=60)
        if isinstance(started, str):
            _say(request, f"Docker tests skipped: dockerd cannot start: {started}")
            pytest.skip(f"dockerd cannot start: {started}")
        daemon = started
        url = daemon.url
        timings["dockerd_start_s"] = daemon.start_s or 0.0
        _say(request, f"private dockerd pid {daemon.pid} (root {daemon.root}) on {url} "
                      f"up in {timings['dockerd_start_s']:.2f} s")
    backend = DockerBackend(url)

    async def prepare() -> str:
        import aiodocker
        await backend.connect()
        docker = aiodocker.Docker(url=url)
        try:
            return await ensure_image(docker, progress=lambda m: _say(request, m))
        finally:
            await docker.close()
            await backend.shutdown()

    try:
        t0 = time.monotonic()
        image = asyncio.run(prepare())
        timings["image_s"] = time.monotonic() - t0
        _say(request, f"image {image} ready in {timings['image_s']:.2f} s")
    except BaseException:
        if daemon is not None:
            daemon.stop()
        raise
    engine = DockerEngine(backend=backend, image=image, url=url, daemon=daemon, timings=timings)
    try:
        yield engine
    finally:
        async def cleanup() -> int:
            try:
                return await backend.remove_all()
            finally:
                await backend.shutdown()
        try:
            leaked = asyncio.run(cleanup())
            if leaked:
                _say(request, f"removed {leaked} sandbox container(s) left behind by tests")
        except Exception as e:          # the daemon is stopped below whatever happened
            _say(request, f"cleanup failed: {e}")
        if daemon is not None:
            daemon.stop()
            _say(request, "private dockerd stopped")
