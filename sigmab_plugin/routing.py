"""Routed execution of a SigmaB tree: cosine routers, per-node variants, hard and soft routing.

Each routed unit replaces one module of the dense model and holds that module's pruned copy for
every node of its level. The first unit of level 1 runs the root router; the first unit of every
deeper level runs its parents' routers. Rows are grouped by node along the batch dimension, so the
per-sample glue between units (pooling, flatten) sees an ordinary batch; the last unit restores the
input order (hard) or mixes the paths by their probabilities (soft). Tensors between units keep the
dense channel width; a variant gathers the channels it kept and scatters its output back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROUTING_MODES = ("hard", "soft", "auto")


def pool_features(x: torch.Tensor) -> torch.Tensor:
    """Per-sample feature vector at a split point: average pool for images, max pool for point sets."""
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        return x.amax(dim=2)
    if x.ndim == 2:
        return x
    raise ValueError(f"cannot pool a split-point output of shape {tuple(x.shape)}; expected (B,C[,N|H,W])")


class CosineRouter(nn.Module):
    """Two-way cosine classifier: ``logits = tau * cos(pool(x) - center, c_k) + b_k``; rows of ``centroids`` are c_k.

    ``center`` (the node's mean calibration feature) and ``tau`` are buffers saved with the tree;
    branch() sets both per router. Centring matters: pooled post-ReLU features share one orthant, so
    uncentred cosines are all close to 1 and a router on them is ill-conditioned.
    """

    def __init__(self, centroids: torch.Tensor, tau: float, bias: Optional[torch.Tensor] = None,
                 center: Optional[torch.Tensor] = None):
        super().__init__()
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.bias = nn.Parameter(torch.zeros(centroids.shape[0]) if bias is None else bias.detach().clone().float())
        self.register_buffer("tau", torch.tensor(float(tau)))
        dim = centroids.shape[1]
        self.register_buffer("center", torch.zeros(dim) if center is None else center.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(pool_features(x).float() - self.center, dim=1)
        return self.tau * f @ F.normalize(self.centroids, dim=1).T + self.bias


class NodeVariant(nn.Module):
    """One node's copy of a unit: gathers its kept input channels, scatters its output to dense width."""

    def __init__(self, module: nn.Module, in_idx: Optional[torch.Tensor], out_idx: Optional[torch.Tensor],
                 out_width: int):
        super().__init__()
        self.module = module
        self.register_buffer("in_idx", in_idx, persistent=False)
        self.register_buffer("out_idx", out_idx, persistent=False)
        self.out_width = int(out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_idx is not None:
            x = x.index_select(1, self.in_idx)
        y = self.module(x)
        if self.out_idx is not None:
            full = y.new_zeros((y.shape[0], self.out_width) + tuple(y.shape[2:]))
            y = full.index_copy(1, self.out_idx, y)
        return y


@dataclass
class _Context:
    batch: int
    sample: torch.Tensor  # original sample index of each row
    node: torch.Tensor  # node id (within the current level) of each row
    weight: Optional[torch.Tensor]  # path probability of each row (soft routing only)


class TreeState:
    """Shared, non-module state of one branched model: routing mode and the per-forward context."""

    def __init__(self, depth: int, spec: dict):
        self.depth = depth
        self.spec = spec  # JSON-able description of the tree (see branch.py)
        self.mode = "auto"
        self.temperature = 1.0
        self.ctx: Optional[_Context] = None
        self.last_leaves: Optional[torch.Tensor] = None  # hard routing: leaf of each sample
        self.last_leaf_probs: Optional[torch.Tensor] = None  # soft routing: (B, 2**depth), differentiable
        self.forced_leaves: Optional[torch.Tensor] = None  # hard routing follows these leaves when set

    def soft(self, training: bool) -> bool:
        return self.mode == "soft" or (self.mode == "auto" and training)


class RoutedModule(nn.Module):
    """Stands in for one unit of the dense model; holds a variant per node of its level."""

    def __init__(self, state: TreeState, level: int, variants: List[NodeVariant],
                 routers: Optional[List[CosineRouter]], is_first: bool, is_last: bool):
        super().__init__()
        self.level = level
        self.variants = nn.ModuleList(variants)
        self.routers = nn.ModuleList(routers) if routers is not None else None
        self.is_first, self.is_last = is_first, is_last
        self._tree = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._tree
        soft = state.soft(self.training)
        if self.is_first:
            b = x.shape[0]
            state.ctx = _Context(b, torch.arange(b, device=x.device), torch.zeros(b, dtype=torch.long, device=x.device),
                                 x.new_ones(b, dtype=torch.float32) if soft else None)
        ctx = state.ctx
        if ctx is None or ctx.sample.shape[0] != x.shape[0]:
            raise RuntimeError("routed module called out of order: the tree's units must run in their forward order")
        if self.routers is not None:
            x = self._route(x, ctx, soft, state.temperature)
        y = self._run_variants(x, ctx.node)
        if self.is_last:
            state.ctx = None
            return self._finish(y, ctx)
        return y

    def _route(self, x, ctx, soft: bool, temperature: float) -> torch.Tensor:
        rows, nodes, samples, weights = [], [], [], []
        for parent, idx in _groups(ctx.node, len(self.routers)):
            xs = x[idx]
            logits = self.routers[parent](xs)
            if soft:
                p = torch.softmax(logits / temperature, dim=1)
                for c in (0, 1):
                    rows.append(xs)
                    nodes.append(torch.full_like(ctx.node[idx], 2 * parent + c))
                    samples.append(ctx.sample[idx])
                    weights.append(ctx.weight[idx] * p[:, c])
            else:
                if self._tree.forced_leaves is not None:  # follow the given path (calibration, tests)
                    leaf = self._tree.forced_leaves.to(x.device)[ctx.sample[idx]]
                    choice = (leaf >> (self._tree.depth - self.level)) & 1
                else:
                    choice = logits.argmax(dim=1)
                rows.append(xs)
                nodes.append(2 * parent + choice)
                samples.append(ctx.sample[idx])
        node = torch.cat(nodes)
        order = torch.argsort(node, stable=True)
        ctx.node, ctx.sample = node[order], torch.cat(samples)[order]
        ctx.weight = torch.cat(weights)[order] if soft else None
        return torch.cat(rows)[order]

    def _run_variants(self, x: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        groups = _groups(node, len(self.variants))
        if len(groups) == 1:
            return self._run(groups[0][0], x)
        return torch.cat([self._run(n, x[idx]) for n, idx in groups])

    def _run(self, n: int, x: torch.Tensor) -> torch.Tensor:
        variant = self.variants[n]
        if not (self.training and x.shape[0] == 1):
            return variant(x)
        # a one-sample training sub-batch (hard routing): batch statistics are undefined, so the
        # node's norm layers use their running statistics for this call
        norms = [m for m in variant.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.eval()
        try:
            return variant(x)
        finally:
            for m in norms:
                m.train()

    def _finish(self, y: torch.Tensor, ctx: _Context) -> torch.Tensor:
        self._tree.last_leaves = self._tree.last_leaf_probs = None
        if ctx.weight is None:
            out = torch.empty_like(y).index_copy_(0, ctx.sample, y)
            self._tree.last_leaves = torch.empty_like(ctx.node).index_copy_(0, ctx.sample, ctx.node)
            return out
        probs = ctx.weight.new_zeros(ctx.batch, 2 ** self._tree.depth)
        self._tree.last_leaf_probs = probs.index_put((ctx.sample, ctx.node), ctx.weight, accumulate=True)
        w = ctx.weight.to(y.dtype).view(-1, *([1] * (y.ndim - 1)))
        out = y.new_zeros((ctx.batch,) + tuple(y.shape[1:]))
        return out.index_add(0, ctx.sample, w * y)


def _groups(node: torch.Tensor, n_nodes: int):
    """(node id, row slice) for each node present, in node order; rows are already grouped by node."""
    counts = torch.bincount(node, minlength=n_nodes).tolist()
    out, start = [], 0
    for n, c in enumerate(counts):
        if c:
            out.append((n, slice(start, start + c)))
            start += c
    return out


def tree_state(model: nn.Module) -> TreeState:
    state = getattr(model, "_sigmab_tree", None)
    if not isinstance(state, TreeState):
        raise ValueError(f"{type(model).__name__} is not branched: call sigmab_plugin.branch(model, ...) first")
    return state


def set_routing(model: nn.Module, mode: str, temperature: Optional[float] = None) -> nn.Module:
    """Set how a branched ``model`` routes, in place: ``"hard"`` (argmax, one path per sample),
    ``"soft"`` (mixture of all paths, differentiable) or ``"auto"`` (soft in train mode, hard in eval)."""
    state = tree_state(model)
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode {mode!r} is unknown; choose one of {ROUTING_MODES}")
    if temperature is not None:
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature={temperature!r} must be a positive number")
        state.temperature = float(temperature)
    state.mode = mode
    return model


def route(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The leaf index (0 .. 2**depth - 1) each sample of ``x`` takes under hard routing."""
    state = tree_state(model)
    saved, was_training = state.mode, model.training
    state.mode = "hard"
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        state.mode = saved
        model.train(was_training)
    return state.last_leaves.clone()
