"""Routing control for Hugging Face mixture-of-experts models: router noise, and recording and
replaying the experts every token was sent to.

At scale, MoE routing is numerically noisy: batch composition, reduction order and low-precision
kernels move the router logits slightly from one forward pass to the next, and where two experts
are nearly tied the top-k choice flips, so a token's log-prob jumps between passes. That noise is
what MCLA averages out (rayrl.algo.mcla) and what routing replay removes. A tiny model on CPU in
float32 is deterministic, so it gets the noise explicitly: Gaussian noise of standard deviation
`rayrl_router_noise` (a field of the model's config, saved with it) added to the router logits at
every forward pass, from a generator of the control's own.

`install_routing(model)` (run by rayrl.models.load_model) replaces the forward of each top-k router
(Qwen3-MoE, Qwen2-MoE, Mixtral) with one that adds the noise and can

- record: keep each layer's chosen experts of the forward passes run inside `record()`;
- replay: use the experts of a plan [rows, layers, k] instead of choosing, in the passes run inside
  `replay(plan)`; rows are the forward's tokens in the order the MoE block flattens them
  ([batch, sequence] row-major), and a row of -1 routes as usual (padding, or a token with no
  record). The gate weights of the replayed experts still come from the (noisy) router
  probabilities, renormalized like the model's own, so gradients reach the router.

Only the router's forward changes (no module is added), so parameter names, checkpoints and
`save_pretrained` stay the model's own. Dense models get no control (`routing(model)` is None).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F

ROUTER_NOISE = "rayrl_router_noise"


class RoutingControl:
    def __init__(self, routers: list[torch.nn.Module], noise: float, seed: int):
        self.routers = routers
        self.noise = float(noise)
        self.top_k = int(routers[0].top_k)
        self.num_experts = int(routers[0].num_experts)
        self.generator = torch.Generator(device=routers[0].weight.device)
        self.reseed(seed)
        self._plan: torch.Tensor | None = None
        self._recorded: list[list[torch.Tensor]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed) % (1 << 63))

    @contextlib.contextmanager
    def record(self):
        """Record the experts of the passes run inside; `recorded()` returns them."""
        self._recorded = [[] for _ in self.routers]
        try:
            yield self
        finally:
            self._last, self._recorded = self._recorded, None

    def recorded(self) -> torch.Tensor:
        """[rows, layers, k] of the last recorded pass (rows as the MoE blocks flattened them)."""
        return torch.stack([layer[-1] for layer in self._last], dim=1)

    @contextlib.contextmanager
    def replay(self, plan: torch.Tensor | None):
        """Route the passes run inside by `plan` [rows, layers, k] (None: route as usual)."""
        if plan is not None and (plan.dim() != 3 or plan.shape[1:] != (self.num_layers, self.top_k)):
            raise ValueError(f"routing plan of shape {tuple(plan.shape)}; expected [rows, {self.num_layers}, "
                             f"{self.top_k}]")
        self._plan = plan
        try:
            yield self
        finally:
            self._plan = None

    def route(self, router: torch.nn.Module, layer: int, hidden_states: torch.Tensor):
        """The router's forward: (logits, gate weights of the chosen experts, their indices)."""
        hidden = hidden_states.reshape(-1, router.weight.shape[1])
        logits = F.linear(hidden, router.weight)
        if self.noise > 0:
            logits = logits + self.noise * torch.randn(logits.shape, generator=self.generator,
                                                       device=logits.device, dtype=logits.dtype)
        probs = torch.softmax(logits.float(), dim=-1)
        if self._plan is not None:
            if self._plan.shape[0] != hidden.shape[0]:
                raise ValueError(f"routing plan has {self._plan.shape[0]} rows for a forward of "
                                 f"{hidden.shape[0]} tokens")
            planned = self._plan[:, layer].to(device=hidden.device, dtype=torch.long)
            indices = torch.where(planned >= 0, planned, torch.topk(probs, self.top_k, dim=-1).indices)
        else:
            indices = torch.topk(probs, self.top_k, dim=-1).indices
        weights = probs.gather(-1, indices)
        if getattr(router, "norm_topk_prob", True):   # Mixtral always renormalizes
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self._recorded is not None:
            self._recorded[layer].append(indices.detach())
        return logits, weights.to(logits.dtype), indices


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules()
            if type(m).__name__.endswith("TopKRouter") and hasattr(m, "top_k") and hasattr(m, "weight")]


def install_routing(model: torch.nn.Module, seed: int | None = None) -> RoutingControl | None:
    """Give an MoE model its RoutingControl (`routing(model)`); None for a dense model. The noise
    generator is seeded from `seed`, else from torch's initial seed and the process id (engines
    and learners in different processes must not draw the same noise)."""
    routers = _routers(model)
    if not routers:
        return None
    if seed is None:
        seed = torch.initial_seed() + os.getpid()
    control = RoutingControl(routers, getattr(model.config, ROUTER_NOISE, 0.0), seed)
    for layer, router in enumerate(routers):
        router.forward = lambda hidden_states, _r=router, _l=layer: control.route(_r, _l, hidden_states)
    model.rayrl_routing = control
    return control


def routing(model) -> RoutingControl | None:
    """The control of an MoE model (or of the model inside a DeepSpeed engine); None if dense."""
    return getattr(getattr(model, "module", model), "rayrl_routing", None)


def replay_routes(model, plan: torch.Tensor | None):
    """Context: the model's passes follow `plan` (nothing changes for a dense model or no plan)."""
    control = routing(model)
    return control.replay(plan) if control is not None and plan is not None else contextlib.nullcontext()


def padded_plan(routes: list[np.ndarray | None], width: int, layers: int, k: int) -> torch.Tensor:
    """The plan of a right-padded [B, width] forward from each row's routes [len, layers, k]
    (None: the row routes freely)."""
    plan = torch.full((len(routes), width, layers, k), -1, dtype=torch.long)
    for b, r in enumerate(routes):
        if r is not None:
            plan[b, :len(r)] = torch.from_numpy(r.astype(np.int64))
    return plan.reshape(-1, layers, k)


def packed_plan(routes: list[np.ndarray | None], path_index: list[np.ndarray], num_tokens: int, layers: int,
                k: int) -> torch.Tensor:
    """The plan of a packed tree forward (rayrl.algo.tree_pack): each path's routes scattered to
    its packed tokens; a token shared by several paths (a group's prompt) takes the routes of the
    last path through it."""
    plan = torch.full((num_tokens, layers, k), -1, dtype=torch.long)
    for r, index in zip(routes, path_index):
        if r is not None:
            plan[torch.from_numpy(index)] = torch.from_numpy(r[:len(index)].astype(np.int64))
    return plan


def forward_plan(model, metas: list[dict], width: int, packed=None) -> torch.Tensor | None:
    """The learner's plan for a micro-batch of paths from the routes their leaves carry
    (`metas`, see routes_to_bytes): right-padded [B, width] rows, or the packed tree `packed`;
    None for a dense model."""
    control = routing(model)
    if control is None:
        return None
    routes = [routes_from_bytes(m["routes"], control.num_layers, control.top_k) if "routes" in m else None
              for m in metas]
    if packed is not None:
        return packed_plan(routes, packed.path_index, packed.num_tokens, control.num_layers, control.top_k)
    return padded_plan(routes, width, control.num_layers, control.top_k)


def routes_to_bytes(routes: np.ndarray) -> bytes:
    """[tokens, layers, k] expert indices as compact bytes for a tree node's metadata."""
    if routes.max(initial=0) > 255:
        raise ValueError("more than 256 experts: routes do not fit in uint8")
    return np.ascontiguousarray(routes, np.uint8).tobytes()


def routes_from_bytes(data: bytes, layers: int, k: int) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(-1, layers, k)
