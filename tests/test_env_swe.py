"""SWE domain: task synthesis by mutation on the shipped sample repository, the sandboxed grader,
the task loader and the two command-line tools, all in real bubblewrap sandboxes."""

import asyncio
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from envs.swe import SWEEnv, extract_patch
from envs.swe.grade import grade_all
from envs.swe.harness import grade
from envs.swe.mutate import mutations
from envs.swe.runtime import make_pool
from envs.swe.synthesize import synthesize
from envs.swe.tasks import (SAMPLE_REPO, TaskFormatError, load_predictions, load_tasks, read_repo,
                            task_files, unified_diff, write_tasks)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """Synthesize once for the module (about 10 s on 2 cores) and keep the JSONL in tmp."""
    tasks, stats = asyncio.run(synthesize(SAMPLE_REPO, max_tasks=22, seed=0, workers=2, progress=False))
    path = tmp_path_factory.mktemp("swe") / "tasks.jsonl"
    write_tasks(path, tasks)
    return path, tasks, stats


def test_synthesis_yields_at_least_20_verified_tasks(synthesized):
    path, tasks, stats = synthesized
    assert len(tasks) >= 20 and stats["tasks"] == len(tasks) and stats["rejected_verify"] == 0
    assert len({t.instance_id for t in tasks}) == len(tasks)
    assert len({t.meta["mutation"] for t in tasks}) >= 3          # several kinds of bugs
    assert len({t.meta["function"] for t in tasks}) >= 8          # spread over the package
    for t in tasks:
        assert t.FAIL_TO_PASS and not set(t.FAIL_TO_PASS) & set(t.PASS_TO_PASS)
        assert len(t.FAIL_TO_PASS) + len(t.PASS_TO_PASS) == stats["tests"]
        assert t.patch.startswith("diff --git a/") and t.test_patch == ""
        assert all(node in t.problem_statement for node in t.FAIL_TO_PASS)
        # the gold patch is the inverse of the mutation: it turns the task's state back into the repo
        (file,) = t.base_files
        assert t.patch.count("\n-") >= 1 and file in t.patch
    # the file round-trips through the loader
    assert [t.to_row() for t in load_tasks(path)] == [t.to_row() for t in tasks]


async def test_grader_resolves_every_task_with_gold_and_none_unpatched(synthesized):
    _, tasks, _ = synthesized
    pool = make_pool(max_total=2)
    try:
        gold = await grade_all(tasks, {t.instance_id: t.patch for t in tasks}, pool=pool, workers=2)
        empty = await grade_all(tasks, {t.instance_id: "" for t in tasks}, pool=pool, workers=2)
    finally:
        await pool.shutdown()
    assert [r for r, _ in gold] == [1.0] * len(tasks), [i for r, i in gold if r != 1.0][:1]
    assert [r for r, _ in empty] == [0.0] * len(tasks)
    for task, (_, info) in zip(tasks, empty):
        assert info["reason"] == "tests failed"
        assert all(s != "passed" for s in info["FAIL_TO_PASS"].values())    # unpatched: F2P fail
        assert all(s == "passed" for s in info["PASS_TO_PASS"].values())    # and P2P pass
    assert all(i["f2p_passed"] == len(t.FAIL_TO_PASS) for t, (_, i) in zip(tasks, gold))


async def test_bad_patches_score_zero_with_a_reason(synthesized):
    _, tasks, _ = synthesized
    task = tasks[0]
    pool = make_pool(max_total=1)
    try:
        r, info = await grade(pool, task, "this is not a diff\n")
        assert r == 0.0 and info["reason"] == "patch does not apply"
        stale = "diff --git a/nope.py b/nope.py\n--- a/nope.py\n+++ b/nope.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
        r, info = await grade(pool, task, stale)
        assert r == 0.0 and info["reason"] == "patch does not apply"
        # a patch that applies but breaks an import: every test fails, still no crash
        ((path, mutated),) = task.base_files.items()
        original = (SAMPLE_REPO / path).read_text()
        broken = unified_diff(path, mutated, original + "raise SystemExit('boom')\n")
        r, info = await grade(pool, task, broken)
        assert r == 0.0 and info["patch_applied"] and info["reason"] != "patch does not apply"
        # a patch that passes the tests by changing them (a hook in a new tests/conftest.py, asserts
        # made true): the tests are restored before the run
        tests = task.FAIL_TO_PASS[0].split("::")[0]
        text = (SAMPLE_REPO / tests).read_text()
        hook = ("import pytest\n\n\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
                "    outcome = yield\n    outcome.get_result().outcome = 'passed'\n")
        gamed = (unified_diff(tests, text, text.replace("assert ", "assert True or "))
                 + unified_diff("tests/conftest.py", "", hook))
        r, info = await grade(pool, task, gamed)
        assert r == 0.0 and info["patch_applied"] and info["f2p_passed"] == 0, info
        # through the environment: a fenced diff is extracted; prose without a diff scores 0
        env = SWEEnv(tasks, pool)
        t = env.eval_tasks(1)[0]
        assert t.prompt.startswith("Some behaviour") and "tinyutils/" in t.prompt
        reward, _ = await env.verify(t, f"Here is the fix:\n```diff\n{env.demonstration(t)}```\n")
        assert reward == 1.0
        reward, info = await env.verify(t, "I could not find the bug.")
        assert reward == 0.0 and info["reason"] == "no diff in the response"
        train = env.sample(random.Random(0))
        assert train.domain == "swe" and train.answer == env.demonstration(train)
    finally:
        await pool.shutdown()


def test_extract_patch():
    diff = "diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
    assert extract_patch(diff) == diff
    assert extract_patch("text\n```diff\n" + diff + "```\nmore") == diff
    assert extract_patch("prose\n" + diff) == diff
    assert extract_patch("no diff here") == ""


def test_mutations_are_single_local_edits():
    text = "def f(a, b):\n    if a < b and b > 0:\n        return a + 1\n    return b - a\n"
    ms = mutations("m.py", text)
    kinds = {m.kind for m in ms}
    assert {"compare", "boolop", "binop", "off_by_one", "drop_if"} <= kinds
    for m in ms:
        compile(m.source, "m.py", "exec")
        assert m.source != text
    assert any(m.source == text.replace("a < b", "a <= b") for m in ms)
    assert any(m.source == text.replace(" and ", " or ") for m in ms)
    assert any(m.source == text.replace("a + 1", "a - 1") for m in ms)


def test_loader_errors_name_file_line_and_field(tmp_path, synthesized):
    _, tasks, _ = synthesized
    good = json.dumps(tasks[0].to_row())
    cases = {
        "not json": ("{oops", ":2: not JSON"),
        "missing": (json.dumps({k: v for k, v in tasks[0].to_row().items() if k != "patch"}), ":2: missing field 'patch'"),
        "type": (json.dumps({**tasks[0].to_row(), "FAIL_TO_PASS": "tests/x.py::t"}), ":2: field 'FAIL_TO_PASS'"),
        "empty f2p": (json.dumps({**tasks[0].to_row(), "FAIL_TO_PASS": []}), ":2: field 'FAIL_TO_PASS' is empty"),
        "duplicate": (good, ":2: field 'instance_id'"),
        "escape": (json.dumps({**tasks[0].to_row(), "base_files": {"../x.py": ""}}), ":2: field 'base_files'"),
        "no repo": (json.dumps({**tasks[0].to_row(), "instance_id": "x", "repo": str(tmp_path / "nope")}),
                    ":2: field 'repo'"),
    }
    for name, (line, expected) in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        p.write_text(good + "\n" + line + "\n")
        with pytest.raises(TaskFormatError) as e:
            load_tasks(p)
        assert str(p) + expected in str(e.value), (name, str(e.value))
    # SWE-bench ships the test lists as JSON strings: accepted
    p = tmp_path / "swebench.jsonl"
    p.write_text(json.dumps({**tasks[0].to_row(), "FAIL_TO_PASS": json.dumps(tasks[0].FAIL_TO_PASS)}) + "\n")
    assert load_tasks(p)[0].FAIL_TO_PASS == tasks[0].FAIL_TO_PASS
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(good.encode() + b'\n{"instance_id": "caf\xe9"}\n')
    with pytest.raises(TaskFormatError, match=r"latin1.jsonl:2: not UTF-8"):
        load_tasks(p)
    p = tmp_path / "preds.jsonl"
    p.write_text('{"instance_id": "a", "model_patch": null}\n{"model_patch": ""}\n')
    with pytest.raises(TaskFormatError, match=r"preds.jsonl:2: missing field 'instance_id'"):
        load_predictions(p)
    p.write_text('{"instance_id": "a", "model_patch": "x"}\n\n{"instance_id": "a", "model_patch": ""}\n')
    with pytest.raises(TaskFormatError, match=r"preds.jsonl:3: field 'instance_id' 'a' repeats .*preds.jsonl:1"):
        load_predictions(p)


def test_a_changed_repository_makes_tasks_stale(tmp_path, synthesized):
    _, tasks, _ = synthesized
    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE_REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    row = {**tasks[0].to_row(), "repo": str(repo)}
    from envs.swe.tasks import task_from_row
    task = task_from_row(row)
    assert task_files(task)[next(iter(task.base_files))] == next(iter(task.base_files.values())).encode()
    (repo / "tinyutils" / "extra.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="has changed since the task was made"):
        task_files(task)
    assert "tinyutils/extra.py" in read_repo(repo)


def test_cli_synthesize_then_grade(tmp_path):
    out = tmp_path / "tasks.jsonl"
    r = subprocess.run([sys.executable, "-m", "envs.swe.synthesize", "--repo", str(SAMPLE_REPO), "--out", str(out),
                        "--max-tasks", "3", "--seed", "7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"tasks": 3}
    assert "tried" in r.stderr                      # progress
    tasks = load_tasks(out)
    assert len(tasks) == 3
    preds = tmp_path / "preds.jsonl"
    rows = [{"instance_id": tasks[0].instance_id, "model_patch": tasks[0].patch},
            {"instance_id": tasks[1].instance_id, "model_patch": tasks[1].patch},
            {"instance_id": tasks[2].instance_id, "model_patch": "not a diff"}]
    preds.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = subprocess.run([sys.executable, "-m", "envs.swe.grade", "--tasks", str(out), "--predictions", str(preds)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"resolved": 2, "total": 3}
    assert "patch does not apply" in r.stdout and "RESOLVED" in r.stdout
