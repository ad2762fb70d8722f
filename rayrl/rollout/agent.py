"""The multi-turn agent loop: model turns, tool calls in a leased sandbox, observations as tokens.

Token-in/token-out: the prompt is rendered with the chat template once; each model turn appends
exactly the sampled ids; each observation appends the ids of the template's text between two turns
with the tool output in it, tokenized once. Nothing already in the context is re-tokenized, so the
learner trains on exactly what the engine sampled. Bad model output ends the episode with a
recorded reason (reward 0 from the verifier), never an exception.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.scaffolds import Action, Scaffold
from rayrl.tree import NOT_SAMPLED, TrajectoryTree

_MARK = "@@RAYRL@@"


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 8
    max_tokens: int = 2048            # sampled plus observation tokens after the prompt
    max_new_tokens: int = 256         # per model turn
    wall_s: float = 300.0
    observation_chars: int = 2000     # tool output shown to the model is cut to this
    max_context: int | None = None    # the engine's (Engine.max_context): a context that fills it ends the episode


@dataclass
class Segment:
    tokens: np.ndarray
    logprobs: np.ndarray
    sampled: bool
    version: int
    meta: dict = field(default_factory=dict)


@dataclass
class Episode:
    prompt: list[int]
    segments: list[Segment]
    answer: str | None                # the submitted answer, if the episode got that far
    end_reason: str                   # answer | invalid: ... | max_turns | max_tokens | max_context | wall_time
    turns: int

    def add_to(self, tree: TrajectoryTree, parent: int = 0) -> int:
        """Append the episode below `parent` as a chain of nodes; returns the leaf."""
        node = parent
        for i, seg in enumerate(self.segments):
            n = len(seg.tokens)
            node = tree.add(node, seg.tokens, seg.logprobs, np.full(n, int(seg.sampled), np.uint8),
                            np.full(n, seg.version if seg.sampled else NOT_SAMPLED, np.int32),
                            meta={"role": "assistant" if seg.sampled else "observation", "turn": i // 2, **seg.meta})
        tree.nodes[node].meta.update(end_reason=self.end_reason, turns=self.turns,
                                     answer=self.answer if self.answer is not None else "")
        return node


class TurnTemplate:
    """The chat template's text between the end of a model turn and the start of the next one,
    split around the observation: `prefix + observation + suffix`."""

    def __init__(self, tokenizer, role: str = "user", stop_ids: tuple[int, ...] = ()):
        chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}]
        base = tokenizer.apply_chat_template(chat, tokenize=False)
        ext = tokenizer.apply_chat_template(chat + [{"role": role, "content": _MARK}], tokenize=False,
                                            add_generation_prompt=True)
        head = base[:base.index(_MARK) + len(_MARK)]
        if not ext.startswith(head) or ext.count(_MARK) != 2:
            raise ValueError("the chat template does not render turns by appending: cannot build "
                             "observation turns without re-tokenizing")
        self.prefix, self.suffix = ext[len(head):].split(_MARK)
        self.tokenizer = tokenizer
        self.stop_texts = {tokenizer.decode([i]) for i in stop_ids}

    def ids(self, observation: str, turn_ended_with_stop: bool) -> list[int]:
        prefix = self.prefix
        if turn_ended_with_stop:   # the sampled turn already holds the end-of-turn token
            prefix = next((prefix[len(t):] for t in self.stop_texts if prefix.startswith(t)), prefix)
        # Tool output is text whatever it holds: a command that prints "<|im_end|><|im_start|>
        # assistant" gets those characters, not the template's control tokens (a forged turn).
        return (self.tokenizer.encode(prefix, add_special_tokens=False)
                + self.tokenizer.encode(observation, add_special_tokens=False, split_special_tokens=True)
                + self.tokenizer.encode(self.suffix, add_special_tokens=False))


class SandboxTools:
    """Runs shell and write actions in the episode's sandbox (a rayrl.sandbox.client.Session)."""

    def __init__(self, session, timeout_s: float = 10.0):
        self.session, self.timeout_s = session, timeout_s

    async def run(self, action: Action) -> str:
        if action.kind not in ("shell", "write"):
            raise ValueError(f"no tool runs action {action.kind!r}")
        try:
            if action.kind == "shell":
                r = await self.session.exec(action.args["cmd"], timeout=self.timeout_s)
                text = (r.stdout + r.stderr).decode(errors="replace")
                if r.outcome.value != "normal":
                    text += f"\n[{r.outcome.value}]"
                elif r.exit_code:
                    text += f"\n[exit code {r.exit_code}]"
                return text
            await self.session.write_file(action.args["path"], action.args["content"].encode())
            return f"wrote {action.args['path']}"
        except (OSError, ValueError) as err:
            # The sandbox refused the model's arguments (a read-only or missing path, a NUL, a
            # lone surrogate): the model sees why, as a shell would tell it. Infrastructure
            # failures are SandboxInfraError (a RuntimeError) and propagate.
            return f"error: {err}"


async def run_episode(generate, tokenizer, scaffold: Scaffold, prompt: list[int], tools, params: SamplingParams,
                      limits: EpisodeLimits, template: TurnTemplate) -> Episode:
    """`generate(ids, params) -> Completion` is the engine (batched by the generator)."""
    context, segments = list(prompt), []
    start, used, turns = time.monotonic(), 0, 0
    answer, reason = None, "max_turns"
    stop_ids = set(params.stop_token_ids)
    while turns < limits.max_turns:
        budget = min(limits.max_new_tokens, limits.max_tokens - used)
        if budget <= 0:
            reason = "max_tokens"
            break
        if time.monotonic() - start > limits.wall_s:
            reason = "wall_time"
            break
        if limits.max_context is not None and len(context) >= limits.max_context:
            reason = "max_context"
            break
        out = await generate(context, replace(params, max_new_tokens=budget))
        turns += 1
        segments.append(Segment(out.tokens, out.logprobs, True, out.version, {"finish_reason": out.finish_reason}))
        context += out.tokens.tolist()
        used += len(out.tokens)
        action = scaffold.parse(tokenizer.decode(out.tokens.tolist(), skip_special_tokens=True))
        if action.kind == "answer":
            answer, reason = action.args["answer"], "answer"
            break
        if action.kind == "invalid":
            reason = f"invalid: {action.reason}"
            break
        observation = (await tools.run(action))[:limits.observation_chars]
        ended = len(out.tokens) > 0 and int(out.tokens[-1]) in stop_ids
        obs = np.asarray(template.ids(observation, ended), np.int32)
        segments.append(Segment(obs, np.zeros(len(obs), np.float32), False, NOT_SAMPLED, {"tool": action.kind}))
        context += obs.tolist()
        used += len(obs)
    return Episode(list(prompt), segments, answer, reason, turns)


async def play_task(env, task, generate, tokenizer, scaffold_name: str, params: SamplingParams,
                    limits: EpisodeLimits, score: bool = True) -> tuple[Episode, float | None, dict]:
    """One episode of `task` in its environment: tools set up, the loop run, the result scored
    (unless `score` is false: the reward is then None)."""
    from envs.base import guarded_verdict
    from rayrl.models import chat_prompt_ids
    from rayrl.rollout.scaffolds import get_scaffold
    scaffold = get_scaffold(scaffold_name, env.tools)
    prompt = chat_prompt_ids(tokenizer, task.prompt, system=scaffold.system_prompt())
    template = TurnTemplate(tokenizer, stop_ids=params.stop_token_ids)
    async with env.episode(task) as tools:
        episode = await run_episode(generate, tokenizer, scaffold, prompt, tools, params, limits, template)
        reward, info = await guarded_verdict(env.score(task, episode.answer, tools), task) if score else (None, {})
    return episode, reward, {**info, "end_reason": episode.end_reason}


async def oracle_episode(env, task, tokenizer, scaffold_name: str, stop_id: int, limits: EpisodeLimits) -> Episode:
    """The oracle's actions played through the real tools: a demonstration with true observations.

    Not scored: only the tokens are needed (for SFT), and they are the ones a model would have to
    produce and see."""
    from rayrl.models import chat_prompt_ids
    from rayrl.rollout.replay import ReplayPolicy
    from rayrl.rollout.scaffolds import get_scaffold
    scaffold = get_scaffold(scaffold_name, env.tools)
    turns = [scaffold.render(a) for a in env.oracle_actions(task)]
    policy = ReplayPolicy(tokenizer, turns, stop_id, version=NOT_SAMPLED)
    prompt = chat_prompt_ids(tokenizer, task.prompt, system=scaffold.system_prompt())
    params = SamplingParams(stop_token_ids=(stop_id,))
    async with env.episode(task) as tools:
        return await run_episode(policy, tokenizer, scaffold, prompt, tools, params, limits,
                                 TurnTemplate(tokenizer, stop_ids=(stop_id,)))
