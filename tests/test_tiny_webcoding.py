"""WebCoding difficulty 0 (tiny mode): every oracle page scores 1.0 through the real answer loop
in headless Chromium, a wrong page 0.0, and held-out task ids never occur in training."""

import random

import pytest

from envs.rows import held_out
from envs.webcoding import TINY_TEMPLATES, WebCodingEnv, generate_tiny, parse_row

TINY = type("Cfg", (), {"webcoding_difficulty": 0})()
needs_chromium = pytest.mark.skipif(not WebCodingEnv.available(),
                                    reason="Chromium is not installed (Debian packages chromium, chromium-driver)")


def _all_rows() -> dict[str, dict]:
    rng, rows = random.Random(0), {}
    for _ in range(20000):
        row = generate_tiny(rng)
        rows[row["task_id"]] = row
    return rows


def test_tiny_split_is_disjoint_and_large_enough():
    env = WebCodingEnv(TINY)
    rows = _all_rows()
    for task_id, row in list(rows.items())[:200]:
        parse_row(row, task_id)
    assert len({r["instruction"] for r in rows.values()}) == len(rows)     # one prompt, one task
    held = [i for i in rows if held_out(i, env.eval_fraction)]
    assert len(held) >= 200 and len(rows) - len(held) >= 800
    eval_ids = {t.id for t in env.eval_tasks(200)}
    train_ids = {env.sample(random.Random(s)).id for s in range(300)}
    assert len(eval_ids) == 200 and not eval_ids & train_ids
    assert all(i.startswith("web0-") for i in eval_ids | train_ids)
    task = env.sample(random.Random(1))
    assert len(task.prompt) + len(env.demonstration(task)) < 400


@needs_chromium
async def test_tiny_oracle_scores_one_through_the_loop_and_wrong_pages_zero(tmp_path):
    from rayrl.config import GRPOConfig
    from rayrl.models import load_tokenizer, resolve_model_path
    from rayrl.rollout.agent import EpisodeLimits, play_task
    from rayrl.rollout.engine import SamplingParams
    from rayrl.rollout.replay import ReplayPolicy
    from rayrl.rollout.scaffolds import get_scaffold

    env = WebCodingEnv(TINY, screenshot_dir=tmp_path, timeout_s=15.0)
    tokenizer = load_tokenizer(resolve_model_path(GRPOConfig().model))
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng, seen, tasks = random.Random(3), set(), []
    while len(seen) < len(TINY_TEMPLATES):         # one task of each component
        task = env.sample(rng)
        kind = next(k for k in ('id="title"', 'id="items"', 'id="inc"', 'id="btn"') if k in task.meta["oracle"])
        if kind not in seen:
            seen.add(kind)
            tasks.append(task)
    try:
        for task in tasks:
            for name in ("xml", "json"):
                turns = [get_scaffold(name, env.tools).render(a) for a in env.oracle_actions(task)]
                episode, reward, info = await play_task(env, task, ReplayPolicy(tokenizer, turns, stop), tokenizer,
                                                        name, SamplingParams(stop_token_ids=(stop,)),
                                                        EpisodeLimits(max_tokens=1024, max_new_tokens=512))
                assert episode.end_reason == "answer" and episode.turns == 1
                assert reward == 1.0, (task.prompt, info)
        # another task's page (a different component) fails
        for task, other in zip(tasks, tasks[1:] + tasks[:1]):
            assert (await env.verify(task, env.demonstration(other)))[0] == 0.0
        # a counter and a toggle whose buttons do nothing
        for handler in ("count.textContent++", "msg.hidden=!msg.hidden"):
            task = next(t for t in tasks if handler in t.meta["oracle"])
            assert (await env.verify(task, task.meta["oracle"].replace(handler, "")))[0] == 0.0
    finally:
        await env.aclose()
