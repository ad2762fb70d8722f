"""SRPO: the stage schedule's rules and config, and one short end-to-end run of recipes/srpo.py on
Ray with everything this issue added switched on (History Resampling, two stages with a plateau
switch, a tiny MoE with MCLA and routing replay)."""

import json
from pathlib import Path

import pytest

from rayrl.config import ConfigError, SRPOConfig, StageConfig, load
from rayrl.srpo import plateaued, stage_done

YAML = str(Path(__file__).resolve().parent.parent / "recipes" / "srpo.yaml")


def test_plateau_needs_patience_evaluations_without_a_gain():
    assert not plateaued([0.1, 0.2], patience=0, delta=0.0)
    assert not plateaued([0.1, 0.2], patience=2, delta=0.0)           # too few evaluations yet
    assert plateaued([0.3, 0.31, 0.305], patience=2, delta=0.02)      # no gain of 0.02 over 0.3
    assert not plateaued([0.3, 0.31, 0.35], patience=2, delta=0.02)
    assert plateaued([0.5, 0.4, 0.45], patience=2, delta=0.0)         # below the earlier best


def test_a_stage_ends_by_steps_or_by_plateau():
    stage = StageConfig(steps=10, plateau_patience=1, plateau_delta=0.05)
    assert stage_done(stage, 10, []) == "steps"
    assert stage_done(stage, 4, [0.2, 0.22]) == "plateau"
    assert stage_done(stage, 4, [0.2, 0.3]) is None
    assert stage_done(StageConfig(steps=10), 4, [0.2, 0.2]) is None   # patience 0: by steps only


def test_a_failed_stage_evaluation_scores_nothing_and_the_stage_still_ends_by_steps(ray_session, capsys):
    from types import SimpleNamespace

    from rayrl.pipeline import EvaluationError, Trainer
    from rayrl.srpo import StageHook

    @ray_session.remote
    class Buffer:
        def __init__(self):
            self.stages = []

        def set_stage(self, domains):
            self.stages.append(dict(domains))

    # Stage 1 (3 steps, plateau after 1 evaluation without a gain of 0.05) is evaluated every step.
    outcomes = iter([{"math": 0.2}, None, {"math": 0.21}, {"math": 0.3, "code": 0.5}])

    def evaluate_domains():
        scores = next(outcomes)
        if scores is None:
            raise EvaluationError("the infrastructure failed under all 4 held-out episodes of domain math")
        return scores

    trainer = SimpleNamespace(roles=SimpleNamespace(buffer=Buffer.remote()), evaluate_domains=evaluate_domains)
    trainer.monitor_evaluation = lambda step: Trainer.monitor_evaluation(trainer, step)
    spec = SimpleNamespace(eval_every=1, stages=[
        StageConfig(name="math", domains={"math": 1.0}, steps=3, plateau_patience=1, plateau_delta=0.05),
        StageConfig(name="mix", domains={"math": 0.5, "code": 0.5}, steps=1)])
    hook = StageHook(trainer, spec)
    records = [{} for _ in range(4)]
    assert not hook(1, records[0])
    # The failed evaluation adds no score, so it neither ends the stage nor counts toward a plateau.
    assert not hook(2, records[1]) and "domain math" in records[1]["eval_error"] and "eval" not in records[1]
    assert not hook(3, records[2])                         # 0.21: a plateau, but step 3 ends it first
    assert hook.rows[0]["ended_by"] == "steps" and hook.rows[0]["eval"] == {"math": 0.21}
    assert hook(4, records[3]) and hook.rows[1]["eval"] == {"math": 0.3, "code": 0.5}
    assert ray_session.get(trainer.roles.buffer.__ray_call__.remote(lambda b: b.stages)) == [
        {"math": 1.0}, {"math": 0.5, "code": 0.5}]
    assert "step 2: held-out evaluation failed, training goes on" in capsys.readouterr().out


def test_stage_list_elements_can_be_overridden():
    cfg = load(SRPOConfig, YAML, ["srpo.stages.0.steps=7", "srpo.stages.1.domains.code=0.5",
                                  "srpo.stages.0.domains.code=0.25"])   # a domain the stage did not have
    assert cfg.srpo.stages[0].steps == 7
    assert cfg.srpo.stages[1].domains == {"math": 0.75, "code": 0.5}
    assert cfg.srpo.stages[0].domains == {"math": 1.0, "code": 0.25}
    assert cfg.replay.resampling == "history" and cfg.replay.prompts > 0


@pytest.mark.parametrize("args, key", [
    (["srpo.stages.3.steps=2"], "srpo.stages.3.steps"),
    (["task.name=math"], "srpo.stages.1.domains"),                    # stage 2 needs code
    (["replay.prompts=0"], "replay.prompts"),
    (["srpo.eval_every=0"], "srpo.stages.0.plateau_patience"),
    (["srpo.stages.0.steps=0"], "srpo.stages.0"),
    (["srpo.stages.0.stepz=3"], "srpo.stages.0 has no key 'stepz'. Did you mean: 'steps'?"),
    (["srpo.stages.x.steps=3"], "a list's elements are set by number"),
])
def test_bad_schedules_fail_naming_the_key(args, key):
    with pytest.raises(ConfigError) as err:
        load(SRPOConfig, YAML, args)
    assert key in str(err.value)


def test_srpo_run_switches_stages_and_saves_the_resampling_record(ray_session, tmp_path):
    from rayrl.srpo import srpo
    cfg = load(SRPOConfig, YAML, [
        f"run.dir={tmp_path}", "run.progress=false", "task.eval_size=4", "replay.prompts=8",
        "rollout.group_size=4", "rollout.max_new_tokens=24", "trainer.groups_per_step=4",
        "trainer.sft.steps=10", "trainer.sft.batch_size=16", "srpo.eval_every=1",
        "srpo.stages.0.steps=3", "srpo.stages.0.plateau_patience=1", "srpo.stages.0.plateau_delta=0.5",
        "srpo.stages.1.steps=2",
        "model.tiny.family=qwen3_moe", "model.tiny.router_noise=0.5", "model.tiny.num_layers=1",
        "learner.loss.mcla.k=2", "learner.loss.mcla.routing_replay=true",
        "replay.curate_samples=2", "replay.curate_drop=solved"])
    summary = srpo(cfg)

    names = [s["name"] for s in summary["stages"]]
    assert names == ["initial", "warm start", "stage 1: math", "stage 2: math + code"]
    stage1, stage2 = summary["stages"][2:]
    # No evaluation can gain 0.5 over the first: stage 1 plateaus after its second evaluation.
    assert (stage1["ended_by"], stage1["steps"], stage2["ended_by"], stage2["steps"]) == ("plateau", 2, "steps", 2)
    for row in summary["stages"]:
        assert set(row["eval"]) == {"math", "code"}
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["stages"][-1]["eval"] == summary["eval_after"]

    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rl = [s for s in steps if s.get("phase") != "sft"]
    assert [s["stage"] for s in rl] == [1, 1, 2, 2]
    assert all("eval/math" in s and 0.0 <= s["effective_ratio"] <= 1.0 for s in rl)
    assert not any("domain/code/tokens" in s for s in rl if s["stage"] == 1)   # stage 1 is math only
    assert all(s["learner/is_weight_max"] < float("inf") and s["learner/loss"] == s["learner/loss"] for s in rl)

    state = json.loads((tmp_path / "checkpoints" / "final" / "replay_state.json").read_text())
    records = state["prompts"]["records"]
    assert state["prompts"]["history"] and any(k.startswith("math:") for k in records)
    # Curated before the first RL step: only the prompts it kept were handed out.
    curation = summary["curation"]
    assert curation["kept"] + curation["dropped_solved"] == 16 and curation["dropped_unsolved"] == 0
    assert len(state["prompts"]["keys"]) == curation["kept"] and set(records) <= set(state["prompts"]["keys"])
    assert all(correct <= valid for rows in records.values() for _, correct, valid in rows)
