"""Measuring MCLA and routing replay on an MoE model, in one process, through the real code paths:
the torch engine samples and computes the behaviour log-probs (engine-side passes, recorded
routes), a learner worker computes the old log-probs (learner-side passes, replayed routes) on the
same samples, and the log importance weights log(pi_old / pi_b) between the two are summarized
(rayrl.algo.mcla.log_weight_stats). Used by benchmarks/mcla.py and the tests.

The engine and the learner hold separate copies of the model with their own router-noise streams,
as two processes would.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from envs import make_env
from rayrl.algo.mcla import log_weight_stats
from rayrl.config import LearnerConfig, LossConfig, MCLAConfig, TaskConfig
from rayrl.learner.worker import LearnerWorker
from rayrl.models import chat_prompt_ids, load_model, load_tokenizer
from rayrl.models.moe import replay_routes, routes_to_bytes, routing
from rayrl.rollout.engine import Completion, SamplingParams
from rayrl.rollout.torch_engine import TorchEngine
from rayrl.tree import TrajectoryTree


def local_worker(model: torch.nn.Module, loss_cfg: LossConfig) -> LearnerWorker:
    """A learner worker whose engine is `model` itself (no DeepSpeed, one rank), on per-path
    padded batches: each path's own forward, as the engine scored it."""
    worker = LearnerWorker("", LearnerConfig(num_workers=1, tree_training=False, loss=loss_cfg), rank=0,
                           world_size=1)
    worker.engine, worker.device = model, torch.device("cpu")
    return worker


def arith_env(seed: int = 0):
    return make_env(TaskConfig(name="arith", max_operand=99, ops="+"), seed)


def warm_start(path: str, out_dir: str, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> str:
    """SFT the model at `path` on arithmetic demonstrations (exact router, no noise) so that its
    outputs are peaked and its experts specialized, as a trained model's are; saves to `out_dir`."""
    torch.manual_seed(seed)
    model, tokenizer = load_model(path), load_tokenizer(path)
    if routing(model) is not None:
        routing(model).noise = 0.0   # trained on exact routing; the saved config keeps its noise
    worker = local_worker(model, LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    env, rng = arith_env(seed), random.Random(seed)
    model.train()
    for _ in range(steps):
        trees = []
        for task in (env.sample(rng) for _ in range(batch_size)):
            answer = tokenizer.encode(env.demonstration(task), add_special_tokens=False) + [tokenizer.eos_token_id]
            tree = TrajectoryTree(chat_prompt_ids(tokenizer, task.prompt))
            tree.add(0, answer, loss_mask=np.ones(len(answer), np.uint8))
            trees.append(tree)
        paths = [p for t in trees for p in t.paths()]
        totals = {"loss_tokens": sum(int(p.loss_mask.sum()) for p in paths), "num_paths": len(paths)}
        loss, _ = worker._micro_loss(worker._batch_tensors(paths, "sft", 0.0), "sft", totals)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def sample(engine: TorchEngine, tokenizer, n: int, max_new_tokens: int = 8, seed: int = 0):
    """n training arithmetic prompts and one sampled completion each (temperature 1)."""
    env, rng = arith_env(seed), random.Random(seed + 1)
    prompts = [chat_prompt_ids(tokenizer, env.sample(rng).prompt) for _ in range(n)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    saved = engine.logprob_passes, engine.record_routes
    engine.logprob_passes, engine.record_routes = 1, False   # the sampling pass's own log-probs
    completions = engine.generate(prompts, params)
    engine.logprob_passes, engine.record_routes = saved
    return prompts, completions, params


def log_weights(engine: TorchEngine, learner: torch.nn.Module, prompts, completions: list[Completion],
                params: SamplingParams, k: int, replay: bool, loss_cfg: LossConfig | None = None) -> dict:
    """Statistics of log(pi_old / pi_b) over the sampled tokens when both sides use k passes
    (k = 1 on the engine: the sampling pass itself, unless routes are recorded)."""
    loss_cfg = replace(loss_cfg or LossConfig(), mcla=MCLAConfig(k=k, side="both", routing_replay=replay))
    engine.logprob_passes, engine.record_routes = k, replay
    behaviour = engine._rescore(prompts, completions, params)
    trees = []
    for prompt, c in zip(prompts, behaviour):
        tree = TrajectoryTree(prompt)
        tree.add(0, c.tokens, c.logprobs, np.ones(len(c.tokens), np.uint8),
                 meta={} if c.routes is None else {"routes": routes_to_bytes(c.routes)})
        trees.append(tree)
    worker = local_worker(learner, loss_cfg)
    tensors = worker._batch_tensors([p for t in trees for p in t.paths()], "rl", 0.0)
    with torch.no_grad():
        with replay_routes(learner, tensors.get("routes")):
            logprobs = worker._token_logprobs(tensors)
        old = worker._mcla_logprobs(tensors, logprobs)
    old = logprobs if old is None else old
    return log_weight_stats(old - tensors["behaviour"], tensors["loss_mask"], loss_cfg.icepop_low,
                            loss_cfg.icepop_high)


def engine_and_learner(path: str, engine_seed: int = 1, learner_seed: int = 2) -> tuple[TorchEngine, torch.nn.Module]:
    """Two copies of the model, as in two processes: an engine and a learner's model, each with
    its own router-noise stream."""
    engine, learner = TorchEngine(path, seed=engine_seed), load_model(path)
    for model, seed in ((engine.model, engine_seed), (learner, learner_seed)):
        if routing(model) is not None:
            routing(model).reseed(seed * 7919)
    return engine, learner


def measure(path: str, ks=(1, 2, 4, 8), n: int = 256, seed: int = 0) -> dict:
    """{(k, replay): stats} on one set of samples from the model at `path`."""
    engine, learner = engine_and_learner(path)
    prompts, completions, params = sample(engine, load_tokenizer(path), n, seed=seed)
    moe = routing(learner) is not None
    return {(k, replay): log_weights(engine, learner, prompts, completions, params, k, replay)
            for replay in ((False, True) if moe else (False,)) for k in ks}
