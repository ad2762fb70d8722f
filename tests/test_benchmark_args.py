"""The benchmarks' command lines (benchmarks/_args.py): --help and every bad argument end before any
work starts, with exit status 0 and 2. No benchmark is run."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks._args import parse, scratch_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = "A benchmark.\n\nMore about it.\n"
DEFAULTS = {"steps": 60, "target": 0.8, "warm": "", "arms": ("vanilla", "hr")}
CHOICES = {"arms": ("vanilla", "dynamic", "hr")}


def failure(capsys, argv: list[str], **options) -> str:
    """parse's one-line error for argv (it must exit with status 2)."""
    with pytest.raises(SystemExit) as stop:
        parse(argv, DOC, DEFAULTS, CHOICES, **options)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_values_take_their_defaults_type_and_config_keys_pass_through_in_order():
    args = parse(["steps=3", "rollout.temperature=0.5", "arms=hr,dynamic", "target=1", "replay.prompts=8"],
                 DOC, DEFAULTS, CHOICES, flags={"--quick": "shorter"}, config="recipe keys")
    assert args == {"steps": 3, "target": 1.0, "warm": "", "arms": ("hr", "dynamic"), "quick": False,
                    "config": ["rollout.temperature=0.5", "replay.prompts=8"]}
    assert parse(["--quick"], DOC, {}, flags={"--quick": "shorter"}) == {"quick": True}
    assert parse([], DOC, DEFAULTS) == DEFAULTS


def test_help_prints_the_first_docstring_line_and_each_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as stop:
        parse(["steps=x", "-h"], DOC, DEFAULTS, CHOICES, flags={"--quick": "shorter"}, config="recipe keys")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "A benchmark." in out and "More about it" not in out
    for shown in ("steps=60", "target=0.8", "warm=", "arms=vanilla,hr", "choices: vanilla, dynamic, hr",
                  "--quick", "shorter", "KEY.SUB=VALUE", "recipe keys"):
        assert shown in out


def test_bad_arguments_are_one_line_naming_them_with_a_guess(capsys):
    assert "unknown key 'stepz' (did you mean 'steps'?)" in failure(capsys, ["stepz=3"])
    assert "unknown key 'rollout.temperature'" in failure(capsys, ["rollout.temperature=0.5"])
    assert "steps='abc': not an int" in failure(capsys, ["steps=abc"])
    assert "target='high': not a float" in failure(capsys, ["target=high"])
    assert "'vanila' is not one of vanilla, dynamic, hr (did you mean 'vanilla'?)" in failure(capsys, ["arms=vanila"])
    assert "unknown argument 'steps': expected key=value (did you mean 'steps=60'?)" in failure(capsys, ["steps"])
    assert "unknown argument '--quik': expected key=value (did you mean '--quick'?)" in failure(
        capsys, ["--quik"], flags={"--quick": "shorter"})
    # Checked before anything else: a bad argument after a good one still stops at once.
    assert "'nope'" in failure(capsys, ["steps=3", "nope=1"])


def test_scratch_dir_is_removed_after_a_run_and_kept_when_one_stops(capsys):
    with scratch_dir("test") as path:
        assert os.path.isdir(path)
    assert not os.path.exists(path)
    with pytest.raises(KeyboardInterrupt), scratch_dir("test") as path:
        raise KeyboardInterrupt("SIGINT")
    # A stopped run has printed `run.resume=<a directory in there>`: the directory must still exist.
    assert os.path.isdir(path) and path in capsys.readouterr().err
    os.rmdir(path)


BENCHMARKS = ("async_vs_sync", "envs", "mcla", "resampling", "sandbox_pool", "tree_codec", "tree_training")
BAD = {name: ["stepz=3"] for name in BENCHMARKS} | {"tree_codec": ["--quik"], "tree_training": ["quick"]}


def benchmark(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), *argv],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.timeout(300)
def test_every_benchmark_answers_help_and_a_bad_argument_without_starting():
    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(BENCHMARKS, pool.map(lambda n: benchmark(n, "--help"), BENCHMARKS)))
        bads = dict(zip(BENCHMARKS, pool.map(lambda n: benchmark(n, *BAD[n]), BENCHMARKS)))
    for name in BENCHMARKS:
        assert helps[name].returncode == 0 and helps[name].stdout.startswith(f"usage: {name}.py"), helps[name].stderr
        assert bads[name].returncode == 2 and bads[name].stdout == "", bads[name].stderr
        assert bads[name].stderr.count("\n") == 1 and repr(BAD[name][0].split("=")[0]) in bads[name].stderr


@pytest.mark.timeout(300)
def test_resampling_checks_its_arms_and_config_keys_before_the_warm_start():
    arms = benchmark("resampling", "arms=vanila", "seeds=3")
    assert arms.returncode == 2 and "did you mean 'vanilla'?" in arms.stderr
    config = benchmark("resampling", "trainer.totl_steps=3")
    assert config.returncode == 2 and config.stderr.startswith("config error: ") and "total_steps" in config.stderr
    assert config.stderr.count("\n") == 1


@pytest.mark.timeout(300)
def test_weight_sync_rejects_a_bad_generator_list_as_argparse_does():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "weight_sync.py"), "--generators", "1,x"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "argument --generators" in run.stderr and "Traceback" not in run.stderr
