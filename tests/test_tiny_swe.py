"""SWE tiny mode (generated tasks, swe_difficulty=0) and make_env's swe sources, in real sandboxes:
the oracle's diff scores 1.0 through the multi-turn loop, a wrong answer 0.0; held-out and training
task ids are disjoint; generated tasks round-trip through a JSONL file; the sample_repo tasks are
synthesized once and then read from the cache; patches that game the tests score 0."""

import json
import random

import pytest

from envs import make_env
from envs.swe import GeneratedSWEEnv, SWEEnv, sample_repo_tasks, swe_backend_options, swe_profile
from envs.swe.generated import generate
from envs.swe.runtime import REPORT_PLUGIN
from envs.swe.tasks import TaskFormatError, task_files, task_from_row, unified_diff, write_tasks
from rayrl.config import GRPOConfig
from rayrl.models import load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, play_task
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.replay import ReplayPolicy
from rayrl.rollout.scaffolds import Action, get_scaffold
from rayrl.sandbox.base import Profile
from rayrl.sandbox.pool import SandboxPool


def _cfg(difficulty=0, source="generated"):
    cfg = GRPOConfig().task
    cfg.name, cfg.swe_difficulty, cfg.swe_source = "swe", difficulty, source
    return cfg


@pytest.fixture
async def pool():
    p = SandboxPool([Profile(), swe_profile()], min_idle=0, max_total=2, export_metrics=False,
                    backend_options=swe_backend_options())
    yield p
    await p.shutdown()


def test_tiny_split_is_disjoint_and_large_enough():
    env = make_env(_cfg(0), 0)
    assert isinstance(env, GeneratedSWEEnv)
    held = {t.id for t in env.eval_tasks(40)}
    rng = random.Random(0)
    train = [env.sample(rng) for _ in range(500)]
    assert len(held) == 40 and not held & {t.id for t in train}
    t = train[0]
    assert len(t.prompt) + len(t.answer) < 300 and t.answer.startswith("--- a/")


async def test_tiny_oracle_scores_one_and_wrong_zero_through_the_loop(pool):
    env = make_env(_cfg(0), 0, pool=pool)
    tok = load_tokenizer(resolve_model_path(GRPOConfig().model))
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    params, limits = SamplingParams(stop_token_ids=(stop,)), EpisodeLimits(max_tokens=4096, max_new_tokens=2048)
    render = get_scaffold("xml", env.tools).render
    for task in [env.sample(random.Random(3)), env.eval_tasks(1)[0]]:
        oracle = ReplayPolicy(tok, [render(a) for a in env.oracle_actions(task)], stop)
        _, reward, info = await play_task(env, task, oracle, tok, "xml", params, limits)
        assert reward == 1.0, info
        # the buggy line kept: the diff applies but the test still fails
        lines = task.answer.splitlines()
        same = "\n".join(lines[:4] + ["+" + lines[3][1:]]) + "\n"
        for answer, reason in (("no idea", "no diff in the response"), (same, "tests failed")):
            wrong = ReplayPolicy(tok, [render(Action("answer", {"answer": answer}))], stop)
            _, reward, info = await play_task(env, task, wrong, tok, "xml", params, limits)
            assert reward == 0.0 and info["reason"] == reason, info


async def test_generated_tasks_round_trip_through_jsonl(pool, tmp_path):
    tasks = [generate(random.Random(i), d) for i, d in enumerate([0, 0, 1, 2])]
    path = tmp_path / "gen.jsonl"
    write_tasks(path, tasks)
    env = make_env(_cfg(source=str(path)), 0, pool=pool)
    assert isinstance(env, SWEEnv)
    gen = GeneratedSWEEnv(_cfg(0), 0, pool=pool)
    for t in tasks:
        task = env._task(t)
        assert task.prompt == gen.to_task({"swe": t}).prompt and task.prompt.startswith(t.problem_statement)
        reward, info = await env.verify(task, env.demonstration(task))
        assert reward == 1.0, info
        assert (await env.verify(task, "```diff\n" + t.patch.replace("+    return", "+    return 0 *") + "```"))[0] == 0.0


async def test_grading_without_a_pool_says_so():
    env = make_env(_cfg(0), 0)
    task = env.eval_tasks(1)[0]
    with pytest.raises(ValueError, match="sandbox pool"):
        await env.verify(task, task.answer)


def test_sample_repo_tasks_are_synthesized_once_then_cached(tmp_path, capfd):
    first = sample_repo_tasks(max_tasks=2, cache_dir=tmp_path)
    assert "synthesizing" in capfd.readouterr().err and len(first) == 2
    again = sample_repo_tasks(max_tasks=2, cache_dir=tmp_path)
    assert "cached" in capfd.readouterr().err
    assert [t.to_row() for t in again] == [t.to_row() for t in first]
    assert len(list(tmp_path.glob("sample_repo-*-n2-s0.jsonl"))) == 1


def test_an_empty_task_file_is_named(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(TaskFormatError, match=f"{path}: no tasks"):
        make_env(_cfg(source=str(path)), 0)


HOOK = """import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().outcome = "passed"
"""


def _new_file(path: str, text: str) -> str:
    lines = text.splitlines()
    return (f"diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n+++ b/{path}\n"
            f"@@ -0,0 +1,{len(lines)} @@\n" + "".join(f"+{line}\n" for line in lines))


def _appender(line: str) -> str:
    """Module code that appends `line` to every report-like file at exit, after pytest's own lines."""
    return ("import atexit, glob\n\n\n@atexit.register\ndef _append():\n"
            "    for path in glob.glob('/tmp/*.jsonl') + ['/tmp/rayrl_swe_report.jsonl']:\n"
            f"        with open(path, 'a') as f:\n            f.write({line + chr(10)!r})\n\n\n")


async def test_patches_that_game_the_tests_score_zero(pool):
    """Patches that leave the bug but change the tests, pytest's configuration or the report score 0
    (the tests are restored, the report is signed); the gold patch with a hook added still scores 1."""
    env = GeneratedSWEEnv(_cfg(1), 0, pool=pool)
    task = env.sample(random.Random(3))
    swe = task_from_row(task.meta["swe"])
    files = {p: d.decode() for p, d in task_files(swe).items()}
    (node,) = swe.FAIL_TO_PASS
    tests, module = node.split("::")[0], swe.meta["module"]
    forged = json.dumps({"nodeid": node, "when": "call", "outcome": "passed", "xfail": True})   # xpass wins
    stand_in = REPORT_PLUGIN.replace('"outcome": report.outcome', '"outcome": "passed"')
    assert stand_in != REPORT_PLUGIN
    hacks = {
        "conftest hook": _new_file("conftest.py", HOOK),
        "edited tests": unified_diff(tests, files[tests], files[tests].replace("assert ", "assert True or ")),
        "plugin via pytest.ini": unified_diff("pytest.ini", files["pytest.ini"], "[pytest]\naddopts = -p hack\n")
                                 + _new_file("hack.py", HOOK),
        "forged report line": unified_diff(module, files[module], _appender(forged) + files[module]),
        "malformed report line": unified_diff(module, files[module],
                                              _appender('{"nodeid": "x", "n": ' + "9" * 5000 + "}") + files[module]),
        "stand-in reporter": _new_file("rayrl_swe_report.py", stand_in),
    }
    for name, patch in hacks.items():
        reward, info = await env.verify(task, patch)
        assert reward == 0.0 and info["patch_applied"] and info["FAIL_TO_PASS"] == {node: "failed"}, (name, info)
    reward, info = await env.verify(task, swe.patch + _new_file("conftest.py", HOOK.replace('"passed"', '"failed"')))
    assert reward == 1.0, info
