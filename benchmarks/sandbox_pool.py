"""Sandbox pool throughput and latency against raw bubblewrap.

Baseline: starting a fresh bubblewrap sandbox with the same isolation for each trivial command,
several at a time (the strongest form of "a new sandbox per command"). Measured against it: `exec` of the same
command in warm pooled sandboxes through the SandboxPool Ray actor, warm lease latency, how many
sandboxes can be held live at once and their memory, and the Docker container start latency when
a private engine can be started.

    python benchmarks/sandbox_pool.py [seconds=5] [live=1000] [concurrency=4]

Last line: JSON with raw_exec_per_s, pool_exec_per_s, acquire_p50_ms, acquire_p99_ms,
live_sandboxes, mem_per_sandbox_mb, docker_start_ms (null when no engine could start).
"""

import asyncio
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._args import parse  # noqa: E402
from rayrl.cli import exit_status  # noqa: E402
from rayrl.sandbox.base import Profile  # noqa: E402

DEFAULTS = {"seconds": 5.0, "live": 1000, "concurrency": 4}


async def raw_bwrap_per_s(seconds: float, concurrency: int) -> float:
    """A fresh bwrap per command, with the same isolation as a pooled sandbox (no agent, no reuse)."""
    from rayrl.sandbox.bwrap import BwrapBackend
    backend = BwrapBackend()
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop():
        nonlocal done
        while time.perf_counter() < deadline:
            if await backend.run_raw(["/bin/true"]) != 0:
                raise RuntimeError("raw bwrap run failed")
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    rate = done / (time.perf_counter() - start)
    await backend.shutdown()
    return rate


def pool_figures(seconds: float, concurrency: int) -> dict:
    import ray

    from rayrl.sandbox.pool import SandboxPool
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    pool = ray.remote(SandboxPool).options(max_concurrency=10_000).remote(
        [Profile()], min_idle=concurrency + 2, max_total=64)
    ray.get(pool.warm.remote())

    async def execs():
        leases = [await pool.lease.remote() for _ in range(concurrency)]
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop(lease):
            nonlocal done
            while time.perf_counter() < deadline:
                result = await pool.exec.remote(lease, "true")
                assert result.exit_code == 0
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop(lease) for lease in leases))
        rate = done / (time.perf_counter() - start)
        for lease in leases:
            await pool.release.remote(lease)
        return rate

    async def acquire_latencies(n: int = 300):
        out = []
        for _ in range(n):
            start = time.perf_counter()
            lease = await pool.lease.remote()
            out.append((time.perf_counter() - start) * 1000)
            await pool.release.remote(lease)
        return np.array(out)

    rate = asyncio.run(execs())
    lat = asyncio.run(acquire_latencies())
    stats = ray.get(pool.shutdown.remote())
    ray.shutdown()
    return {"pool_exec_per_s": rate, "acquire_p50_ms": float(np.percentile(lat, 50)),
            "acquire_p99_ms": float(np.percentile(lat, 99)), "pool_stats": stats}


def mem_available_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


async def live_figures(n: int) -> dict:
    """Hold n sandboxes at once; memory per sandbox from the drop in MemAvailable."""
    from rayrl.sandbox.bwrap import BwrapBackend
    backend = BwrapBackend()
    before = mem_available_mb()
    sandboxes, start = [], time.perf_counter()
    try:
        for i in range(0, n, 50):
            sandboxes += await asyncio.gather(*(backend.create(Profile()) for _ in range(min(50, n - i))))
            if (i // 50) % 5 == 0:
                print(f"  live sandboxes: {len(sandboxes)}", flush=True)
        start_s = time.perf_counter() - start
        await asyncio.sleep(1.0)
        used = before - mem_available_mb()
        alive = sum(await asyncio.gather(*(s.alive() for s in sandboxes)))
    finally:
        await asyncio.gather(*(s.close() for s in sandboxes), return_exceptions=True)
        await backend.shutdown()
    return {"live_sandboxes": int(alive), "mem_per_sandbox_mb": used / max(len(sandboxes), 1),
            "live_start_s": start_s}


async def docker_start_ms(samples: int = 10) -> float | None:
    """Median create+start of a sandbox container on a private engine; None if none can start."""
    from rayrl.sandbox.docker import DockerBackend
    from rayrl.sandbox.dockerd import start_in_free_slot
    from rayrl.sandbox.image import ensure_image_sync
    daemon = start_in_free_slot()
    if isinstance(daemon, str):
        print(f"  docker: no engine ({daemon})")
        return None
    try:
        image = await asyncio.to_thread(ensure_image_sync, daemon.url)
        backend = DockerBackend(url=daemon.url)
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            box = await backend.create(Profile(name="docker", backend="docker", image=image))
            times.append((time.perf_counter() - start) * 1000)
            await box.close()
        await backend.shutdown()
        return float(np.median(times))
    finally:
        daemon.stop()


def main(argv: list[str]) -> None:
    args = parse(argv, __doc__, DEFAULTS)
    seconds, live_n, concurrency = args["seconds"], args["live"], args["concurrency"]
    raw = asyncio.run(raw_bwrap_per_s(seconds, concurrency))
    pool = pool_figures(seconds, concurrency)
    live = asyncio.run(live_figures(live_n))
    docker = asyncio.run(docker_start_ms())
    ratio = pool["pool_exec_per_s"] / raw
    print(f"\n{'measure':<44}{'value':>12}   target")
    rows = [("raw bwrap start+exec of `true` / s", raw, "baseline"),
            ("pool exec of `true` in warm sandboxes / s", pool["pool_exec_per_s"], f">= 0.9 x raw ({ratio:.2f}x)"),
            ("warm lease latency p50, ms", pool["acquire_p50_ms"], ""),
            ("warm lease latency p99, ms", pool["acquire_p99_ms"], "< 5"),
            ("live sandboxes held at once", live["live_sandboxes"], ">= 1000"),
            ("memory per live sandbox, MB", live["mem_per_sandbox_mb"], ""),
            (f"time to start {live_n} sandboxes, s", live["live_start_s"], ""),
            ("docker create+start, ms (median)", docker if docker is not None else float("nan"), "")]
    for name, value, target in rows:
        print(f"{name:<44}{value:>12.2f}   {target}")
    print(f"({concurrency} concurrent clients for the throughput rows, {seconds:.0f} s each)")
    print(json.dumps({"raw_exec_per_s": round(raw, 1), "pool_exec_per_s": round(pool["pool_exec_per_s"], 1),
                      "pool_over_raw": round(ratio, 3), "acquire_p50_ms": round(pool["acquire_p50_ms"], 3),
                      "acquire_p99_ms": round(pool["acquire_p99_ms"], 3), "live_sandboxes": live["live_sandboxes"],
                      "mem_per_sandbox_mb": round(live["mem_per_sandbox_mb"], 2),
                      "live_start_s": round(live["live_start_s"], 2),
                      "docker_start_ms": None if docker is None else round(docker, 1), "concurrency": concurrency}))


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
