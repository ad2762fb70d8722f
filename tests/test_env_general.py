"""General tasks (instruction following checked by code, and math) through the full agent loop:
oracles score 1.0 under both scaffolds, responses violating each constraint type score 0; the
seeded generator and held-out split; loader errors name the field."""

import random

import pytest

from envs import math as math_env
from envs.general import (CONSTRAINTS, SAMPLES, GeneralEnv, TaskFormatError, check, check_constraint, generate,
                          load_tasks, parse_row)
from tests.test_env_math import play, tokenizer  # noqa: F401  (the module-scoped fixture)
from rayrl.rollout.scaffolds import get_scaffold


@pytest.mark.parametrize("name", ["xml", "json"])
async def test_oracles_score_one(tokenizer, name):  # noqa: F811
    env, scaffold = GeneralEnv(), get_scaffold(name, tools=())
    rows = (load_tasks(SAMPLES) + [generate(random.Random(s), difficulty=3) for s in range(6)]
            + math_env.load_tasks(math_env.SAMPLES)[:4])
    for row in rows:
        task = env.to_task(row)
        reward, info = await play(tokenizer, env, task, env.demonstration(task), scaffold)
        assert reward == 1.0, (row["task_id"], info)


async def test_wrong_answers_score_zero(tokenizer):  # noqa: F811
    env, scaffold = GeneralEnv(), get_scaffold("xml", tools=())
    for row in load_tasks(SAMPLES):
        task = env.to_task(row)
        for wrong in ("OK", "- " + "WORD " * 60 + "coffee blue"):
            reward, info = await play(tokenizer, env, task, wrong, scaffold)
            assert reward == 0.0 and info["failed"], (row["task_id"], info)
    task = env.to_task(math_env.load_tasks(math_env.SAMPLES)[0])
    assert (await play(tokenizer, env, task, "\\boxed{6913}", scaffold))[0] == 0.0


# one satisfying and one violating response per constraint type
CASES = {
    "min_words": ({"n": 3}, "one two three", "one two"),
    "max_words": ({"n": 3}, "one two three", "one two three four"),
    "include_keywords": ({"keywords": ["cat", "dog"]}, "A Cat and a dog.", "A cat and a doggy."),
    "exclude_words": ({"words": ["blue"]}, "bluebell skies", "the Blue sky"),
    "keyword_frequency": ({"keyword": "go", "n": 2}, "go go now", "go gone"),
    "lowercase": ({}, "all quiet here.", "All quiet here."),
    "uppercase": ({}, "LOUD NOISES!", "LOUD noises!"),
    "bullet_points": ({"n": 2}, "- a\n- b", "- a\n- b\n* c"),
    "paragraphs": ({"n": 2}, "one\n\ntwo", "one\ntwo"),
    "starts_with": ({"phrase": "Dear"}, "  Dear Sir", "Hello Dear"),
    "ends_with": ({"phrase": "the end"}, "and that is the end\n", "the end is near"),
    "json": ({}, '```json\n{"a": [1, 2]}\n```', '{"a": [1, 2}'),
    "no_commas": ({}, "no commas here", "one, two"),
}


def test_every_constraint_type_passes_and_fails():
    assert set(CASES) == set(CONSTRAINTS)
    for kind, (params, good, bad) in CASES.items():
        c = {"type": kind, **params}
        assert check_constraint(good, c), kind
        assert not check_constraint(bad, c), kind
        reward, info = check(bad, [{"type": "min_words", "n": 1}, c])
        assert reward == 0.0 and info["failed"] == [kind] and info["constraints"][0]["ok"]


def test_json_the_parser_cannot_take_fails_the_constraint_without_raising():
    for text in ("[" * 5000 + "]" * 5000, '{"n": ' + "9" * 5000 + "}"):   # RecursionError, ValueError
        assert not check_constraint(text, {"type": "json"})


def test_generator_is_seeded_and_split():
    env = GeneralEnv()
    assert generate(random.Random(5), 4) == generate(random.Random(5), 4)
    for s in range(200):   # every generated oracle satisfies its constraints (generate asserts it)
        row = generate(random.Random(s), 1 + s % 5)
        assert len(row["constraints"]) >= 1 and parse_row(row, "gen") == row
    a = [env.sample(random.Random(s)).id for s in range(5)]
    assert a == [env.sample(random.Random(s)).id for s in range(5)]
    held = env.eval_tasks(30)
    train = {env.sample(random.Random(s)).id for s in range(300)}
    assert len({t.id for t in held}) == 30 and not {t.id for t in held} & train
    assert {t.meta["kind"] for t in held} == {"math", "instruction"}


def test_bad_rows_name_the_field(tmp_path):
    row = {"task_id": "x", "prompt": "p", "oracle": "o", "constraints": [{"type": "lowercase"}]}
    assert parse_row(row, "t.jsonl:1")["constraints"] == [{"type": "lowercase"}]
    with pytest.raises(TaskFormatError, match=r"t.jsonl:1: field 'constraints\[1\]'.type: unknown constraint type 'rhyme'"):
        parse_row({**row, "constraints": [{"type": "lowercase"}, {"type": "rhyme"}]}, "t.jsonl:1")
    with pytest.raises(TaskFormatError, match=r"'constraints\[0\]'.n: missing"):
        parse_row({**row, "constraints": [{"type": "min_words"}]}, "t.jsonl:1")
    with pytest.raises(TaskFormatError, match=r"'constraints\[0\]'.keywords: must be a list of strings"):
        parse_row({**row, "constraints": [{"type": "include_keywords", "keywords": [1]}]}, "t.jsonl:1")
    with pytest.raises(TaskFormatError, match="'oracle' is missing"):
        parse_row({k: v for k, v in row.items() if k != "oracle"}, "t.jsonl:1")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "p", "oracle": "o", "constraints": [{"type": "shout"}]}\n')
    with pytest.raises(TaskFormatError, match=r"t.jsonl:1: field 'constraints\[0\]'.type"):
        load_tasks(bad)
