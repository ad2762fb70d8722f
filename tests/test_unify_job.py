"""Specialize-then-Unify end to end through `ray job submit` against a local head.

Two domains, a few steps: the experts are trained, the student is distilled from them on its own
samples, the job must end SUCCEEDED, and the student's reverse KL to its teachers must fall. The job
is stopped twice on the way (during the terminal expert's GRPO, the experts training two at once,
then during the distillation) and each time submitted again with run.resume, which must continue
where it stopped.
"""

import contextlib
import json
import os
import re
import signal
import threading

import pytest

from tests.ray_head import ray_head
from tests.test_config import ROOT

RECIPES = [str(ROOT / "recipes" / "train_expert.yaml"), str(ROOT / "recipes" / "unify_distill.yaml")]


def records(path) -> list[dict]:
    """The whole lines of a (running) run's metrics.jsonl."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]


@contextlib.contextmanager
def sigterm_once_logged(count: int, *metrics):
    """SIGTERM to this process, as `ray job stop` sends the driver (its main thread gets it), once
    every path of `metrics` holds `count` records; none once the body has returned or raised."""
    finished = threading.Event()

    def stop():
        while min(len(records(m)) for m in metrics) < count:
            if finished.wait(0.05):
                return
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    try:
        yield
    finally:
        finished.set()
        stopper.join()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_unify_distill_through_ray_job_submit_stopped_and_resumed(tmp_path):
    """The job is stopped (`ray job stop`) while its experts train (unify.parallel_experts=2: each
    in a Ray task of its own, which the stop cancels), then submitted again with run.resume: it
    reuses the base and continues the terminal expert from its last step. That job is
    stopped during the distillation and submitted again: it continues the distillation from its
    last step and completes."""
    run_dir = tmp_path / "unify"
    args = ["unify.domains=[terminal,general]", "trainer.sft.steps=40", "trainer.total_steps=4",
            "task.eval_size=8", "unify.base_sft_steps=30", "distill.steps=16", "distill.lr=1e-3",
            "learner.num_workers=1", "unify.parallel_experts=2",
            "distill.baseline=false", "run.progress=false", f"run.dir={run_dir}"]
    resume = ["python", "recipes/unify_distill.py", f"run.resume={run_dir}"]
    expert_metrics = run_dir / "experts" / "terminal" / "metrics.jsonl"

    def stopped_with_one_checkpoint(head, job, metrics, checkpoints) -> tuple[int, str]:
        """Stops `job` once `metrics` holds an RL step; returns the one step_<N> it saved and its log."""
        asked = []

        def stop_once_in_rl():
            if not asked and any(r["step"] > 0 for r in records(metrics)):
                head.stop(job)
                asked.append(job)
        status, logs = head.wait(job, timeout_s=600, poll=stop_once_in_rl)
        assert re.search(r"stopped", status, re.I), status + logs[-4000:]
        saved = [c for c in os.listdir(checkpoints) if c.startswith("step_")]
        assert len(saved) == 1 and "saving" in logs, logs[-4000:]
        return int(saved[0].split("_")[1]), logs

    with ray_head() as head:
        expert_step, _ = stopped_with_one_checkpoint(
            head, head.submit(["python", "recipes/unify_distill.py", *args]), expert_metrics,
            run_dir / "experts" / "terminal" / "checkpoints")
        assert 1 <= expert_step < 4
        base_records = [r["step"] for r in records(run_dir / "metrics.jsonl")]

        distill_step, logs = stopped_with_one_checkpoint(head, head.submit(resume), run_dir / "metrics.jsonl",
                                                         run_dir / "checkpoints")
        assert "base: reusing" in logs and \
            f"resumed from {run_dir}/experts/terminal/checkpoints/step_{expert_step}" in logs, logs[-4000:]
        assert 1 <= distill_step < 16

        status, logs = head.wait(head.submit(resume), timeout_s=1000)
    assert re.search(r"succeeded", status, re.I), status + logs[-4000:]
    assert f"on-policy distillation: resumed from {run_dir}/checkpoints/step_{distill_step}" in logs, logs[-4000:]
    # The expert's steps, the base's SFT updates and the distillation's steps are each logged once,
    # as in an unstopped run.
    assert [r["step"] for r in records(expert_metrics) if r["step"] > 0] == [1, 2, 3, 4]
    assert base_records == list(range(-29, 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["domains"]) == {"terminal", "general"}
    history = records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in history] == base_records + list(range(1, 17))
    kl = [h["reverse_kl"] for h in history if "reverse_kl" in h]
    assert len(kl) == 16
    # The student moves toward its teachers. Over 8 updates at 2e-4 the fall (if any) was within the
    # step-to-step noise of the domain mix (CI: 2.39 -> 2.41); over 16 at 1e-3 it was 2.4 -> 1.9.
    assert sum(kl[-4:]) / 4 < sum(kl[:4]) / 4, kl
    assert "on-policy" in logs and (run_dir / "unify.png").exists()
    # Generators and graders end their background tasks cleanly before they are killed (kill_closed).
    assert "Task was destroyed but it is pending" not in logs and "never retrieved" not in logs, logs[-4000:]


def test_a_unify_run_resumes_only_as_it_was_configured(tmp_path):
    from rayrl.config import ConfigError, UnifyConfig, load, to_dict
    run_dir = tmp_path / "unify"
    with pytest.raises(ConfigError, match="no unify_distill run there"):
        load(UnifyConfig, None, [f"run.resume={run_dir}"])
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(to_dict(load(UnifyConfig, None, ["distill.lr=1e-4"]))))
    with pytest.raises(ConfigError, match=r"distill.lr: saved 0.0001, this run 0.0005"):
        load(UnifyConfig, None, [f"run.resume={run_dir}"])
    with pytest.raises(ConfigError, match="give one of them"):
        load(UnifyConfig, None, [f"run.resume={run_dir}", "distill.lr=1e-4", f"unify.reuse={run_dir}"])
    assert load(UnifyConfig, None, [f"run.resume={run_dir}", "distill.lr=1e-4", "run.progress=false"])


def test_a_reused_experts_score_counts_only_if_measured_the_same_way(tmp_path):
    from rayrl.config import UnifyConfig, load
    from rayrl.unify import reused_expert

    expert_dir = tmp_path / "experts" / "terminal"
    (expert_dir / "checkpoints" / "final").mkdir(parents=True)
    (expert_dir / "checkpoints" / "final" / "config.json").write_text("{}")
    assert reused_expert(load(UnifyConfig, None, []), "terminal", str(tmp_path)) is None   # not written whole
    (expert_dir / "checkpoints" / "final" / "trainer_state.json").write_text("{}")
    (expert_dir / "summary.json").write_text(json.dumps({"eval_after": 0.4}))
    (expert_dir / "config.json").write_text(json.dumps(
        {"task": {"eval_size": 40}, "trainer": {"eval": {"temperature": 0.0, "samples": 1}}}))
    same = load(UnifyConfig, None, ["task.eval_size=40"])
    assert reused_expert(same, "terminal", str(tmp_path))["eval"] == 0.4
    for other in (["task.eval_size=20"], ["trainer.eval.temperature=1.0", "trainer.eval.samples=4"]):
        found = reused_expert(load(UnifyConfig, None, other), "terminal", str(tmp_path))
        assert found["path"].endswith("final") and found["eval"] is None   # measured again


@pytest.mark.slow
def test_a_unify_run_stopped_in_its_base_sft_continues_it(ray_session, tmp_path, capsys):
    """A stop (SIGTERM: `ray job stop`) during the base's SFT saves its last whole update; the
    resumed run continues the SFT from there instead of starting it over."""
    from rayrl.config import UnifyConfig, load_recipe, to_dict
    from rayrl.metrics import MetricsLogger
    from rayrl.unify import resume_point, train_base

    run_dir, steps, stop_after = tmp_path / "unify", 40, 15
    args = ["unify.domains=[general]", f"unify.base_sft_steps={steps}", "trainer.sft.batch_size=8",
            "task.eval_size=4", "run.progress=false", f"run.dir={run_dir}"]
    metrics = run_dir / "metrics.jsonl"

    cfg = load_recipe(UnifyConfig, RECIPES, args)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))   # as the recipe's start_run writes it
    log = MetricsLogger(str(run_dir), export_to_ray=False)
    with sigterm_once_logged(stop_after, metrics), pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        train_base(cfg, str(run_dir), None, log)
    log.close()
    done = len(records(metrics))
    assert stop_after <= done < steps
    assert resume_point(str(run_dir)) == str(run_dir / "checkpoints" / f"sft_{done}")   # the last logged update

    log = MetricsLogger(str(run_dir), export_to_ray=False)
    base = train_base(load_recipe(UnifyConfig, RECIPES, [*args, f"run.resume={run_dir}"]), str(run_dir),
                      str(run_dir), log)
    log.close()
    assert f"base: SFT {steps} steps on general, resumed from {run_dir}/checkpoints/sft_{done}" in capsys.readouterr().out
    assert base == str(run_dir / "checkpoints" / "base") == resume_point(str(run_dir))
    logged = records(metrics)
    assert [r["step"] for r in logged] == list(range(-steps + 1, 1))   # each update once
    # The resumed updates start from the stopped one's weights, not from the untrained model.
    assert logged[done]["sft_nll"] < 0.5 * logged[0]["sft_nll"], [r["sft_nll"] for r in logged]


@pytest.mark.slow
def test_the_off_policy_baseline_stopped_part_way_continues_where_it_stopped(ray_session, tmp_path, capsys):
    """The off-policy baseline, stopped part way, saves its last whole update; the resumed run
    continues it there (its updates logged once each) instead of starting it over."""
    from rayrl.config import UnifyConfig, load_recipe
    from rayrl.models import resolve_model_path
    from rayrl.unify import offpolicy_baseline, student_config

    run_dir, steps, stop_after = tmp_path / "unify", 12, 4
    cfg = load_recipe(UnifyConfig, RECIPES, [
        "unify.domains=[general]", f"distill.steps={steps}", "trainer.groups_per_step=2", "rollout.group_size=2",
        "task.eval_size=4", "run.progress=false", f"run.dir={run_dir}"])
    base = resolve_model_path(cfg.model)   # the untrained tiny model, as base and as the expert
    experts = {"general": {"path": base, "eval": None}}
    metrics = run_dir / "offpolicy" / "metrics.jsonl"
    with sigterm_once_logged(stop_after, metrics), pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        offpolicy_baseline(cfg, student_config(cfg), str(run_dir), experts, base, resume=False)
    done = len(records(metrics))
    assert stop_after <= done < steps
    saved = run_dir / "offpolicy" / "checkpoints" / f"sft_{done}"
    assert (saved / "trainer_state.json").exists()

    scores, history = offpolicy_baseline(cfg, student_config(cfg), str(run_dir), experts, base, resume=True)
    assert f"off-policy baseline: resumed from {saved}\n" in capsys.readouterr().out
    assert [r["step"] for r in history] == [r["step"] for r in records(metrics)] == list(range(-steps + 1, 1))
    assert set(scores) == {"general"} and 0.0 <= scores["general"] <= 1.0


@pytest.mark.slow
def test_experts_trained_in_parallel_save_on_a_stop_and_continue_on_resume(ray_session, tmp_path, capsys):
    """With unify.parallel_experts=2 both experts train at once, each in a Ray task of its own. A
    stop of the driver (SIGTERM) reaches both: each saves its last whole update (SFT or GRPO: their
    spawns may finish seconds apart), and the resumed run continues both from there to their final
    checkpoints, every update logged once."""
    from rayrl.config import UnifyConfig, load_recipe, to_dict
    from rayrl.models import resolve_model_path
    from rayrl.unify import train_experts

    run_dir, sft_steps, grpo_steps, stop_after = tmp_path / "unify", 80, 2, 4
    args = ["unify.domains=[general,websearch]", "unify.parallel_experts=2", f"trainer.sft.steps={sft_steps}",
            "trainer.sft.batch_size=8", f"trainer.total_steps={grpo_steps}", "trainer.groups_per_step=2", "rollout.group_size=2",
            "task.eval_size=4", "learner.num_workers=1", "run.progress=false", f"run.dir={run_dir}"]
    cfg = load_recipe(UnifyConfig, RECIPES, args)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))   # as the recipe's start_run writes it
    base = resolve_model_path(cfg.model)
    metrics = {d: run_dir / "experts" / d / "metrics.jsonl" for d in ("general", "websearch")}
    with sigterm_once_logged(stop_after, *metrics.values()), \
            pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        train_experts(cfg, str(run_dir), None, base)
    assert "waiting for the experts general, websearch to save their last whole step" in capsys.readouterr().out
    done = {d: len(records(m)) for d, m in metrics.items()}
    for d, n in done.items():   # each saved its last logged update
        assert stop_after <= n < sft_steps + grpo_steps, done
        saved = f"sft_{n}" if n <= sft_steps else f"step_{n - sft_steps}"
        assert (run_dir / "experts" / d / "checkpoints" / saved / "trainer_state.json").exists(), (d, n)

    resumed = load_recipe(UnifyConfig, RECIPES, [*args, f"run.resume={run_dir}"])
    experts = train_experts(resumed, str(run_dir), str(run_dir), base)
    out = capsys.readouterr().out
    assert list(experts) == ["general", "websearch"]
    for d, n in done.items():
        assert f"expert {d}: SFT {sft_steps} steps, GRPO {grpo_steps} steps, resumed from " in out
        assert experts[d]["path"] == str(run_dir / "experts" / d / "checkpoints" / "final")
        assert 0.0 <= experts[d]["eval"] <= 1.0
        assert [r["step"] for r in records(metrics[d])] == list(range(-sft_steps + 1, grpo_steps + 1))   # once each


@pytest.mark.slow
def test_an_expert_failing_in_parallel_leaves_the_others_to_finish(ray_session, tmp_path, capsys):
    """One of two experts trained at once fails (its base is no model): the other finishes to its
    final checkpoint, and the error names the failed expert and its cause."""
    from rayrl.config import UnifyConfig, load_recipe
    from rayrl.models import resolve_model_path
    from rayrl.unify import ExpertsFailed, expert_config, train_in_parallel

    cfg = load_recipe(UnifyConfig, RECIPES, [
        "unify.domains=[general,websearch]", "unify.parallel_experts=2", "trainer.sft.steps=4", "trainer.sft.batch_size=8",
        "trainer.total_steps=1", "trainer.groups_per_step=2", "rollout.group_size=2", "task.eval_size=4",
        "learner.num_workers=1", "run.progress=false", f"run.dir={tmp_path}"])
    good = expert_config(cfg, "general", str(tmp_path), resolve_model_path(cfg.model))
    bad = expert_config(cfg, "websearch", str(tmp_path), str(tmp_path / "no-model"))
    with pytest.raises(ExpertsFailed, match=r"expert websearch failed: \w+Error: .*no-model.* \(the experts general "
                                            "finished; run.resume continues the failed ones"):
        train_in_parallel(cfg, [("[1/2] expert general", "general", good), ("[2/2] expert websearch", "websearch", bad)])
    assert (tmp_path / "experts" / "general" / "checkpoints" / "final" / "config.json").exists()
    assert "expert general: held-out " in capsys.readouterr().out
