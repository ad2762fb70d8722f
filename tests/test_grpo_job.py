"""GRPO through `ray job submit` against a local head, watched through the head's metrics endpoint:
the job must end SUCCEEDED, and the step metrics the dashboard charts (rollout throughput, reward,
staleness, learner step time, IS diagnostics, buffer sizes) must be exported as rayrl_* gauges."""

import re
import time

import pytest

from tests.ray_head import ray_head

# The dashboard quantities, as the gauges rayrl.metrics.MetricsLogger exports for metrics.jsonl keys
# (Ray adds the "ray_" prefix).
DASHBOARD_GAUGES = ("rollout_tokens_per_s", "samples_per_s", "reward_mean", "staleness_mean", "staleness_max",
                    "learner_step_s", "learner_is_weight_mean", "learner_is_weight_max", "learner_is_masked_frac",
                    "learner_mismatch_kl", "buffer_size", "buffer_outstanding")


def gauges(text: str, run_dir) -> dict[str, float]:
    """{rayrl gauge name without prefixes: value} of the run in `run_dir`, from Prometheus text."""
    found = re.findall(r'^ray_rayrl_(\w+)\{[^}]*\brun="([^"]*)"[^}]*\} (\S+)$', text, re.M)
    return {name: float(value) for name, run, value in found if run == str(run_dir)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grpo_through_ray_job_submit_exports_its_step_metrics(tmp_path):
    run_dir = tmp_path / "grpo"
    args = ["trainer.sft.steps=30", "trainer.total_steps=8", "trainer.groups_per_step=4", "task.eval_size=16",
            "trainer.eval.every=0", "trainer.eval.initial=false", "learner.num_workers=1",
            "replay.filter_zero_variance=false", "run.progress=false", f"run.dir={run_dir}"]
    with ray_head() as head:
        job = head.submit(["python", "recipes/grpo.py", *args])
        # Gauges live while the driver does (and a few seconds after): scraped while the job runs,
        # as the dashboard does.
        seen: dict[str, float] = {}
        status, logs = head.wait(job, timeout_s=780, poll=lambda: seen.update(gauges(head.metrics(), run_dir)))
        deadline = time.monotonic() + 30
        while "reward_mean" not in seen and time.monotonic() < deadline:   # exported with a delay
            seen.update(gauges(head.metrics(), run_dir))
            time.sleep(2)
    assert re.search(r"succeeded", status, re.I), status + logs[-4000:]
    assert (run_dir / "summary.json").exists()
    # Every worker ran rayrl.worker_setup (merged into the submitted job's runtime env): the job's
    # logs hold the run's lines, not a progress bar per weight load or DeepSpeed's CPU notice.
    assert "held-out accuracy, after RL" in logs
    assert not [n for n in ("Loading weights", "Setting accelerator to CPU", "all_gather_into_tensor") if n in logs], logs
    missing = [g for g in DASHBOARD_GAUGES if g not in seen]
    assert not missing, f"not exported: {missing}; exported: {sorted(seen)}"
    assert 0.0 <= seen["reward_mean"] <= 1.0 and seen["learner_step_s"] > 0
