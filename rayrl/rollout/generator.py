"""RolloutGenerator: runs episodes continuously and turns them into trajectory trees.

Many episodes are in flight at once (their environment steps overlap); their model turns are
gathered into batched engine calls. New weights are picked up between engine calls, so every
sampled token records the version that produced it.

Two episode forms, by `rollout.scaffold`: `none`, one answer turn graded afterwards by the
RewardGrader (the toy domains); `xml` / `json`, the multi-turn agent loop (rayrl.rollout.agent)
with the domain's tools, scored in the episode's own sandbox before the tree leaves the generator.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import time
from dataclasses import replace

import numpy as np

from envs import Task, make_env
from envs.base import guarded_verdict
from envs.pools import close_env, local_pool
from rayrl.algo.mcla import mcla_passes
from rayrl.models import chat_prompt_ids, load_tokenizer
from rayrl.models.moe import routes_to_bytes, routing
from rayrl.rollout.agent import EpisodeLimits, oracle_episode, play_task
from rayrl.rollout.engine import Completion, SamplingParams
from rayrl.sandbox.base import SandboxInfraError
from rayrl.tree import TrajectoryTree, summarize


def sample_seed(seed: int, sample: int, turn: int = 0) -> int:
    """The seed of turn `turn` of sample `sample` of the group whose ticket seed is `seed`."""
    return random.Random(f"{seed}:{sample}:{turn}").getrandbits(63)


TOO_LONG_PRINTED = 5


class _Batcher:
    """Collects concurrent generate requests into one engine call (the engine runs in a thread)."""

    def __init__(self, engine, max_batch: int):
        self.engine = engine
        self.max_batch = max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending_weights: tuple[int, object] | None = None
        # Held through every engine call and weight swap: weights change only between calls, so
        # an episode in flight samples its next turn with the new version (partial rollouts).
        self.engine_lock = asyncio.Lock()
        self.busy_s = 0.0
        self.tokens = 0
        self.too_long = 0   # prompts the engine's context could not take

    async def generate(self, prompt, params: SamplingParams) -> Completion:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((prompt, params, future))
        return await future

    async def apply_weights(self) -> None:
        async with self.engine_lock:
            if self.pending_weights is None:   # another caller swapped them in meanwhile
                return
            version, ref = self.pending_weights
            self.pending_weights = None
            if version > self.engine.version:
                state = await ref
                await asyncio.to_thread(self.engine.load_weights, state, version)

    async def serve(self) -> None:
        while True:
            items = [await self.queue.get()]
            await asyncio.sleep(0)   # let the other ready episodes enqueue their turns
            while not self.queue.empty() and len(items) < self.max_batch:
                items.append(self.queue.get_nowait())
            items = [fitted for fitted in map(self._fitted, items) if fitted is not None]
            try:
                await self._run(items)
            except Exception as err:  # fail the episodes that asked, keep serving the others
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(err)

    def _fitted(self, item):
        """The request within the engine's context: its token budget cut to the room its prompt
        leaves (a turn stops there with "length", as vLLM stops at max_model_len). A prompt that
        leaves no room gets an empty completion ending in `max_context` (the agent loop's end reason
        for a full context) and None is returned: its sample scores as an empty answer, and the run
        and the requests batched with it go on. The first few are printed: a data set of prompts too
        long is a configuration problem."""
        prompt, params, fut = item
        limit = self.engine.max_context
        if limit is None or len(prompt) + params.max_new_tokens <= limit:
            return item
        if len(prompt) < limit:
            return prompt, replace(params, max_new_tokens=limit - len(prompt)), fut
        self.too_long += 1
        if self.too_long <= TOO_LONG_PRINTED:
            print(f"a prompt of {len(prompt)} tokens does not fit the engine's context of {limit}: its sample is "
                  f"empty (finish_reason max_context)", flush=True)
        if not fut.done():   # (its episode may have been cancelled meanwhile)
            fut.set_result(Completion(np.zeros(0, np.int32), np.zeros(0, np.float32), "max_context", self.engine.version))
        return None

    async def _run(self, items: list) -> None:
        if self.pending_weights is not None:
            await self.apply_weights()
        # Requests that differ only in their token budget (agent turns late in an episode have
        # less left) share a call at the largest budget; longer outputs are cut to their own.
        by_params: dict[SamplingParams, list] = {}
        for item in items:
            by_params.setdefault(replace(item[1], max_new_tokens=0), []).append(item)
        for params, group in by_params.items():
            start = time.perf_counter()
            budget = max(g[1].max_new_tokens for g in group)
            async with self.engine_lock:
                outs = await asyncio.to_thread(self.engine.generate, [g[0] for g in group],
                                               replace(params, max_new_tokens=budget))
            self.busy_s += time.perf_counter() - start
            for (_, request, fut), out in zip(group, outs):
                if fut.done():   # its episode was cancelled (a stopped run) while the engine ran
                    continue
                if len(out.tokens) > request.max_new_tokens:
                    n, cut = request.max_new_tokens, len(out.tokens) - request.max_new_tokens
                    out = Completion(out.tokens[:n], out.logprobs[:n], "length", out.version,
                                     None if out.routes is None else out.routes[:len(out.routes) - cut])
                self.tokens += len(out.tokens)
                fut.set_result(out)


class RolloutGenerator:
    def __init__(self, model_path: str, rollout_cfg, task_cfg, seed: int = 0, torch_threads: int = 1,
                 mcla=None, sandbox_pool=None):
        import torch

        from rayrl.rollout.engine import create_engine
        torch.set_num_threads(torch_threads)
        self.cfg = rollout_cfg
        self.tokenizer = load_tokenizer(model_path)
        if rollout_cfg.engine == "vllm" and mcla is not None and (
                mcla.routing_replay or (mcla.k > 1 and mcla.side in ("engine", "both"))):
            # (k = 0, auto, is one pass: vLLM routes deterministically, without the tiny models' router noise)
            raise ValueError("rollout.engine=vllm: learner.loss.mcla's engine-side passes and routing replay run "
                             "on the torch engine only (set mcla.side=learner, routing_replay=false)")
        self.engine = create_engine(rollout_cfg.engine, model_path, rollout_cfg.max_batch, seed,
                                    rollout_cfg.vllm_dtype)
        if mcla is not None and rollout_cfg.engine == "torch":   # MCLA's engine-side passes, MoE routing replay
            moe = routing(self.engine.model) is not None
            self.engine.logprob_passes = mcla_passes(mcla, moe)[0]
            self.engine.record_routes = bool(mcla.routing_replay and moe)
        # `sandbox_pool`: the cluster's pools (a SandboxRouter, config `sandbox`); else a pool of its own.
        self.pool, self.own_pool = sandbox_pool, None
        if sandbox_pool is None:
            self.pool = self.own_pool = local_pool(task_cfg)
        self.env = make_env(task_cfg, seed, pool=self.pool)
        self.seed = seed
        self.params = SamplingParams(max_new_tokens=rollout_cfg.max_new_tokens,
                                     temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                                     stop_token_ids=tuple(self.stop_ids()))
        self.limits = EpisodeLimits(max_turns=rollout_cfg.max_turns, max_tokens=rollout_cfg.max_episode_tokens,
                                    max_new_tokens=rollout_cfg.max_new_tokens, max_context=self.engine.max_context)
        self.batcher = _Batcher(self.engine, rollout_cfg.max_batch)
        self._serve_task: asyncio.Task | None = None
        self._workers: asyncio.Future | None = None   # run()'s rollout workers
        self._running = False
        self.groups = 0
        self.env_s = 0.0
        self.infra_failures = 0

    def stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(i for i in ids if i is not None)

    def _ensure_serving(self) -> None:
        if self._serve_task is None or self._serve_task.done():
            self._serve_task = asyncio.get_running_loop().create_task(self.batcher.serve())

    def prompt_tokens(self, task: Task) -> list[int]:
        return chat_prompt_ids(self.tokenizer, task.prompt)

    def set_weights(self, version: int, ref: list) -> None:
        """Queue weights `version` (ref = [ObjectRef]); the engine swaps them in between batches."""
        current = self.batcher.pending_weights
        if current is None or version > current[0]:
            self.batcher.pending_weights = (version, ref[0])

    async def update_weights(self, version: int, ref: list) -> int:
        """`set_weights`, then the swap as soon as no engine call runs (episodes in flight go on
        under the new version); returns the version the engine serves, which the driver checks."""
        self.set_weights(version, ref)
        await self.batcher.apply_weights()
        return self.engine.version

    def version(self) -> int:
        return self.engine.version

    def rng_state(self) -> dict:
        """The engine's random stream (None for an engine that seeds every request itself), for
        checkpoints."""
        state = self.engine.rng_state() if hasattr(self.engine, "rng_state") else None
        return {"engine": None if state is None else base64.b64encode(state).decode()}

    def set_rng_state(self, state: dict) -> None:
        if state["engine"] is not None:
            self.engine.set_rng_state(base64.b64decode(state["engine"]))

    def _seeded_generate(self, seed: int, sample: int):
        """`batcher.generate` drawing turn t of the episode from `sample_seed(seed, sample, t)`."""
        turns = itertools.count()

        async def generate(prompt, params: SamplingParams) -> Completion:
            return await self.batcher.generate(prompt, replace(params, seed=sample_seed(seed, sample, next(turns))))
        return generate

    # -- episodes ---------------------------------------------------------------------------
    async def _sample(self, task: Task, prompt: list[int], params: SamplingParams) -> tuple[Completion, str | None]:
        """One episode; returns the completion and, if the environment's infrastructure failed
        under it, why (the episode is then kept out of the advantages, not scored 0)."""
        completion = await self.batcher.generate(prompt, params)
        text = self.tokenizer.decode(completion.tokens.tolist(), skip_special_tokens=True)
        start = time.perf_counter()
        try:
            await self.env.step(task, text)
            failure = None
        except SandboxInfraError as err:
            failure = str(err)
            self.infra_failures += 1
        self.env_s += time.perf_counter() - start
        return completion, failure

    async def _episode(self, task: Task, params: SamplingParams, generate=None, score: bool = True):
        """One agent episode (scored in its sandbox, unless `score` is false); (Episode, reward, info)
        or (None, None, why) when the infrastructure failed under it. `generate`: the engine, by
        default `batcher.generate`."""
        try:
            return await play_task(self.env.for_task(task), task, generate or self.batcher.generate, self.tokenizer,
                                   self.cfg.scaffold, params, self.limits, score)
        except SandboxInfraError as err:
            self.infra_failures += 1
            return None, None, {"infra_error": str(err)}

    async def agent_group(self, task: Task, group_id: str, seed: int | None = None,
                          score: bool = True) -> TrajectoryTree:
        self._ensure_serving()
        results = await asyncio.gather(*(self._episode(task, self.params,
                                                       None if seed is None else self._seeded_generate(seed, i),
                                                       score)
                                         for i in range(self.cfg.group_size)))
        prompt = next((e.prompt for e, _, _ in results if e is not None), None)
        if prompt is None:
            prompt = chat_prompt_ids(self.tokenizer, task.prompt)
        tree = TrajectoryTree(prompt, meta={"group_id": group_id, "task": vars(task)})
        for episode, reward, info in results:
            if episode is None:
                leaf = tree.add(0, [])
                tree.nodes[leaf].infra_failure, tree.nodes[leaf].reward_info = True, info
            else:
                leaf = episode.add_to(tree)
                tree.nodes[leaf].reward_info = info
                if reward is not None:
                    tree.nodes[leaf].reward = float(reward)
        self.groups += 1
        return tree

    async def rollout_group(self, task: Task, group_id: str, seed: int | None = None,
                            score: bool = True) -> TrajectoryTree:
        """`seed` (run.deterministic): sample i draws from `sample_seed(seed, i)`; requests with
        different seeds never share an engine call, so a sample depends on nothing else in flight.
        Without it, requests with equal params share engine calls, which draw from the engine's
        own generator (seeded per generator). `score`: agent episodes are scored in their
        environment (single answers are graded later, by the grader)."""
        if self.cfg.scaffold != "none":
            return await self.agent_group(task, group_id, seed, score)
        self._ensure_serving()
        prompt = self.prompt_tokens(task)
        episodes = await asyncio.gather(*(self._sample(task, prompt, self.params if seed is None else
                                                       replace(self.params, seed=sample_seed(seed, i)))
                                          for i in range(self.cfg.group_size)))
        tree = TrajectoryTree(prompt, meta={"group_id": group_id, "task": vars(task)})
        for c, failure in episodes:
            n = len(c.tokens)
            routes = {} if c.routes is None else {"routes": routes_to_bytes(c.routes)}   # routing replay
            leaf = tree.add(0, c.tokens, c.logprobs, np.ones(n, np.uint8), np.full(n, c.version, np.int32),
                            meta={"finish_reason": c.finish_reason, **routes})
            if failure:
                tree.nodes[leaf].infra_failure = True
                tree.nodes[leaf].reward_info = {"infra_error": failure}
        self.groups += 1
        return tree

    async def run(self, buffer, graders: list, concurrency: int, teachers: dict | None = None,
                  seeded: bool = False) -> int:
        """Produce groups until stopped: admit -> roll out -> (teacher scores) -> grade -> store,
        `concurrency` at a time. `teachers`: {domain: Teacher actor} for on-policy distillation.
        `seeded` (run.deterministic): each group samples from its ticket's seed (`rollout_group`)."""
        self._running = True
        counter = iter(range(1 << 62))

        async def worker(slot: int) -> None:
            while self._running:
                ticket = await buffer.acquire_ticket.remote()
                if not ticket:
                    continue
                n = next(counter)
                # A buffer with a prompt set names the task (epochs, History Resampling, stages);
                # otherwise the ticket's seed draws it, so that a ticket re-issued after a resume
                # gets the same task.
                task = Task(**ticket["task"]) if ticket["task"] else self.env.sample(random.Random(ticket["seed"]))
                tree = await self.rollout_group(task, f"{self.seed}-{n}", ticket["seed"] if seeded else None)
                if teachers:
                    tree = teachers[task.domain].score.remote(tree)
                grader = graders[n % len(graders)]
                graded, meta = grader.grade.options(num_returns=2).remote(tree)
                await buffer.put.remote(meta, [graded], ticket["index"])

        self._workers = asyncio.gather(*(worker(i) for i in range(concurrency)))
        try:
            await self._workers
        except asyncio.CancelledError:
            if self._running:   # not our stop: the actor itself is being cancelled
                raise
        return self.groups

    def stop(self) -> None:
        """Ends `run` at once: the groups in flight would come after the run's last step, so their
        episodes are cancelled (each releases its sandbox) rather than finished; their tickets
        stay in flight in the buffer, which re-issues them if the run is resumed."""
        self._running = False
        if self._workers is not None:
            self._workers.cancel()

    async def close(self) -> None:
        """Before the actor is killed (Roles.shutdown): ends the engine's serving task and closes
        the browser and this generator's own sandbox pool, whose background tasks a kill would
        leave to die mid-await ("Task was destroyed but it is pending!")."""
        if self._serve_task is not None:
            self._serve_task.cancel()
            await asyncio.gather(self._serve_task, return_exceptions=True)
            self._serve_task = None
        await close_env(self.env, self.own_pool)

    def stats(self) -> dict:
        return {"groups": self.groups, "gen_tokens": self.batcher.tokens, "gen_busy_s": self.batcher.busy_s,
                "env_s": self.env_s, "infra_failures": self.infra_failures, "version": self.engine.version,
                "prompts_too_long": self.batcher.too_long}

    async def sample_groups(self, n: int, seed: int, score: bool = True) -> list[tuple[dict, object]]:
        """n groups on fresh training tasks, not graded: samples of this generator's policy, e.g. a
        teacher's for off-policy distillation. Agent episodes are scored in their environment
        unless `score` is false (SFT on the samples needs no reward)."""
        import ray
        rng = random.Random(seed)
        tasks = [self.env.sample(rng) for _ in range(n)]
        trees = await asyncio.gather(*(self.rollout_group(t, f"{self.seed}-sample-{seed}-{i}", score=score)
                                       for i, t in enumerate(tasks)))
        return [(summarize(t), ray.put(t)) for t in trees]

    # -- demonstrations -------------------------------------------------------------------------
    async def demonstrations(self, n: int, seed: int) -> list[tuple[dict, TrajectoryTree]]:
        """n oracle demonstrations as trees (loss mask on what the model would say): one answer
        turn, or with a scaffold the oracle's actions played through the real tools."""
        import ray
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        stop = im_end if im_end in self.params.stop_token_ids else self.tokenizer.eos_token_id
        rng = random.Random(seed)
        tasks = [self.env.sample(rng) for _ in range(n)]

        async def one(task: Task) -> TrajectoryTree:
            if self.cfg.scaffold == "none":
                prompt = self.prompt_tokens(task)
                answer = self.tokenizer.encode(self.env.demonstration(task), add_special_tokens=False)
                answer.append(self.tokenizer.eos_token_id)
                tree = TrajectoryTree(prompt, meta={"task": vars(task)})
                tree.add(0, answer, loss_mask=np.ones(len(answer), np.uint8))
                return tree
            episode = await oracle_episode(self.env.for_task(task), task, self.tokenizer, self.cfg.scaffold, stop,
                                           self.limits)
            tree = TrajectoryTree(episode.prompt, meta={"task": vars(task)})
            episode.add_to(tree)
            return tree

        trees = await asyncio.gather(*(one(t) for t in tasks))
        return [(summarize(t), ray.put(t)) for t in trees]

    # -- tasks --------------------------------------------------------------------------------
    def train_tasks(self, n: int, seed: int) -> list[dict]:
        """A finite training set: n distinct training tasks per domain (fewer where the domain's
        task space is smaller), as dicts for the buffer to hand out."""
        rng = random.Random(seed)
        envs = getattr(self.env, "envs", None) or {self.env.domain: self.env}   # a mixture, or one domain
        out = []
        for name, env in envs.items():
            tasks: dict[str, Task] = {}
            for _ in range(50 * n):
                task = env.sample(rng)
                tasks.setdefault(task.id, replace(task, domain=name))
                if len(tasks) == n:
                    break
            out += [vars(t) for t in tasks.values()]
        return out

    # -- evaluation ---------------------------------------------------------------------------
    def eval_tasks(self, n: int) -> list[dict]:
        """The held-out tasks (n per domain), as dicts for `evaluate`."""
        return [vars(t) for t in self.env.eval_tasks(n)]

    async def evaluate(self, tasks: list[dict], temperature: float = 0.0) -> list[float | str]:
        """Reward of one sample per task (greedy by default) under the current weights; where the
        infrastructure failed under the episode, why (a str)."""
        self._ensure_serving()
        if self.batcher.pending_weights is not None:
            await self.batcher.apply_weights()
        params = replace(self.params, temperature=temperature)
        tasks = [Task(**t) for t in tasks]
        if self.cfg.scaffold != "none":
            # The engine never batches more than max_batch sequences, so more episodes at once
            # would only queue on the sandbox pools (bounded: past the bound they fail).
            slots = asyncio.Semaphore(self.cfg.max_batch)

            async def episode(task: Task):
                async with slots:
                    return await self._episode(task, params)

            results = await asyncio.gather(*(episode(t) for t in tasks))
            return [info["infra_error"] if reward is None else float(reward) for _, reward, info in results]
        outs = await asyncio.gather(*(self.batcher.generate(self.prompt_tokens(t), params) for t in tasks))
        verdicts = await asyncio.gather(*(guarded_verdict(self.env.verify(t, self.tokenizer.decode(
            o.tokens.tolist(), skip_special_tokens=True)), t) for t, o in zip(tasks, outs)))
        return [reward for reward, _ in verdicts]
