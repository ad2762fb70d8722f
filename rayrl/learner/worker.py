"""LearnerWorker: one data-parallel rank training with DeepSpeed (ZeRO over gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import torch

from rayrl.algo.distill import distill_advantages
from rayrl.algo.logprobs import gather_logprobs
from rayrl.algo.losses import aggregate, policy_token_loss, sft_token_loss, topk_distill_token_loss
from rayrl.algo.mcla import average_passes, mcla_passes
from rayrl.algo.mismatch import MismatchWindow, onpolicy_mismatch_sums
from rayrl.algo.tree_pack import pack_paths, tree_micro_batches
from rayrl.models.moe import forward_plan, replay_routes, routing
from rayrl.tree import NOT_SAMPLED, Path, TrajectoryTree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rng_states() -> dict:
    """The random streams of this process (torch, numpy, Python)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def pad_paths(paths: list[Path], pad_id: int = 0, advantages: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad paths into [B, T] tensors; position t of the shifted arrays predicts token t+1.

    `advantages`: per-token advantages of each path (distillation); by default each path's
    (sequence) advantage on every token. `versions`: the version that sampled each token
    (NOT_SAMPLED on prompt, observation and padding), for the weight-sync check. Paths a teacher
    scored with its top-k also give `topk_ids` and `topk_logprobs` [B, T-1, k]."""
    width = max(len(p) for p in paths)
    out = {"tokens": np.full((len(paths), width), pad_id, np.int64),
           "attention": np.zeros((len(paths), width), np.int64),
           "behaviour": np.zeros((len(paths), width), np.float32),
           "loss_mask": np.zeros((len(paths), width), np.float32),
           "advantage": np.zeros((len(paths), width), np.float32),
           "versions": np.full((len(paths), width), NOT_SAMPLED, np.int64)}
    topk = all(p.teacher_topk_ids is not None for p in paths)
    if topk:
        k = paths[0].teacher_topk_ids.shape[1]
        out["topk_ids"] = np.zeros((len(paths), width, k), np.int64)
        out["topk_logprobs"] = np.zeros((len(paths), width, k), np.float32)
    for i, p in enumerate(paths):
        n = len(p)
        out["tokens"][i, :n] = p.tokens
        out["attention"][i, :n] = 1
        out["behaviour"][i, :n] = p.logprobs
        out["loss_mask"][i, :n] = p.loss_mask
        out["advantage"][i, :n] = advantages[i] if advantages is not None else (p.advantage or 0.0)
        out["versions"][i, :n] = p.versions
        if topk:
            out["topk_ids"][i, :n] = p.teacher_topk_ids
            out["topk_logprobs"][i, :n] = p.teacher_topk_logprobs
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    # Labels are tokens[1:]; every per-token array is shifted to align with them.
    for k in ("behaviour", "loss_mask", "advantage", "versions", "topk_ids", "topk_logprobs"):
        if k in batch:
            batch[k] = batch[k][:, 1:]
    return batch


def micro_batches(paths: list[Path], token_budget: int) -> list[list[Path]]:
    """Group paths of similar length so that each padded micro-batch stays under the budget."""
    order = sorted(paths, key=len, reverse=True)
    batches, current = [], []
    for p in order:
        if current and len(current[0]) * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        current.append(p)
    if current:
        batches.append(current)
    return batches


class LearnerWorker:
    def __init__(self, model_path: str, learner_cfg, rank: int, world_size: int, temperature: float = 1.0,
                 seed: int = 0, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.cfg = learner_cfg
        self.rank, self.world_size = rank, world_size
        self.model_path = model_path
        self.temperature = temperature if temperature > 0 else 1.0
        self.seed = seed
        self.engine = None
        self.mismatch = MismatchWindow()   # the weight-sync check's pooled tokens, alike on every rank

    def address(self) -> tuple[str, int]:
        import ray
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, lr: float) -> None:
        import deepspeed

        from rayrl.models import load_model
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")  # Ray gives each worker its own GPU
        backend = self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "gloo":
            # DeepSpeed's shared-memory all-reduce op serves its inference only; left on, the first
            # start on a machine JIT-compiles it (35-45 s on 2 cores) for a learner that never calls it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        torch.manual_seed(self.seed)
        model = load_model(self.model_path)
        model.config.use_cache = False
        # A torch optimizer instead of DeepSpeed's CPU Adam: no C++ op to compile at start-up.
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            # step() is the accumulation boundary: a step may have any number of micro-batches.
            "managed_gradient_accumulation": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.device = self.engine.device

    # -- training -------------------------------------------------------------------------
    def _token_logprobs(self, batch: dict, topk: bool = False, temperature: float | None = None) -> torch.Tensor:
        """[B, T-1]: position t holds the log-prob of token t+1 of path b, at `temperature` (by
        default the rollout's). With `topk`, [B, T-1, 1 + k]: that log-prob followed by those of the
        teacher's top-k tokens there."""
        if "tree" in batch:   # one forward over the unique tokens, gathered back per path
            from rayrl.models.tree_attention import packed_logits
            packed = batch["tree"]
            logits = packed_logits(self.engine, packed)
            index = torch.from_numpy(packed.label_index(batch["tokens"].shape[1])).to(self.device)
            rows = torch.as_tensor(packed.parent, device=self.device)[index].clamp(min=0)
            labels = torch.as_tensor(packed.tokens, device=self.device)[index]
        else:
            tokens = batch["tokens"].to(self.device)
            logits = self.engine(input_ids=tokens, attention_mask=batch["attention"].to(self.device)).logits[:, :-1]
            rows, labels = None, tokens[:, 1:]
        if topk:
            labels = torch.cat([labels.unsqueeze(-1), batch["topk_ids"].to(self.device)], dim=-1)
        return gather_logprobs(logits, labels, self.temperature if temperature is None else temperature, rows=rows)

    def train_step(self, tree_refs: list, kind: str, lr: float, totals: dict, rl_weight: float = 0.0) -> dict:
        """One optimizer step on this rank's share of the batch.

        kind: sft (NLL of the sampled tokens), rl (the clipped surrogate with the paths'
        advantages) or distill (the same surrogate with per-token advantages from the teacher's
        log-probs, plus `rl_weight` times the environment advantage).

        `totals` holds the whole batch's loss-token and path counts (over all ranks), so that the
        aggregated loss is the full-batch loss however it is split. DeepSpeed averages gradients
        over ranks, hence the factor world_size.
        """
        import ray
        trees: list[TrajectoryTree] = ray.get(tree_refs) if tree_refs else []
        paths = [p for t in trees for p in t.paths() if not p.infra_failure]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train()
        batches = self._micro_batches(paths)
        sums: dict[str, float] = {}
        # ZeRO reduces gradients during backward: every rank must run as many backward passes.
        count = torch.tensor([len(batches)], device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        for _ in range(max(int(count.item()), 1) - len(batches)):
            # A rank with fewer micro-batches (or none) joins the extra reductions with zero gradients,
            # from a real forward: ZeRO-2 fills its reduction buckets in the order the gradient hooks
            # fire, so a backward through `sum(p.sum())` (parameter order) paired one rank's gradients
            # with another's of other parameters (measured: the step's gradient norm 1.2% off), and
            # ZeRO-3, whose parameters are empty outside a forward, refused it.
            one_token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.engine.backward(self.engine(input_ids=one_token).logits.sum() * 0.0)
        for batch in batches:
            loss, stats = self._micro_loss(self._batch_tensors(batch, kind, rl_weight, totals.get("reverse_kl")),
                                           kind, totals)
            self.engine.backward(loss * self.world_size)
            for k, v in stats.items():
                sums[k] = max(sums.get(k, v), v) if k.endswith("_max") else sums.get(k, 0.0) + v
        if kind != "sft" and totals.get("version") is not None:
            checked = self._check_weight_sync(sums, totals)
            if checked is not None:
                sums["mismatch_kl_checked"] = checked
            sums["mismatch_window_tokens"] = self.mismatch.tokens   # pooled, not yet checked
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        sums["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return sums

    def _check_weight_sync(self, sums: dict, totals: dict) -> float | None:
        """Before the optimizer step, on every rank alike: the on-policy mismatch KL of the whole
        batch (rayrl.algo.mismatch), pooled with the previous steps' until the window holds
        `mismatch_check_tokens` tokens, so that a run whose engines sample with other weights than
        the ones they claim stops, before the update of the step that fills the window.
        WeightSyncError over `max_mismatch_kl`; the pooled KL when the window was checked."""
        both = torch.tensor([sums.get("onpolicy_kl_total", 0.0), sums.get("onpolicy_tokens", 0.0)],
                            dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(both)
        return self.mismatch.add(float(both[0]), float(both[1]), totals["version"],
                                 totals.get("max_mismatch_kl", 0.0), totals.get("mismatch_check_tokens", 1))

    def _micro_batches(self, paths: list[Path]) -> list[list[Path]]:
        """Tree training: micro-batches of whole paths whose packed tries fit the token budget;
        otherwise padded micro-batches of similar-length paths."""
        if not paths:
            return []
        if not self.cfg.tree_training:
            return micro_batches(paths, self.cfg.micro_batch_tokens)
        return [[paths[i] for i in group]
                for group in tree_micro_batches([p.tokens for p in paths], self.cfg.micro_batch_tokens)]

    def _batch_tensors(self, batch: list[Path], kind: str, rl_weight: float,
                       kl_mean: dict[str, float] | None = None) -> dict:
        """The per-path [B, T-1] loss inputs (`pad_paths`); under tree training also the packed
        trie (key "tree") whose log-probs `_token_logprobs` gathers into that layout."""
        advantages = None
        if kind == "distill":
            missing = sum(p.teacher_logprobs is None for p in batch)
            if missing:
                raise ValueError(f"distill step: {missing} paths were not scored by a teacher")
            if all(p.teacher_topk_ids is not None for p in batch):   # the teacher's top-k is the target
                advantages = [np.full(len(p), rl_weight * (p.advantage or 0.0), np.float32) for p in batch]
            else:
                advantages = [distill_advantages(p.logprobs, p.teacher_logprobs, p.loss_mask, p.advantage or 0.0,
                                                 rl_weight, (kl_mean or {}).get(p.domain, 0.0)) for p in batch]
        tensors = pad_paths(batch, advantages=advantages)
        if self.cfg.tree_training:
            tensors["tree"] = pack_paths([p.tokens for p in batch])
        if self.cfg.loss.mcla.routing_replay:   # MoE: the experts the engine chose, laid out like the forward
            tensors["routes"] = forward_plan(self.engine, [p.meta for p in batch], tensors["tokens"].shape[1],
                                             tensors.get("tree"))
        return tensors

    def _mcla_logprobs(self, batch: dict, logprobs: torch.Tensor) -> torch.Tensor | None:
        """MCLA on the learner side: log pi_old for the IS weight as the mean of this forward and
        K - 1 more (None when K = 1)."""
        k = mcla_passes(self.cfg.loss.mcla, routing(self.engine) is not None)[1]
        if k <= 1:
            return None

        def another() -> torch.Tensor:
            with torch.no_grad(), replay_routes(self.engine, batch.get("routes")):
                return self._token_logprobs(batch)
        return average_passes(logprobs, another, k)

    def _micro_loss(self, batch: dict, kind: str, totals: dict) -> tuple[torch.Tensor, dict]:
        topk = kind == "distill" and "topk_ids" in batch
        # SFT fits the model itself (temperature 1): its NLL is the model's, and a warm start does
        # not change with the rollout temperature. RL and distillation need the sampling policy's.
        with replay_routes(self.engine, batch.get("routes")):
            logprobs = self._token_logprobs(batch, topk, 1.0 if kind == "sft" else None)
        if topk:
            logprobs, student_topk = logprobs[..., 0], logprobs[..., 1:]
        mask = batch["loss_mask"].to(self.device)
        n_tokens = float(mask.sum())
        loss_cfg = self.cfg.loss
        if kind == "sft":
            token_loss, stats = sft_token_loss(logprobs) * mask, {}
            mode = "token_mean"
        else:
            # One optimizer step per batch: the proximal policy pi_old is the current one.
            token_loss, stats = policy_token_loss(logprobs, logprobs.detach(), batch["behaviour"].to(self.device),
                                                  batch["advantage"].to(self.device), mask, loss_cfg,
                                                  is_logprobs=self._mcla_logprobs(batch, logprobs))
            if topk:
                topk_kl = topk_distill_token_loss(student_topk, batch["topk_logprobs"].to(self.device)) * mask
                token_loss = token_loss + topk_kl
                stats["topk_kl"] = topk_kl.detach().sum() / max(n_tokens, 1.0)
            mode = loss_cfg.aggregation
        loss = aggregate(token_loss, mask, mode, totals["loss_tokens"], totals["num_paths"],
                         loss_cfg.constant_norm)
        # Token-weighted sums, so that the group can average over the whole batch.
        out = {f"{k}_sum": float(v) * n_tokens for k, v in stats.items() if not k.endswith("_max")}
        out.update({k: float(v) for k, v in stats.items() if k.endswith("_max")})
        out["loss"] = float(loss.detach())
        out["nll_sum"] = float(-(logprobs.detach() * mask).sum())
        out["loss_tokens"] = n_tokens
        if kind != "sft" and totals.get("version") is not None:   # the weight-sync check (LearnerGroup.train_step)
            out["onpolicy_kl_total"], out["onpolicy_tokens"] = onpolicy_mismatch_sums(
                logprobs, batch["behaviour"].to(self.device), batch["versions"].to(self.device), mask,
                totals["version"])
        # Tokens of the paths and tokens the forward ran on (unique ones, or padded rows): their
        # ratio over the step is the dedup ratio the group reports.
        out["path_tokens"] = float(batch["attention"].sum())
        out["forward_tokens"] = float(batch["tree"].num_tokens if "tree" in batch else batch["tokens"].numel())
        return loss, out

    # -- weights ----------------------------------------------------------------------------
    def _full_parameters(self):
        """Context in which every rank sees whole parameters (ZeRO-3 partitions them)."""
        import contextlib

        import deepspeed
        if self.cfg.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def publish(self) -> list:
        """Rank 0 puts the full weights in the object store and returns [ref]; others return []."""
        import ray

        from rayrl.models import state_dict_numpy
        with self._full_parameters():
            return [ray.put(state_dict_numpy(self.engine.module))] if self.rank == 0 else []

    def save(self, path: str) -> None:
        """HF weights (rank 0) plus the DeepSpeed optimizer and engine state and this rank's RNG
        states (every rank)."""
        with self._full_parameters():
            if self.rank == 0:
                self.engine.module.save_pretrained(path)
        self.engine.save_checkpoint(os.path.join(path, "deepspeed"),
                                    client_state={"mismatch_window": vars(self.mismatch)})
        torch.save(rng_states(), self._rng_path(path))

    def _rng_path(self, path: str) -> str:
        return os.path.join(path, "deepspeed", f"rng_rank{self.rank}.pt")

    def load_state(self, path: str) -> None:
        """Continue from a checkpoint `save` wrote with the same number of ranks: weights, this
        rank's optimizer partition and RNG states, and the weight-sync check's pooled tokens."""
        directory = os.path.join(path, "deepspeed")
        loaded, client_state = self.engine.load_checkpoint(directory, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        vars(self.mismatch).update(client_state.get("mismatch_window", {}))
        set_rng_states(torch.load(self._rng_path(path), weights_only=False))
