"""`sandbox_factory`: one fixture, parametrized over the sandbox backends, for tests that must hold
in every backend (the hostile battery).

It yields an async factory `make(profile) -> Sandbox`, the sandbox leased from a SandboxPool over
the backend (`sb.pool`, `sb.lease`), with a few attributes:

- `make.name`: "bwrap" or "docker";
- `make.memory_cgroup`: whether a memory cgroup bounds the sandbox (so a memory bomb spread over
  several processes ends as Outcome.OOM rather than by the per-process rlimit);
- `make.backend`: the backend object.

Only `profile.limits`, `files`, `env` and `name` of the profile given to `make` matter: the backend
and image are the factory's. Every sandbox made is closed at teardown.

For "docker" the session fixture `docker_backend` from tests/docker_engine.py provides the engine
(a DockerBackend on a private dockerd with a locally built image, and `profile_for(limits)`); a
test module that uses `sandbox_factory` must import that fixture too (see
tests/test_sandbox_hostile.py). Until tests/docker_engine.py exists, the docker branch skips.
The backend is resolved by a plain (sync) fixture, outside any event loop, because the Docker
fixture runs its own set-up loop; the factory itself runs on the session event loop.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import pytest_asyncio

from rayrl.sandbox.base import Profile
from rayrl.sandbox.pool import SandboxPool


@pytest.fixture(params=["bwrap", "docker"])
def sandbox_backend(request):
    """(name, backend, profile_for) for one backend; skips where that backend cannot run."""
    if request.param == "bwrap":
        from rayrl.sandbox.bwrap import BwrapBackend

        backend = BwrapBackend()

        def profile_for(limits):
            return Profile(backend="bwrap", limits=limits)

        yield "bwrap", backend, profile_for
        return
    try:
        engine = importlib.import_module("tests.docker_engine")
    except ImportError as e:
        pytest.skip(f"the Docker test engine (tests/docker_engine.py) cannot be imported: {e}")
    value = request.getfixturevalue("docker_backend")
    if isinstance(value, tuple):                          # (backend, profile_for)
        backend, profile_for = value[0], value[1]
    elif hasattr(value, "backend"):                       # an engine object
        backend, profile_for = value.backend, value.profile_for
    else:                                                 # the backend itself
        backend = value
        profile_for = getattr(engine, "profile_for", None) or getattr(backend, "profile_for")
    yield "docker", backend, profile_for


@pytest_asyncio.fixture(loop_scope="session")
async def sandbox_factory(sandbox_backend):
    name, backend, profile_for = sandbox_backend
    made = []

    pools = []

    async def make(profile: Profile):
        """A sandbox leased from a SandboxPool over this backend; `sb.pool` and `sb.lease` let a
        test hand it back and check that the pool serves the next lease."""
        base = profile_for(profile.limits)
        profile = dataclasses.replace(profile, backend=base.backend, image=base.image)
        pool = SandboxPool([profile], min_idle=0, max_total=4, export_metrics=False,
                           backends={profile.backend: backend})
        pools.append(pool)
        lease = await pool.lease(profile.name)
        sb = pool._leases[lease].sandbox
        sb.pool, sb.lease = pool, lease
        made.append(sb)
        return sb

    make.name = name
    make.backend = backend
    make.memory_cgroup = ("memory" in backend.cgroup_controllers) if name == "bwrap" else True
    try:
        yield make
    finally:
        for pool in pools:
            await pool.shutdown()
        for sb in made:
            try:
                await sb.close()
            except Exception:
                pass
        if name == "bwrap":
            await backend.shutdown()
