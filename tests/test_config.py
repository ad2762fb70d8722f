import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayrl.config import ConfigError, GRPOConfig, load

ROOT = Path(__file__).resolve().parent.parent
RECIPE_YAML = ROOT / "recipes" / "grpo.yaml"


def test_overrides_are_typed_and_merged_over_yaml():
    cfg = load(GRPOConfig, str(RECIPE_YAML), ["trainer.total_steps=20", "trainer.lr=1e-5", "run.dir=/tmp/x"])
    assert cfg.trainer.total_steps == 20 and isinstance(cfg.trainer.total_steps, int)
    assert cfg.trainer.lr == pytest.approx(1e-5)
    assert cfg.run.dir == "/tmp/x"
    assert cfg.trainer.sft.steps == 600  # from the YAML, not the dataclass default


@pytest.mark.parametrize("arg, key", [
    ("trainer.totl_steps=3", "trainer.totl_steps"),
    ("learner.loss.nope=1", "learner.loss.nope"),
    ("trainer.total_steps=abc", "trainer.total_steps"),
    ("replay.filter_zero_variance=maybe", "replay.filter_zero_variance"),
    ("learner.loss.off_policy=vtrace", "learner.loss.off_policy"),
    ("replay.max_staleness=-1", "replay.max_staleness"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("replay.resampling_floor=2", "replay.resampling_floor"),
    ("replay.curate_samples=8", "replay.prompts"),   # curates a finite prompt set
    ("replay.curate_drop=hard", "replay.curate_drop"),
    ("replay.curate_min_pass=1.0", "replay.curate_min_pass"),
    ("replay.curate_min_pass=-0.1", "replay.curate_min_pass"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("trainer.eval.samples=0", "trainer.eval.samples"),
    ("task.eval_fraction=0", "task.eval_fraction"),     # held out nothing: the held-out draw never ended
    ("task.eval_fraction=1", "task.eval_fraction"),
    ("trainer.lr=nan", "trainer.lr"),
    ("trainer.lr=inf", "trainer.lr"),
    ("trainer.eval.temperature=-1", "trainer.eval.temperature"),
    ("task.demo_error=1.5", "task.demo_error"),
    ("rollout.group_size=1", "replay.filter_zero_variance"),   # every group dropped: waited forever
    ("rollout.temperature=0", "replay.filter_zero_variance"),
])
def test_bad_keys_and_values_name_the_key(arg, key):
    with pytest.raises(ConfigError) as err:
        load(GRPOConfig, str(RECIPE_YAML), [arg])
    assert key in str(err.value)


def test_icepop_bounds_must_hold_a_weight_of_one():
    with pytest.raises(ConfigError, match="icepop_low=3.0 and icepop_high=2.0"):
        load(GRPOConfig, str(RECIPE_YAML), ["learner.loss.off_policy=icepop", "learner.loss.icepop_low=3"])
    cfg = load(GRPOConfig, str(RECIPE_YAML), ["rollout.group_size=1", "replay.filter_zero_variance=false"])
    assert cfg.rollout.group_size == 1


def test_several_eval_samples_need_sampling():
    with pytest.raises(ConfigError, match="trainer.eval.temperature > 0"):
        load(GRPOConfig, str(RECIPE_YAML), ["trainer.eval.samples=4", "trainer.eval.temperature=0"])
    cfg = load(GRPOConfig, str(RECIPE_YAML), ["trainer.eval.samples=4", "trainer.eval.temperature=1.0"])
    assert cfg.trainer.eval.samples == 4


def test_a_curation_threshold_needs_unsolved_prompts_to_drop():
    with pytest.raises(ConfigError, match="curate_drop=solved keeps"):
        load(GRPOConfig, str(RECIPE_YAML), ["replay.prompts=8", "replay.curate_samples=4",
                                             "replay.curate_min_pass=0.2", "replay.curate_drop=solved"])
    cfg = load(GRPOConfig, str(RECIPE_YAML), ["replay.prompts=8", "replay.curate_samples=4",
                                               "replay.curate_min_pass=0.2", "replay.curate_drop=both"])
    assert cfg.replay.curate_min_pass == 0.2


def test_argument_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load(GRPOConfig, None, ["trainer.total_steps"])


def test_bad_yaml_key_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError) as err:
        load(GRPOConfig, str(bad), [])
    assert "trainer.learning_rate" in str(err.value) and "bad.yaml" in str(err.value)


def test_config_imports_without_torch_or_ray():
    code = ("import sys, rayrl.config, rayrl.tree, rayrl.algo.advantages;"
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_recipe_help_prints_its_docstring_and_the_config_it_would_run_with():
    recipe = str(ROOT / "recipes" / "train_expert.py")
    out = subprocess.run([sys.executable, recipe, "--help", "domain=swe", "trainer.total_steps=7"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Train one domain expert")
    config = yaml.safe_load(out.stdout.split("any key can be set as key=value:", 1)[1])
    assert (config["task"]["name"], config["trainer"]["total_steps"], config["run"]["dir"]) == \
        ("swe", 7, "runs/expert_swe")
    # each key with what the config's source says of it, inline or just above
    assert re.search(r"\n  groups_per_step: \d+  # prompt groups per learner update\n", out.stdout)
    assert re.search(r"\n  easy_share: [\d.]+  # arith: share of drawn tasks with one-digit operands", out.stdout)
    bad = subprocess.run([sys.executable, recipe, "-h", "trainer.totl_steps=3"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "trainer.totl_steps" in bad.stderr


def test_recipe_fails_before_any_actor_on_bad_key():
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), "trainer.totl_steps=3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "trainer.totl_steps" in out.stderr
    assert "ray" not in out.stdout.lower()


def test_paths_a_run_reads_are_checked_before_it_starts(tmp_path):
    from rayrl.config import UnifyConfig, check_paths
    model = tmp_path / "model"
    model.mkdir()
    for argv, error in ((["model.path=/no/such/model"], "model.path='/no/such/model': no such directory"),
                        ([f"model.path={model}"], "no config.json"),   # a folder, but not a model
                        (["unify.reuse=/no/such/run"], "unify.reuse='/no/such/run': no such directory"),
                        (["unify.experts.swe=/no/such/expert"], "unify.experts.swe='/no/such/expert'")):
        with pytest.raises(ConfigError, match=re.escape(error)):
            check_paths(load(UnifyConfig, None, argv))
    (model / "config.json").write_text("{}")
    check_paths(load(UnifyConfig, None, [f"model.path={model}", f"unify.experts.swe={model}",
                                         f"unify.reuse={tmp_path}"]))
    with pytest.raises(ConfigError, match="unify.experts.math: math is not in unify.domains"):
        load(UnifyConfig, None, ["unify.experts.math=/x"])


def test_a_recipe_with_a_missing_model_stops_before_touching_its_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")   # an earlier run, which a typo must not move aside
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), "model.path=/no/such/model",
                          f"run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "config error: model.path='/no/such/model'" in out.stderr
    assert "Traceback" not in out.stderr and os.listdir(tmp_path) == ["run"]
    assert os.listdir(run_dir) == ["metrics.jsonl"]


def test_values_yaml_cannot_read_and_empty_values_name_the_argument():
    with pytest.raises(ConfigError, match=r"argument 'task.ops=\*': the value is not valid YAML.*\"task.ops='\*'\""):
        load(GRPOConfig, str(RECIPE_YAML), ["task.ops=*"])
    assert load(GRPOConfig, str(RECIPE_YAML), ["task.ops='*'"]).task.ops == "*"
    assert load(GRPOConfig, str(RECIPE_YAML), ["model.path=smollm2", "model.path="]).model.path == ""
    with pytest.raises(ConfigError, match="'trainer.total_steps'.*on the command line"):
        load(GRPOConfig, str(RECIPE_YAML), ["trainer.total_steps="])


def test_resuming_a_run_of_another_recipe_says_so(tmp_path, capsys):
    from rayrl.config import load_recipe
    (tmp_path / "config.json").write_text('{"run": {}, "unify": {}, "distill": {}}')
    with pytest.raises(SystemExit) as stop:
        load_recipe(GRPOConfig, str(RECIPE_YAML), [f"run.resume={tmp_path}"])
    assert stop.value.code == 2
    assert "has distill, unify settings, which this recipe does not" in capsys.readouterr().err
