"""Every domain through the full multi-turn loop in real sandboxes.

- The oracle's actions, replayed as model turns, score 1.0; an immediate wrong answer scores 0.
- With the real SmolLM2-135M-Instruct and its chat template, one episode per domain keeps
  exactly the tokens, masks and behaviour log-probs the engine produced (whatever the reward).
"""

import random

import numpy as np
import pytest

from envs import make_env
from envs.swe import SAMPLE_REPO, SWEEnv, swe_backend_options, swe_profile
from envs.swe.synthesize import synthesize
from rayrl.config import GRPOConfig
from rayrl.models import SMOLLM2, load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, play_task
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.replay import ReplayPolicy
from rayrl.rollout.scaffolds import Action, get_scaffold
from rayrl.sandbox.base import Profile
from rayrl.sandbox.pool import SandboxPool
from rayrl.tree import TrajectoryTree

DOMAINS = ["arith", "code", "terminal", "websearch", "math", "general", "webcoding", "swe"]


@pytest.fixture
async def world():
    """A sandbox pool serving every domain, and a factory of environments on it."""
    pool = SandboxPool([Profile(), swe_profile()], min_idle=0, max_total=4, export_metrics=False,
                       backend_options=swe_backend_options())
    made = []

    async def env_for(name):
        if name == "swe":
            tasks, _ = await synthesize(SAMPLE_REPO, pool=pool, max_tasks=3, progress=False)
            env = SWEEnv(tasks, pool)
        else:
            cfg = GRPOConfig().task
            cfg.name, cfg.code_source = name, "samples"
            env = make_env(cfg, 0, pool=pool)
        made.append(env)
        return env

    yield env_for
    for env in made:
        await env.aclose()
    await pool.shutdown()


@pytest.mark.parametrize("scaffold", ["xml", "json"])
@pytest.mark.parametrize("domain", DOMAINS)
async def test_oracle_scores_one_and_a_wrong_answer_zero(world, domain, scaffold):
    env = await world(domain)
    tok = load_tokenizer(resolve_model_path(GRPOConfig().model))
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    params, limits = SamplingParams(stop_token_ids=(stop,)), EpisodeLimits(max_tokens=1 << 16, max_new_tokens=1 << 14)
    render = get_scaffold(scaffold, env.tools).render
    rng = random.Random(1)
    for task in [env.sample(rng) for _ in range(2)]:
        oracle = ReplayPolicy(tok, [render(a) for a in env.oracle_actions(task)], stop)
        episode, reward, info = await play_task(env, task, oracle, tok, scaffold, params, limits)
        assert reward == 1.0, (domain, task.id, info)
        wrong = ReplayPolicy(tok, [render(Action("answer", {"answer": "no idea"}))], stop)
        episode, reward, info = await play_task(env, task, wrong, tok, scaffold, params, limits)
        assert reward == 0.0 and episode.end_reason == "answer", (domain, task.id, info)


@pytest.mark.slow
@pytest.mark.parametrize("domain", DOMAINS)
async def test_smollm2_episode_keeps_what_the_engine_produced(world, domain):
    from rayrl.rollout.torch_engine import TorchEngine
    cfg = GRPOConfig()
    cfg.model.path = SMOLLM2
    path = resolve_model_path(cfg.model)
    tok, engine = load_tokenizer(path), TorchEngine(path, seed=0)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    produced = []

    async def generate(ids, params):
        (out,) = engine.generate([ids], params)
        produced.append(out)
        return out

    env = await world(domain)
    task = env.sample(random.Random(0))
    params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_token_ids=(stop,), seed=0)
    episode, reward, info = await play_task(env, task, generate, tok, "xml", params, EpisodeLimits(max_turns=2))
    assert 0.0 <= reward <= 1.0
    tree = TrajectoryTree(episode.prompt)
    episode.add_to(tree)
    sampled = [n for n in tree.nodes[1:] if n.loss_mask.any()]
    assert len(sampled) == len(produced) == episode.turns >= 1
    for node, out in zip(sampled, produced):
        assert np.array_equal(node.tokens, out.tokens) and np.array_equal(node.logprobs, out.logprobs)
        assert node.loss_mask.all() and set(node.versions.tolist()) == {out.version}
    for node in tree.nodes[1:]:
        if not node.loss_mask.any():
            assert node.meta["role"] == "observation" and not node.logprobs.any()
    # scoring the whole path in one forward gives the log-probs recorded turn by turn
    (path,) = tree.paths()
    n = len(episode.prompt)
    scored = engine.score([episode.prompt], [path.tokens[n:].tolist()])[0]
    mask = path.loss_mask[n:].astype(bool)
    assert np.allclose(scored[mask], path.logprobs[n:][mask], atol=1e-4)


def test_a_task_space_too_small_for_the_held_out_set_is_an_error_not_a_hang():
    from envs.base import GeneratedEnv, Task

    class TwoTasks(GeneratedEnv):
        domain = "two"
        eval_fraction = 0.5

        def generate_row(self, rng):
            return {"task_id": f"t{rng.randint(0, 1)}"}

        def to_task(self, row):
            return Task(row["task_id"], "p", "a", self.domain)

        def demonstration(self, task):
            return task.answer

        async def verify(self, task, response):
            return 0.0, {}

    with pytest.raises(ValueError, match="two: only [01] distinct held-out tasks in 3000 draws, 3 asked"):
        TwoTasks().eval_tasks(3)   # two tasks in all
