"""The spine with the real SmolLM2-135M-Instruct: its own chat template, the same code path as the tiny model.

The first tests drive the plain `RolloutGenerator` and `RewardGrader` classes (no Ray); the slow
one runs the whole driver, `rayrl.pipeline.run`, with `model.path=smollm2`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from envs import Task
from rayrl.algo.advantages import group_advantages
from rayrl.config import GRPOConfig, load
from rayrl.models import SMOLLM2, load_model, load_tokenizer, resolve_model_path, state_dict_numpy
from rayrl.reward.grader import RewardGrader
from rayrl.rollout.generator import RolloutGenerator
from rayrl.tree import NOT_SAMPLED, summarize

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "grpo.yaml")
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"


@pytest.fixture(scope="module")
def smollm2_dir():
    """The converted SmolLM2 folder, exactly as a run with `model.path=smollm2` resolves it."""
    cfg = GRPOConfig()
    cfg.model.path = SMOLLM2
    return resolve_model_path(cfg.model)


def _generator(path: str, **rollout) -> RolloutGenerator:
    cfg = GRPOConfig()
    return RolloutGenerator(path, replace(cfg.rollout, **rollout), cfg.task, seed=0)


async def _close(gen: RolloutGenerator) -> None:
    """Cancel the batcher's serve task, so that the test's event loop closes cleanly."""
    task = gen._serve_task
    if task is not None and not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def _check_stop_handling(leaf, stop_id: int, max_new_tokens: int) -> None:
    """A sequence ends right after `<|im_end|>` ("stop") or at the token budget ("length"), never later."""
    tokens = leaf.tokens.tolist()
    assert stop_id not in tokens[:-1], "generation went on past <|im_end|>"
    if leaf.meta["finish_reason"] == "stop":
        assert tokens[-1] == stop_id and len(tokens) <= max_new_tokens
    else:
        assert leaf.meta["finish_reason"] == "length"
        assert len(tokens) == max_new_tokens and tokens[-1] != stop_id


async def test_smollm2_rollout_group_uses_its_chat_template_and_engine_tokens(smollm2_dir):
    max_new = 12
    gen = _generator(smollm2_dir, group_size=2, max_new_tokens=max_new, temperature=1.0)
    tokenizer = gen.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.unk_token_id and im_end in gen.params.stop_token_ids
    calls = []   # every engine call: (prompts, params, completions)
    engine_generate = gen.engine.generate

    def spy(prompts, params):
        completions = engine_generate(prompts, params)
        calls.append((prompts, params, completions))
        return completions

    gen.engine.generate = spy
    try:
        task = gen.env.sample(random.Random(7))
        tree = await gen.rollout_group(task, "g-0")

        # -- the prompt: SmolLM2's own template (default system prompt included), tokenized once
        messages = [{"role": "user", "content": task.prompt}]
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        prompt = tree.nodes[0].tokens
        assert prompt.tolist() == list(expected)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.startswith(SYSTEM_PROMPT), text
        assert text.endswith(f"<|im_start|>user\n{task.prompt}<|im_end|>\n<|im_start|>assistant\n"), text
        # the special tokens are single ids, not spelled out piecewise
        assert prompt.tolist() == tokenizer.encode(text, add_special_tokens=False)
        assert prompt.tolist().count(im_end) == 2
        assert (tree.nodes[0].loss_mask == 0).all() and (tree.nodes[0].versions == NOT_SAMPLED).all()
        assert tree.meta == {"group_id": "g-0", "task": vars(task)}

        # -- the leaves: exactly what the engine sampled, at the engine's version
        leaves = [tree.nodes[i] for i in tree.leaves()]
        assert len(leaves) == 2 and all(leaf.parent == 0 for leaf in leaves)
        assert len(calls) == 1, "the group's samples were not batched into one engine call"
        prompts, params, completions = calls[0]
        assert [list(p) for p in prompts] == [prompt.tolist()] * 2
        assert (params.max_new_tokens, params.temperature, params.stop_token_ids) == (max_new, 1.0, (im_end,))
        scored = gen.engine.score([prompt] * 2, [leaf.tokens for leaf in leaves],
                                  temperature=params.logprob_temperature())
        for leaf, completion, score in zip(leaves, completions, scored):
            assert 1 <= len(leaf) <= max_new
            np.testing.assert_array_equal(leaf.tokens, completion.tokens)
            np.testing.assert_array_equal(leaf.logprobs, completion.logprobs)
            assert leaf.meta["finish_reason"] == completion.finish_reason
            np.testing.assert_allclose(leaf.logprobs, score, atol=1e-4)
            assert np.isfinite(leaf.logprobs).all() and (leaf.logprobs <= 0).all()
            assert (leaf.loss_mask == 1).all()
            assert gen.version() == 0 and (leaf.versions == 0).all()
            _check_stop_handling(leaf, im_end, max_new)
        for path, leaf in zip(tree.paths(), leaves):
            np.testing.assert_array_equal(path.tokens, np.concatenate([prompt, leaf.tokens]))
        assert gen.stats()["gen_tokens"] == sum(len(leaf) for leaf in leaves)

        # -- grading: verifier rewards in {0, 1}, group-relative advantages on every leaf. An oracle
        # leaf (the SFT demonstration, ended like a chat turn) makes sure both rewards occur.
        answer = tokenizer.encode(task.answer, add_special_tokens=False) + [im_end]
        tree.add(0, answer, np.zeros(len(answer)), np.ones(len(answer)), np.zeros(len(answer)),
                 meta={"finish_reason": "stop"})
        grader = RewardGrader(GRPOConfig().task, smollm2_dir, "grpo")
        assert grader.response_text(tree, tree.leaves()[-1]) == task.answer  # <|im_end|> is not text
        graded, meta = await grader.grade(tree)
        rewards = graded.rewards()
        assert set(rewards) <= {0.0, 1.0} and rewards[-1] == 1.0
        for i in graded.leaves()[:2]:
            text = tokenizer.decode(graded.nodes[i].tokens.tolist(), skip_special_tokens=True)
            exact = re.fullmatch(r"-?\d+", text.strip()) is not None and int(text) == int(task.answer)
            assert rewards[graded.leaves().index(i)] == float(exact)
        advantages = [graded.nodes[i].advantage for i in graded.leaves()]
        assert all(a is not None and math.isfinite(a) for a in advantages)
        np.testing.assert_allclose(advantages, group_advantages(np.array(rewards)), atol=1e-9)
        assert advantages[-1] > 0 and abs(sum(advantages)) < 1e-6
        assert meta == summarize(graded) and meta["rewards"] == rewards and meta["id"] == "g-0"
    finally:
        await _close(gen)


async def test_smollm2_im_end_stops_and_new_weights_set_the_version(smollm2_dir):
    """Greedy on a question SmolLM2 answers in a few tokens: the turn ends at `<|im_end|>`, which stays
    in the sample (the learner trains on it). Weights published as version 1 are swapped in before
    the next batch, and every sampled token records it."""
    max_new = 12
    gen = _generator(smollm2_dir, group_size=2, max_new_tokens=max_new, temperature=0.0)
    im_end = gen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    task = Task(id="q", prompt="What is 2+2? Answer with just the number.", answer="4")
    try:
        tree = await gen.rollout_group(task, "g-stop")
        leaves = [tree.nodes[i] for i in tree.leaves()]
        for leaf in leaves:
            assert leaf.meta["finish_reason"] == "stop", gen.tokenizer.decode(leaf.tokens)
            assert len(leaf) < max_new
            _check_stop_handling(leaf, im_end, max_new)
            assert "4" in gen.tokenizer.decode(leaf.tokens.tolist(), skip_special_tokens=True)
        np.testing.assert_array_equal(leaves[0].tokens, leaves[1].tokens)  # greedy

        weights = {k: v.copy() for k, v in state_dict_numpy(gen.engine.model).items()}
        published = asyncio.get_running_loop().create_future()   # stands in for the ObjectRef
        published.set_result(weights)
        gen.set_weights(1, [published])
        assert gen.version() == 0   # not before the next engine call
        tree = await gen.rollout_group(task, "g-v1")
        assert gen.version() == 1 and tree.min_version == 1
        for i in tree.leaves():
            assert (tree.nodes[i].versions == 1).all()
            np.testing.assert_array_equal(tree.nodes[i].tokens, leaves[0].tokens)  # same weights, same answer
    finally:
        await _close(gen)


@pytest.mark.slow
def test_smollm2_grpo_pipeline_end_to_end(smollm2_dir, ray_session, tmp_path):
    from rayrl.pipeline import run

    run_dir = tmp_path / "run"
    cfg = load(GRPOConfig, RECIPE, [
        f"model.path={SMOLLM2}", f"run.dir={run_dir}", "run.progress=false",
        "trainer.sft.steps=2", "trainer.sft.batch_size=4", "trainer.total_steps=2", "trainer.groups_per_step=2",
        "trainer.eval.every=0", "rollout.group_size=4", "rollout.max_new_tokens=8", "task.eval_size=8",
        "replay.filter_zero_variance=false",
    ])
    assert cfg.learner.num_workers == 2
    start = time.perf_counter()
    summary = run(cfg)
    elapsed = time.perf_counter() - start
    print(f"\nSmolLM2 pipeline: {elapsed:.1f} s, summary {json.dumps(summary)}")

    assert summary["model"] == smollm2_dir
    with open(run_dir / "summary.json") as f:
        saved = json.load(f)
    for key in ("eval_init", "eval_before", "eval_after"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["steps"] == 2

    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    sft = [r for r in records if r.get("phase") == "sft"]
    rl = [r for r in records if r["step"] >= 1]
    assert [r["step"] for r in sft] == [-1, 0] and all(math.isfinite(r["sft_nll"]) for r in sft)
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:
        assert math.isfinite(r["learner/loss"]) and math.isfinite(r["learner/grad_norm"])
        assert r["samples"] == 2 * 4 and r["staleness_max"] <= cfg.replay.max_staleness
        assert r["learner/loss_tokens"] > 0 and math.isfinite(r["learner/nll"])
    # The first RL step trains on samples of the version it starts from: the learner (DeepSpeed,
    # right-padded batches) recomputes the engine's log-probs (left-padded, KV-cached) of SmolLM2.
    assert rl[0]["staleness_max"] == 0
    assert rl[0]["learner/mismatch_kl"] < 1e-4 and abs(rl[0]["learner/is_weight_max"] - 1.0) < 1e-2

    final = run_dir / "checkpoints" / "final"
    assert summary["checkpoint"] == str(final)
    trained, original = load_model(str(final)), load_model(smollm2_dir)
    assert [n for n, _ in trained.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert all(p.shape == q.shape for p, q in zip(trained.parameters(), original.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), original.parameters())), \
        "the final checkpoint holds the untrained weights"
    assert trained.config.tie_word_embeddings
    tokenizer = load_tokenizer(str(final))
    assert tokenizer.chat_template == load_tokenizer(smollm2_dir).chat_template
    with open(final / "trainer_state.json") as f:
        assert json.load(f)["version"] == 1 + 2   # the SFT warm start, then one per RL step
