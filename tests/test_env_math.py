"""Math tasks through the full agent loop (one answer turn, no tools): the oracle answers score
1.0 under both scaffolds, wrong answers 0; extraction, normalization and equivalence; the
seeded generator and its held-out split; loader errors."""

import random

import pytest

from envs.math import (SAMPLES, MathEnv, TaskFormatError, check, equivalent, extract_answer, generate,
                       load_tasks, normalize, parse_row)
from rayrl.config import GRPOConfig
from rayrl.models import chat_prompt_ids, load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, TurnTemplate, run_episode
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.scaffolds import Action, get_scaffold
from rayrl.rollout.replay import ReplayPolicy


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(GRPOConfig().model))


async def play(tokenizer, env, task, answer, scaffold):
    """One episode whose only model turn submits `answer`; returns the verifier's reward."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns = [scaffold.render(Action("answer", {"answer": answer}))]
    episode = await run_episode(ReplayPolicy(tokenizer, turns, stop), tokenizer, scaffold,
                                chat_prompt_ids(tokenizer, task.prompt, system=scaffold.system_prompt()),
                                None, SamplingParams(stop_token_ids=(stop,)), EpisodeLimits(),
                                TurnTemplate(tokenizer, stop_ids=(stop,)))
    assert episode.end_reason == "answer" and episode.turns == 1
    reward, info = await env.verify(task, episode.answer)
    return reward, info


@pytest.mark.parametrize("name", ["xml", "json"])
async def test_oracles_score_one(tokenizer, name):
    env, scaffold = MathEnv(), get_scaffold(name, tools=())
    rows = load_tasks(SAMPLES) + [generate(random.Random(s), difficulty=3) for s in range(4)]
    for row in rows:
        task = env.to_task(row)
        for answer in (task.answer, env.demonstration(task)):
            reward, info = await play(tokenizer, env, task, answer, scaffold)
            assert reward == 1.0, (row["task_id"], answer, info)


async def test_wrong_answers_score_zero(tokenizer):
    env, scaffold = MathEnv(), get_scaffold("xml", tools=())
    for row in load_tasks(SAMPLES):
        task = env.to_task(row)
        for wrong in ("\\boxed{123456789}", "I do not know.", "The answer is \\boxed{\\frac{1}{", "zzz"):
            reward, info = await play(tokenizer, env, task, wrong, scaffold)
            assert reward == 0.0, (row["task_id"], wrong, info)


def test_extraction():
    assert extract_answer("so \\boxed{\\frac{3}{4}} in the end")[0] == "\\frac{3}{4}"
    assert extract_answer("first \\boxed{1} then \\boxed{{2}+1}")[0] == "{2}+1"
    assert extract_answer("Thus the answer is 21 apples.")[0] == "21"
    assert extract_answer("The answer is: -3/4.")[0] == "-3/4"
    assert extract_answer("We get 3 then 17 and finally 2,500")[0] == "2,500"
    assert extract_answer("2(x+1)") == ("2(x+1)", "bare")
    assert extract_answer("no numbers here") == (None, "none")


@pytest.mark.parametrize("a,b", [("1/2", "0.5"), ("\\frac{1}{2}", "1/2"), ("\\dfrac{1}{2}", "0.5"),
                                 ("2x+2", "2(x+1)"), ("$3,000$", "3000"), ("4.0", "4"), ("x = 6", "6"),
                                 ("0.3333333", "1/3"), ("\\frac{\\sqrt{8}}{2}", "sqrt(2)"),
                                 ("x^2 - 1", "(x-1)(x+1)"), ("1,234,567", "1234567")])
def test_equivalent(a, b):
    assert check(a, b)[0] == 1.0, check(a, b)
    assert check(f"The answer is \\boxed{{{a}}}.", b)[0] == 1.0


@pytest.mark.parametrize("a,b", [("1/3", "0.33"), ("2x+1", "2(x+1)"), ("3", "-3"), ("x", "y")])
def test_not_equivalent(a, b):
    reward, info = check(a, b)
    assert reward == 0.0 and info["reason"].startswith("wrong"), info


def test_hostile_answers_are_unparsable_not_evaluated():
    # "1e999999": sympy's Float of it takes half a minute (longer exponents, hours)
    for bad in ("__import__('os').system('true')", "2**9**9**9", "x.__class__", "lambda: 1", "1e999999", "2E+1000"):
        assert normalize(bad) is None or equivalent(normalize(bad), "1") == (False, "unparsable")
        assert check(f"\\boxed{{{bad}}}", "1")[0] == 0.0
    assert check("1e5", "100000")[0] == 1.0   # exponent notation itself is fine


def test_generator_is_seeded_and_split():
    env = MathEnv()
    assert [generate(random.Random(1), 4) for _ in range(2)] == [generate(random.Random(1), 4)] * 2
    a = [env.sample(random.Random(s)).id for s in range(5)]
    assert a == [env.sample(random.Random(s)).id for s in range(5)]
    held = {t.id for t in env.eval_tasks(20)}
    train = {env.sample(random.Random(s)).id for s in range(300)}
    assert len(held) == 20 and not held & train
    # difficulty is the number of operations; every generated answer checks against itself
    for d in (1, 3, 6):
        row = generate(random.Random(d), d)
        assert row["solution"].count(";") >= d - 1 and check(row["answer"], row["answer"])[0] == 1.0


def test_bad_rows_name_the_field(tmp_path):
    with pytest.raises(TaskFormatError, match="'answer' is missing"):
        parse_row({"task_id": "x", "problem": "p"}, "t.jsonl:1")
    with pytest.raises(TaskFormatError, match="'solution' must be str"):
        parse_row({"task_id": "x", "problem": "p", "answer": "1", "solution": 3}, "t.jsonl:1")
    with pytest.raises(TaskFormatError, match="'answer'.*not a parsable"):
        parse_row({"task_id": "x", "problem": "p", "answer": "import os"}, "t.jsonl:1")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"task_id": "x", "problem": "p", "answer": "1"}\n{"task_id": "y"\n')
    with pytest.raises(TaskFormatError, match="t.jsonl:2"):
        load_tasks(bad)
    bad.write_bytes(b'{"task_id": "x", "problem": "p", "answer": "1"}\n{"task_id": "y\xff"}\n')
    with pytest.raises(TaskFormatError, match="t.jsonl:2: not UTF-8"):
        load_tasks(bad)
