"""Graded episodes per second, per domain, through the full agent loop in real sandboxes.

Each episode replays the task's oracle actions as model turns (so the figures measure the
environment: tools, sandboxes and verifiers, not a model) and is scored by the domain's grader.
Baseline: the same episodes one at a time; measured against it: `concurrency` episodes in flight,
as a rollout generator runs them.

    python benchmarks/envs.py [episodes=24] [concurrency=8]

Last line: JSON {"domains": {name: {"sequential_eps", "concurrent_eps", "speedup", "reward_mean"}}, ...}.
"""

import asyncio
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._args import parse  # noqa: E402
from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import GRPOConfig  # noqa: E402

DEFAULTS = {"episodes": 24, "concurrency": 8}


async def make_envs(pool) -> dict:
    from envs import make_env
    from envs.swe import SAMPLE_REPO, SWEEnv
    from envs.swe.synthesize import synthesize
    cfg = GRPOConfig().task
    out = {}
    for name in ("arith", "code", "terminal", "websearch", "math", "general", "webcoding"):
        cfg.name = name
        out[name] = make_env(cfg, 0, pool=pool)
    tasks, _ = await synthesize(SAMPLE_REPO, pool=pool, max_tasks=6, seed=0, progress=False)
    out["swe"] = SWEEnv(tasks, pool)
    return out


async def run_domain(env, tokenizer, episodes: int, concurrency: int, scaffold: str = "xml") -> dict:
    from rayrl.rollout.agent import EpisodeLimits, play_task
    from rayrl.rollout.engine import SamplingParams
    from rayrl.rollout.replay import ReplayPolicy
    from rayrl.rollout.scaffolds import get_scaffold
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params, limits = SamplingParams(stop_token_ids=(stop,)), EpisodeLimits(max_tokens=1 << 16, max_new_tokens=1 << 14)
    rng = random.Random(0)
    tasks = [env.sample(rng) for _ in range(episodes)]
    render = get_scaffold(scaffold, env.tools).render

    async def one(task):
        policy = ReplayPolicy(tokenizer, [render(a) for a in env.oracle_actions(task)], stop)
        _, reward, _ = await play_task(env, task, policy, tokenizer, scaffold, params, limits)
        return reward

    start = time.perf_counter()
    rewards = [await one(t) for t in tasks]
    sequential = episodes / (time.perf_counter() - start)
    sem = asyncio.Semaphore(concurrency)

    async def bounded(task):
        async with sem:
            return await one(task)

    start = time.perf_counter()
    rewards += await asyncio.gather(*(bounded(t) for t in tasks))
    concurrent = episodes / (time.perf_counter() - start)
    return {"sequential_eps": round(sequential, 2), "concurrent_eps": round(concurrent, 2),
            "speedup": round(concurrent / sequential, 2), "reward_mean": round(sum(rewards) / len(rewards), 3)}


async def measure(episodes: int, concurrency: int) -> dict:
    from envs.swe import swe_backend_options, swe_profile
    from rayrl.models import load_tokenizer, resolve_model_path
    from rayrl.sandbox.base import Profile
    from rayrl.sandbox.pool import SandboxPool
    tokenizer = load_tokenizer(resolve_model_path(GRPOConfig().model))
    pool = SandboxPool([Profile(), swe_profile()], min_idle=0, max_total=2 * concurrency, export_metrics=False,
                       backend_options=swe_backend_options())
    results = {}
    try:
        for name, env in (await make_envs(pool)).items():
            results[name] = await run_domain(env, tokenizer, episodes, concurrency)
            await env.aclose()
            print(f"  {name}: {results[name]}", flush=True)
    finally:
        await pool.shutdown()
    return results


def main(argv: list[str]) -> None:
    args = parse(argv, __doc__, DEFAULTS)
    episodes, concurrency = args["episodes"], args["concurrency"]
    results = asyncio.run(measure(episodes, concurrency))
    print(f"\n{'domain':<10}{'sequential eps/s':>18}{f'{concurrency} in flight eps/s':>20}{'speedup':>9}{'oracle reward':>15}")
    for name, r in results.items():
        print(f"{name:<10}{r['sequential_eps']:>18.2f}{r['concurrent_eps']:>20.2f}{r['speedup']:>9.2f}"
              f"{r['reward_mean']:>15.3f}")
    print(json.dumps({"domains": results, "episodes": episodes, "concurrency": concurrency}))


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
