"""Specialize-then-Unify end to end through `ray job submit` against a local head.

Two domains, a few steps: the experts are trained, the student is distilled from them on its own
samples, the job must end SUCCEEDED, and the student's reverse KL to its teachers must fall.
"""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with the dashboard (job server), from this interpreter's environment.

    `ray start --block` in a session of its own, stopped by signalling that process group: `ray
    stop` would kill every Ray instance on the machine (this test session's own local one too)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    # The token is given to the head and the CLI alike: with none in ~/.ray yet (a fresh machine),
    # a submission racing the head's start-up wrote a token of its own and was refused.
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    # Every port the head would otherwise take at its fixed default is given a free one: the test
    # session's own Ray already holds the dashboard agent's 52365, and a head whose agent cannot bind
    # answers every submission with "No available agent".
    ports = {flag: free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "ray-client-server-port",
                                            "runtime-env-agent-port")}
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray, "start", "--head", "--block", "--include-dashboard=true", "--disable-usage-stats",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=8",
                             *(f"--{flag}={port}" for flag, port in ports.items())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield ray, f"http://127.0.0.1:{dashboard}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_unify_distill_through_ray_job_submit(ray_head, tmp_path):
    ray, address, env = ray_head
    run_dir = tmp_path / "unify"
    args = ["unify.domains=[terminal,general]", "trainer.sft.steps=60", "trainer.total_steps=2",
            "task.eval_size=8", "unify.base_sft_steps=30", "distill.steps=8", "distill.lr=1e-3",
            "distill.baseline=false", "run.progress=false", f"run.dir={run_dir}"]
    for _ in range(36):   # the head and its job agent come up a little after `ray start`
        submitted = subprocess.run([ray, "job", "submit", "--address", address, "--working-dir", ROOT, "--no-wait",
                                    "--", "python", "recipes/unify_distill.py", *args],
                                   env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if submitted.returncode == 0:
            break
        time.sleep(5)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    deadline, status = time.monotonic() + 1300, ""
    while time.monotonic() < deadline:
        checked = subprocess.run([ray, "job", "status", "--address", address, job], env=env,
                                 capture_output=True, text=True, timeout=60)
        status = checked.stdout + checked.stderr   # the CLI logs the status to stderr
        if re.search(r"succeeded|failed|stopped", status, re.I):
            break
        time.sleep(5)
    fetched = subprocess.run([ray, "job", "logs", "--address", address, job], env=env,
                             capture_output=True, text=True, timeout=60)
    logs = fetched.stdout + fetched.stderr
    assert re.search(r"succeeded", status, re.I), status + logs[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["domains"]) == {"terminal", "general"}
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [h["reverse_kl"] for h in history if "reverse_kl" in h]
    assert len(kl) == 8
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3, kl     # the student moves toward its teachers
    assert "on-policy" in logs and (run_dir / "unify.png").exists()
