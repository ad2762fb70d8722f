"""Terminal tiny mode (difficulty 0): the oracle solves tasks through the real multi-turn loop and
sandbox checker, an immediate answer scores 0, and held-out prompts never occur in training."""

import random

import pytest

from envs.terminal import TerminalEnv
from rayrl.config import GRPOConfig
from rayrl.models import load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, play_task
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.replay import ReplayPolicy
from rayrl.rollout.scaffolds import Action, XMLScaffold
from rayrl.sandbox.base import Profile
from rayrl.sandbox.pool import SandboxPool


class Cfg:
    terminal_difficulty = 0


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(GRPOConfig().model))


@pytest.fixture
async def env():
    pool = SandboxPool([Profile()], min_idle=0, max_total=2, export_metrics=False)
    yield TerminalEnv(Cfg(), pool=pool)
    await pool.shutdown()


async def play(env, task, tokenizer, actions):
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    policy = ReplayPolicy(tokenizer, [XMLScaffold().render(a) for a in actions], stop)
    episode, reward, _ = await play_task(env, task, policy, tokenizer, "xml",
                                         SamplingParams(stop_token_ids=(stop,)), EpisodeLimits())
    assert episode.end_reason == "answer"
    return reward


async def test_oracle_scores_one_and_an_immediate_answer_zero(tokenizer, env):
    tasks = [env.sample(random.Random(s)) for s in range(16)] + env.eval_tasks(4)
    assert len({t.meta["oracle"][0].split()[0] for t in tasks}) >= 4   # several kinds of step
    for task in tasks:
        assert await play(env, task, tokenizer, env.oracle_actions(task)) == 1.0, task.meta
    for task in tasks[:4]:
        assert await play(env, task, tokenizer, [Action("answer", {"answer": "done"})]) == 0.0, task.meta
    # the right command for the wrong kind of step scores 0 too
    task = next(t for t in tasks if t.meta["oracle"][0].split()[:2] == ["sort", next(iter(t.meta["files"]))])
    src, dst = next(iter(task.meta["files"])), task.meta["oracle"][0].split()[-1]
    wrong = [Action("shell", {"cmd": f"tac {src} > {dst}"}), Action("answer", {"answer": "done"})]
    assert await play(env, task, tokenizer, wrong) == 0.0


def test_split_is_by_prompt_and_big_enough():
    env = TerminalEnv(Cfg())
    held = env.eval_tasks(200)
    train = [env.sample(random.Random(s)) for s in range(300)]
    assert not {t.id for t in held} & {t.id for t in train}
    assert not {t.prompt for t in held} & {t.prompt for t in train}
    assert len({t.prompt for t in env.eval_tasks(40)}) == 40
    assert [t.id for t in env.eval_tasks(10)] == [t.id for t in held[:10]]
    assert all(len(t.prompt) < 80 for t in held + train)
