"""General tiny mode (difficulty 0): the oracle scores 1.0 and a wrong answer 0 through the real
loop, tasks are instruction following only with answers from fixed vocabularies, and held-out task
ids are disjoint from training ones."""

import random
import re

import pytest

from envs import make_env
from envs.general import _PHRASES, _TINY_BODY, _TINY_OPENERS, check, generate
from rayrl.config import GRPOConfig
from rayrl.models import load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, play_task
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.replay import ReplayPolicy
from rayrl.rollout.scaffolds import Action, get_scaffold


def tiny_env():
    cfg = GRPOConfig().task
    cfg.name, cfg.general_difficulty = "general", 0
    return make_env(cfg, 0)


@pytest.mark.parametrize("scaffold", ["xml", "json"])
async def test_tiny_oracle_scores_one_and_wrong_zero(scaffold):
    env = tiny_env()
    tok = load_tokenizer(resolve_model_path(GRPOConfig().model))
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    params, limits = SamplingParams(stop_token_ids=(stop,)), EpisodeLimits()
    render = get_scaffold(scaffold, env.tools).render
    rng = random.Random(3)
    tasks = [env.sample(rng) for _ in range(12)]
    assert {t.meta["kind"] for t in tasks} == {"instruction"}
    for task in tasks:
        oracle = ReplayPolicy(tok, [render(a) for a in env.oracle_actions(task)], stop)
        episode, reward, info = await play_task(env, task, oracle, tok, scaffold, params, limits)
        assert reward == 1.0, (task.id, info)
        assert len(task.prompt) + len(env.demonstration(task)) < 200
        wrong = ReplayPolicy(tok, [render(Action("answer", {"answer": "I have no idea"}))], stop)
        episode, reward, info = await play_task(env, task, wrong, tok, scaffold, params, limits)
        assert reward == 0.0 and episode.end_reason == "answer", (task.id, info)


def test_tiny_split_is_disjoint_and_answers_are_fixed_strings():
    env = tiny_env()
    held = env.eval_tasks(60)
    train = {env.sample(random.Random(s)).id for s in range(2000)}
    assert len({t.id for t in held}) == 60 and not {t.id for t in held} & train
    assert len(train) > 300 and {t.meta["kind"] for t in held} == {"instruction"}
    fixed = set(" ".join([_TINY_BODY, *_PHRASES, *_TINY_OPENERS, "text"]).split())
    for s in range(300):
        row = generate(random.Random(s), 0)
        assert 1 <= len(row["constraints"]) <= 3 and check(row["oracle"], row["constraints"])[0] == 1.0
        assert set(re.findall(r"[a-z]+", row["oracle"].lower())) <= fixed
