"""A Ray head of a test's own, for what goes through `ray job submit`: the dashboard's job server and
the node's Prometheus metrics.

The test session's Ray (tests/conftest.py) and other Ray instances on the machine are left alone:
every port the head would take at a fixed default gets a free one, its files (and the machine-wide
"current cluster" address file) live in a temporary directory of its own (`ray_env`), and the head
is stopped by signalling its own process group (`ray stop` would stop every Ray instance on the
machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    cli: str            # the `ray` executable of this interpreter's environment
    address: str        # the dashboard (job server), http://127.0.0.1:PORT
    env: dict           # environment for the CLI: the head's auth token, no RAY_ADDRESS
    metrics_port: int   # the head node's Prometheus endpoint (ray.util.metrics of its processes)
    process: subprocess.Popen   # `ray start --head --block`
    log: str            # its output

    def submit(self, entrypoint: list[str], working_dir: str = ROOT, tries: int = 36) -> str:
        """`ray job submit --no-wait`; returns the job id. Retried while the head and its job
        agent come up (a little after `ray start` returns), not once the head has exited."""
        for _ in range(tries):
            if self.process.poll() is not None:
                with open(self.log, errors="replace") as f:
                    raise AssertionError(f"the Ray head exited with status {self.process.returncode}:\n"
                                         + f.read()[-4000:])
            submitted = subprocess.run([self.cli, "job", "submit", "--address", self.address,
                                        "--working-dir", working_dir, "--no-wait", "--", *entrypoint],
                                       env=self.env, capture_output=True, text=True, timeout=300, cwd=working_dir)
            if submitted.returncode == 0:
                return re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
            time.sleep(5)
        raise AssertionError("ray job submit kept failing:\n" + submitted.stdout + submitted.stderr)

    def api(self, method: str, path: str) -> dict:
        """The job server's REST API (what the `ray job` CLI calls), with the head's token. Polling
        through the CLI cost a process of about 2 s of CPU per look, a quarter of a 2-core machine
        taken from the job under test."""
        request = urllib.request.Request(self.address + path, method=method,
                                         headers={"Authorization": "Bearer " + self.env["RAY_AUTH_TOKEN"]})
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read().decode())

    def stop(self, job: str) -> None:
        """`ray job stop --no-wait`: the driver gets SIGTERM (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S)."""
        self.api("POST", f"/api/jobs/{job}/stop")

    def wait(self, job: str, timeout_s: float, poll=None) -> tuple[str, str]:
        """Polls the job until it ends or `timeout_s` passes, calling `poll()` (if given) at each
        look; returns (status and its message, job logs)."""
        deadline, status = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            if poll is not None:
                poll()
            info = self.api("GET", f"/api/jobs/{job}")
            status = f"{info['status']}: {info.get('message') or ''}"
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
        return status, self.api("GET", f"/api/jobs/{job}/logs")["logs"]

    def metrics(self) -> str:
        """The Prometheus text the head node exports ('' while the exporter is not up yet)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
                return r.read().decode()
        except OSError:
            return ""


@contextlib.contextmanager
def ray_env(**extra):
    """Environment for Ray processes of a test's own: this interpreter's `ray` first on PATH, no
    RAY_ADDRESS, and a temporary RAY_TMPDIR (short: Ray's unix sockets live under it), removed
    afterwards. Without it a new cluster rewrites /tmp/ray/ray_current_cluster, which `ray.init()`
    and the CLI of every other Ray user on the machine read."""
    tmp = tempfile.mkdtemp(prefix="rayrl-", dir="/tmp")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               RAY_TMPDIR=tmp, **extra)
    env.pop("RAY_ADDRESS", None)
    try:
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def ray_head(num_cpus: int = 8):
    """A Ray head with the dashboard (job server), from this interpreter's environment.

    `ray start --block` in a session of its own, stopped by signalling that process group. The
    token is given to the head and the CLI alike: with none in ~/.ray yet (a fresh machine), a
    submission racing the head's start-up wrote a token of its own and was refused."""
    # `ray job stop` gives a job's driver this long to save before SIGKILL (the cluster manifests' value).
    with ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_JOB_STOP_WAIT_TIME_S="300") as env:
        dashboard = free_port()
        # The test session's own Ray already holds the dashboard agent's 52365, and a head whose
        # agent cannot bind answers every submission with "No available agent".
        ports = {flag: free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "metrics-export-port", "ray-client-server-port",
                                                "runtime-env-agent-port")}
        cli = os.path.join(os.path.dirname(sys.executable), "ray")
        log = os.path.join(env["RAY_TMPDIR"], "head.log")
        with open(log, "wb") as out:
            head = subprocess.Popen([cli, "start", "--head", "--block", "--include-dashboard=true",
                                     "--disable-usage-stats", f"--dashboard-port={dashboard}",
                                     "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}",
                                     *(f"--{flag}={port}" for flag, port in ports.items())],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def interrupt(signum, frame):   # pytest killed by SIGTERM (e.g. `timeout`) still stops the head
            raise KeyboardInterrupt(f"signal {signum}")
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            yield RayHead(cli, f"http://127.0.0.1:{dashboard}", env, ports["metrics-export-port"], head, log)
        finally:
            signal.signal(signal.SIGTERM, previous)
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
