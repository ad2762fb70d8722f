"""WebSearch tiny mode (difficulty 0): the oracle's search/open/answer actions score 1.0 through
the real loop over the real BM25 index and an immediate wrong answer 0; the observations are short
and still state the fact; queries, ids and answers come from small fixed vocabularies; held-out
task ids are disjoint from training ones."""

import random

import pytest

from envs import make_env
from envs.rows import held_out
from envs.websearch import TINY_TOP_K, question_space
from rayrl.config import GRPOConfig
from rayrl.models import load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, play_task
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.replay import ReplayPolicy
from rayrl.rollout.scaffolds import Action, get_scaffold


def tiny_env():
    cfg = GRPOConfig().task
    cfg.name, cfg.websearch_difficulty = "websearch", 0
    return make_env(cfg, 0)


@pytest.mark.parametrize("scaffold", ["xml", "json"])
async def test_tiny_oracle_scores_one_and_wrong_zero(scaffold):
    env = tiny_env()
    tok = load_tokenizer(resolve_model_path(GRPOConfig().model))
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    params, limits = SamplingParams(stop_token_ids=(stop,)), EpisodeLimits()
    render = get_scaffold(scaffold, env.tools).render
    rng = random.Random(3)
    for task in [env.sample(rng) for _ in range(8)] + env.eval_tasks(4):
        actions = env.oracle_actions(task)
        assert [a.kind for a in actions] == ["search", "open", "answer"]
        oracle = ReplayPolicy(tok, [render(a) for a in actions], stop)
        episode, reward, info = await play_task(env, task, oracle, tok, scaffold, params, limits)
        assert reward == 1.0 and info["end_reason"] == "answer", (task.id, info)
        observations = [tok.decode(seg.tokens) for seg in episode.segments if not seg.sampled]
        assert len(observations) == 2, observations
        assert all(len(seg.tokens) < 120 for seg in episode.segments if not seg.sampled), observations
        assert task.answer in observations[1]          # the opened document states the answer
        wrong = ReplayPolicy(tok, [render(Action("answer", {"answer": "ninth"}))], stop)
        episode, reward, info = await play_task(env, task, wrong, tok, scaffold, params, limits)
        assert reward == 0.0 and episode.end_reason == "answer", (task.id, info)


async def test_tiny_search_is_short_and_finds_the_document():
    env = tiny_env()
    tools = env.make_tools()
    out = await tools.run(Action("search", {"query": "Nitrogen"}))
    assert out.splitlines() == ["element-nitrogen: Nitrogen (element)", "sci-atmosphere: Atmosphere of Earth"]
    assert env.top_k == TINY_TOP_K
    assert (await tools.run(Action("open", {"id": "planet-mars"}))).endswith("Mars is the fourth planet from the Sun.")


def test_tiny_split_is_disjoint_and_vocabularies_are_fixed():
    env = tiny_env()
    held = {t.id for t in env.eval_tasks(40)}
    train = {env.sample(random.Random(s)).id for s in range(1000)}
    assert len(held) == 40 and not held & train and len(train) > 250
    rows = question_space(0)
    assert len({r["task_id"] for r in rows}) == len(rows) >= 400
    assert sum(held_out(r["task_id"], env.eval_fraction) for r in rows) >= 60
    for i, kind in enumerate(("search", "open", "answer")):
        assert len({str(r["oracle"][i]["args"]) for r in rows}) <= 17
        assert all(r["oracle"][i]["tool"] == kind for r in rows)
    for row in rows:   # the question ends with the entity's name, at the end of the prompt
        assert env.to_task(row).prompt.rstrip("?.").endswith(row["oracle"][0]["args"]["query"])
    # the held-out prefix covers the fact set; the facts repeat under other phrasings in training
    facts = {r["oracle"][1]["args"]["id"] for r in rows}
    assert {t.meta["oracle"][1]["args"]["id"] for t in env.eval_tasks(40)} == facts
    # difficulty 1 is unchanged: forward questions with the full observations
    assert "What is the capital of France?" in {r["question"] for r in question_space(1)}
