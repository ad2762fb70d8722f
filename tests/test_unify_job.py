"""Specialize-then-Unify end to end through `ray job submit` against a local head.

Two domains, a few steps: the experts are trained, the student is distilled from them on its own
samples, the job must end SUCCEEDED, and the student's reverse KL to its teachers must fall.
"""

import json
import re

import pytest

from tests.ray_head import ray_head


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_unify_distill_through_ray_job_submit(tmp_path):
    run_dir = tmp_path / "unify"
    args = ["unify.domains=[terminal,general]", "trainer.sft.steps=60", "trainer.total_steps=2",
            "task.eval_size=8", "unify.base_sft_steps=30", "distill.steps=8", "distill.lr=2e-4",
            "distill.baseline=false", "run.progress=false", f"run.dir={run_dir}"]
    with ray_head() as head:
        status, logs = head.wait(head.submit(["python", "recipes/unify_distill.py", *args]), timeout_s=1300)
    assert re.search(r"succeeded", status, re.I), status + logs[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["domains"]) == {"terminal", "general"}
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [h["reverse_kl"] for h in history if "reverse_kl" in h]
    assert len(kl) == 8
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3, kl     # the student moves toward its teachers
    assert "on-policy" in logs and (run_dir / "unify.png").exists()
