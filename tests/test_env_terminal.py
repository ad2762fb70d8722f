"""Terminal tasks through the full multi-turn loop, in real sandboxes: the oracle's commands
replayed as model turns solve every task; wrong or missing work scores 0."""

import random

import pytest

from envs.terminal import SAMPLES, TaskFormatError, TerminalEnv, generate, load_tasks, parse_row
from rayrl.config import GRPOConfig
from rayrl.models import chat_prompt_ids, load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, SandboxTools, TurnTemplate, run_episode
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.scaffolds import Action, JSONScaffold, XMLScaffold
from rayrl.sandbox.base import Profile
from rayrl.sandbox.client import PoolClient
from rayrl.sandbox.pool import SandboxPool
from rayrl.rollout.replay import ReplayPolicy


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(GRPOConfig().model))


@pytest.fixture
async def pool():
    p = SandboxPool([Profile()], min_idle=0, max_total=2, export_metrics=False)
    yield p
    await p.shutdown()


async def play(tokenizer, pool, env, task, commands, scaffold):
    """One episode in a fresh lease: set up, replay `commands` then an answer, run the checker."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns = [scaffold.render(Action("shell", {"cmd": c})) for c in commands]
    turns.append(scaffold.render(Action("answer", {"answer": "done"})))
    async with PoolClient(pool).session("default") as session:
        await env.prepare(task, session)
        episode = await run_episode(ReplayPolicy(tokenizer, turns, stop), tokenizer, scaffold,
                                    chat_prompt_ids(tokenizer, task.prompt, system=scaffold.system_prompt()),
                                    SandboxTools(session), SamplingParams(stop_token_ids=(stop,)),
                                    EpisodeLimits(), TurnTemplate(tokenizer, stop_ids=(stop,)))
        reward, info = await env.check(task, session)
    assert episode.end_reason == "answer"
    return reward


@pytest.mark.parametrize("scaffold", [XMLScaffold(), JSONScaffold()])
async def test_oracles_solve_sample_and_generated_tasks(tokenizer, pool, scaffold):
    env = TerminalEnv()
    rows = load_tasks(SAMPLES) + [generate(random.Random(s), difficulty=2) for s in range(3)]
    for row in rows:
        task = env.to_task(row)
        assert await play(tokenizer, pool, env, task, row["oracle"], scaffold) == 1.0, row["task_id"]


async def test_wrong_or_missing_work_scores_zero(tokenizer, pool):
    env, scaffold = TerminalEnv(), XMLScaffold()
    rows = load_tasks(SAMPLES)
    for row in rows:
        task = env.to_task(row)
        assert await play(tokenizer, pool, env, task, [], scaffold) == 0.0, row["task_id"]
    # a plausible but wrong command
    sort_task = env.to_task(next(r for r in rows if r["task_id"] == "term-sort"))
    assert await play(tokenizer, pool, env, sort_task, ["sort -r names.txt > sorted.txt"], scaffold) == 0.0


async def test_single_turn_verify_runs_the_script_in_a_fresh_sandbox(pool):
    env = TerminalEnv(pool=pool)
    task = env.to_task(load_tasks(SAMPLES)[0])
    assert (await env.verify(task, env.demonstration(task)))[0] == 1.0
    assert (await env.verify(task, "echo 7 > count.txt"))[0] == 0.0


def test_generator_is_seeded_and_split(tmp_path):
    env = TerminalEnv()
    a = [env.sample(random.Random(1)).id for _ in range(3)]
    assert a == [env.sample(random.Random(1)).id for _ in range(3)]
    held = {t.id for t in env.eval_tasks(20)}
    train = {env.sample(random.Random(s)).id for s in range(200)}
    assert len(held) == 20 and not held & train


def test_bad_rows_name_the_field(tmp_path):
    with pytest.raises(TaskFormatError, match="'check' is missing"):
        parse_row({"task_id": "x", "instruction": "i", "files": {}, "oracle": []}, "t.jsonl:1")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"task_id": "x"\n')
    with pytest.raises(TaskFormatError, match="t.jsonl:1"):
        load_tasks(bad)
