"""Routed execution of a SigmaB tree: per-node variants, hard and soft routing (the cosine routers they call
are in :mod:`sigmab_plugin.router`, the row bookkeeping in ``_rows``).

Each routed unit replaces one module of the dense model and holds that module's pruned copy for
every node of its level. The first unit of level 1 runs the root router; the first unit of every
deeper level runs its parents' routers. Tensors between units keep the dense channel width; a
variant gathers the channels it kept and scatters its output back.

Hard routing (eval default): one row per sample, and every unit hands its output back **in the
input's row order**, so any prefix of the forward (timm's ``forward_features``, a hook on a unit)
sees the rows the deployed path computes for each sample. Soft routing (training default): one row
per (path, sample), grouped by node; the last unit mixes the paths by probability and records the
per-path outputs for the training objective (:func:`sigmab_plugin.tree_loss`). Soft rows are only
meaningful at the end of the full forward, so a routed unit refuses a soft forward that did not
enter through the model's own ``__call__``.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from ._modes import kept_train_flags
from ._rows import cat_rows, feats, hard_groups, max_per_sample, put_rows, rows, soft_groups, top_k_rows
from .pathbn import PathBatchNorm, PathBatchNorm1d, PathBatchNorm2d, to_path_batchnorm  # noqa: F401 (public here)
from .router import CosineRouter, pool_features  # noqa: F401 (public here)

ROUTING_MODES = ("hard", "soft", "auto")


class NodeVariant(nn.Module):
    """One node's copy of a unit: gathers its kept input channels, scatters its output to dense width."""

    def __init__(self, module: nn.Module, in_idx: Optional[torch.Tensor], out_idx: Optional[torch.Tensor],
                 out_width: int):
        super().__init__()
        self.module = module
        self.register_buffer("in_idx", in_idx)  # persistent: the tree survives to("meta") and to_empty()
        self.register_buffer("out_idx", out_idx)
        self.out_width = int(out_width)

    def forward(self, x, row_weight: Optional[torch.Tensor] = None):
        if self.in_idx is not None:
            x = (x[0].index_select(1, self.in_idx),) + x[1:] if isinstance(x, tuple) else x.index_select(1, self.in_idx)
        if row_weight is not None:  # soft training with path-weighted BatchNorm statistics
            norms = [m for m in self.module.modules() if isinstance(m, PathBatchNorm)]
            for m in norms:
                m.row_weight = row_weight
            try:
                y = self.module(x)
            finally:
                for m in norms:
                    m.row_weight = None
        else:
            y = self.module(x)
        if self.out_idx is not None:
            f = feats(y)
            full = f.new_zeros((f.shape[0], self.out_width) + tuple(f.shape[2:])).index_copy(1, self.out_idx, f)
            y = (full,) + y[1:] if isinstance(y, tuple) else full
        return y


@dataclass
class _Context:
    """Routing of the rows of one forward, from the first routed unit to the last."""

    batch: int
    soft: bool
    sample: torch.Tensor  # original sample index of each row (hard: arange, rows in input order)
    node: torch.Tensor  # node id (within the current level) of each row
    weight: Optional[torch.Tensor] = None  # path probability of each row (soft)
    groups: Optional[list] = None  # hard: [(node, row index tensor)] of the current level
    caller: Optional[tuple] = None  # partial forward: (id, code) of the frame that ran the first unit
    last_out: Optional[weakref.ref] = None  # output of the latest unit


@dataclass
class PathOutputs:
    """Per-(path, sample) outputs of the last soft-routed forward (see :func:`sigmab_plugin.tree_loss`)."""

    output: torch.Tensor  # (R, ...) one row per kept (path, sample)
    sample: torch.Tensor  # (R,) sample index of each row
    leaf: torch.Tensor  # (R,) leaf of each row
    weight: torch.Tensor  # (R,) path probability, renormalised over the kept paths of each sample


class TreeState:
    """Shared, non-module state of one branched model: routing settings and the current forward."""

    SETTINGS = ("mode", "temperature", "top_k", "balance_rate", "bn_weighting")

    def __init__(self, depth: int, spec: dict):
        self.depth = depth
        self.spec = spec  # JSON-able description of the tree (see branch.py)
        self.mode = "auto"
        self.temperature = 1.0
        self.top_k: Optional[int] = None  # soft routing: paths kept per sample (None: all)
        self.balance_rate = 0.0  # step of the routers' load-balancing offsets per training batch
        self.bn_weighting = False  # soft training: node BatchNorm statistics weighted by path probability
        self.in_forward = False  # set while the model's own __call__ runs
        self.ctx: Optional[_Context] = None
        self.forced_leaves: Optional[torch.Tensor] = None  # hard routing follows these leaves when set
        self.node_loader = None  # load_deployment: loads a node's weights before its first use
        self.recording: Optional[dict] = None  # route_on: records the routers' pooled inputs of one forward
        self.route_source: Optional[dict] = None  # route_on: (level, parent) -> (features, present) per sample
        self._clear_results()
        for k, v in spec.get("routing", {}).items():  # saved with the tree
            if k in self.SETTINGS:
                setattr(self, k, v)
        spec["routing"] = self.settings()

    def _clear_results(self) -> None:
        self.last_leaves: Optional[torch.Tensor] = None  # hard routing: leaf of each sample
        self.last_leaf_probs: Optional[torch.Tensor] = None  # soft routing: (B, 2**depth), differentiable
        self.last_paths: Optional[PathOutputs] = None  # soft routing: per-path outputs

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SETTINGS}

    def soft(self, training: bool) -> bool:
        return self.mode == "soft" or (self.mode == "auto" and training)

    def __deepcopy__(self, memo):
        new = TreeState(self.depth, _json_copy(self.spec))
        for k in self.SETTINGS:
            setattr(new, k, getattr(self, k))
        return new

    def __getstate__(self):
        return {"depth": self.depth, "spec": self.spec, **self.settings()}

    def __setstate__(self, data):
        self.__init__(data["depth"], data["spec"])
        for k in self.SETTINGS:
            setattr(self, k, data[k])


def _json_copy(obj):
    import json
    return json.loads(json.dumps(obj))


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
        if self.is_first:
            if getattr(self, "_is_replica", False):
                raise RuntimeError("nn.DataParallel replicas of a tree would share one routing state across "
                                   "threads; use DistributedDataParallel (one process per device) instead")
            soft = state.soft(self.training)
            if soft and not state.in_forward:
                raise RuntimeError(
                    "a soft-routed tree carries one row per (path, sample) between its units, so a partial "
                    "forward (forward_features, forward_intermediates, a unit called directly) has no "
                    "per-sample meaning: call the model itself, or set_routing(model, 'hard') (or eval()) first")
            f = feats(x)
            b = f.shape[0]
            zeros = torch.zeros(b, dtype=torch.long, device=f.device)
            state.ctx = _Context(b, soft, torch.arange(b, device=f.device), zeros,
                                 f.new_ones(b, dtype=torch.float32) if soft else None,
                                 [(0, None)] if not soft else None,
                                 None if state.in_forward else _caller())
        ctx = state.ctx
        if ctx is None or ctx.sample.shape[0] != feats(x).shape[0]:
            raise RuntimeError("a routed unit ran without the earlier units of the same forward (the routing of "
                               "its rows is decided there): run the model, or a prefix of its forward such as "
                               "forward_features, on this batch first")
        if not self.is_first and ctx.caller is not None and not state.in_forward:
            _check_continuation(ctx, x)
        if ctx.soft:
            if self.routers is not None:
                x = self._route_soft(x, ctx, state)
        elif self.routers is not None:
            self._route_hard(x, ctx, state)
        if state.recording is not None and self.routers is not None and self.level == state.depth:
            raise _Recorded  # route_on: every router's input is known, the rest of the forward is not needed
        y = self._run_soft(x, ctx, state) if ctx.soft else self._run_hard(x, ctx)
        if self.is_last:
            state.ctx = None
            return self._finish(y, ctx)
        if ctx.caller is not None:
            ctx.last_out = weakref.ref(feats(y))
        return y

    # ----- hard routing: rows stay in input order ------------------------------------------------
    def _route_hard(self, x, ctx: _Context, state: TreeState) -> None:
        node = torch.empty_like(ctx.node)
        for parent, idx in ctx.groups:
            xs = rows(x, idx)
            if state.forced_leaves is not None:  # follow the given path (calibration, diagnostics)
                leaf = state.forced_leaves.to(ctx.node.device)
                leaf = leaf if idx is None else leaf.index_select(0, idx)
                choice = (leaf >> (state.depth - self.level)) & 1
            else:
                logits = self._logits(parent, xs, ctx, idx, state)
                choice = logits.argmax(dim=1)
                if self.training and state.balance_rate > 0:
                    self.routers[parent].update_balance(choice, state.balance_rate)
            if idx is None:
                node = 2 * parent + choice
            else:
                node.index_copy_(0, idx, 2 * parent + choice)
        ctx.node = node
        ctx.groups = hard_groups(node, len(self.variants))

    def _run_hard(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        if len(ctx.groups) == 1:
            n, idx = ctx.groups[0]
            return self._run(n, x)
        if not ctx.groups:  # empty batch
            return self.variants[0](x)
        parts = [self._run(n, rows(x, idx)) for n, idx in ctx.groups]
        return put_rows(cat_rows(parts), torch.cat([idx for _, idx in ctx.groups]))

    def _run(self, n: int, x: torch.Tensor, row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._tree.node_loader is not None:
            self._tree.node_loader(self.level, n, self._tree.ctx)
        variant = self.variants[n]
        if not (self.training and feats(x).shape[0] == 1):
            return variant(x, row_weight)
        # a one-sample training sub-batch: batch statistics are undefined, so the node's norm layers
        # use their running statistics for this call
        norms = [m for m in variant.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.eval()
        try:
            return variant(x)
        finally:
            for m in norms:
                m.train()

    def _logits(self, parent: int, xs, ctx: _Context, idx, state: TreeState) -> torch.Tensor:
        """Router ``parent``'s logits for rows ``idx``: from their own features, or inside :func:`route_on`
        from the features recorded for their samples (rows whose sample was not recorded use their own)."""
        if state.recording is None and state.route_source is None:
            return self.routers[parent](xs)
        sample = ctx.sample if idx is None else ctx.sample[idx]
        pooled = self.routers[parent].pool(xs)
        if state.recording is not None:
            stored, present = state.recording.setdefault((self.level, parent), (
                pooled.new_zeros(ctx.batch, pooled.shape[1]), torch.zeros(ctx.batch, dtype=torch.bool, device=pooled.device)))
            stored[sample], present[sample] = pooled.detach(), True
        elif (self.level, parent) in state.route_source:
            stored, present = state.route_source[(self.level, parent)]
            if stored.shape[0] != ctx.batch:
                raise RuntimeError(f"route_on recorded routing inputs for {stored.shape[0]} samples but the model was "
                                   f"called on {ctx.batch}: call it on a batch of the same samples")
            pooled = torch.where(present[sample].unsqueeze(1), stored[sample].to(pooled.dtype), pooled)
        return self.routers[parent](pooled)

    # ----- soft routing: one row per (path, sample), grouped by node ------------------------------
    def _route_soft(self, x, ctx: _Context, state: TreeState) -> torch.Tensor:
        parts, nodes, samples, weights = [], [], [], []
        for parent, idx in soft_groups(ctx.node, len(self.routers)):
            xs = rows(x, idx)
            logits = self._logits(parent, xs, ctx, idx, state)
            p = torch.softmax(logits / state.temperature, dim=1)
            if self.training and state.balance_rate > 0:
                greedy = ctx.weight[idx] >= max_per_sample(ctx.weight, ctx.sample, ctx.batch)[ctx.sample[idx]]
                self.routers[parent].update_balance(logits[greedy].argmax(1), state.balance_rate)
            for c in (0, 1):
                parts.append(xs)
                nodes.append(torch.full_like(ctx.node[idx], 2 * parent + c))
                samples.append(ctx.sample[idx])
                weights.append(ctx.weight[idx] * p[:, c])
        node, sample, weight = torch.cat(nodes), torch.cat(samples), torch.cat(weights)
        keep = top_k_rows(weight.detach(), sample, ctx.batch, state.top_k)
        order = torch.argsort(node if keep is None else node[keep], stable=True)
        if keep is not None:
            order = keep[order]
        ctx.node, ctx.sample, ctx.weight = node[order], sample[order], weight[order]
        return rows(cat_rows(parts), order)

    def _run_soft(self, x: torch.Tensor, ctx: _Context, state: TreeState) -> torch.Tensor:
        groups = soft_groups(ctx.node, len(self.variants))
        use_w = state.bn_weighting and self.training
        outs = [self._run(n, rows(x, idx), ctx.weight[idx] if use_w else None) for n, idx in groups]
        return outs[0] if len(outs) == 1 else cat_rows(outs)

    def _finish(self, y: torch.Tensor, ctx: _Context) -> torch.Tensor:
        state = self._tree
        state._clear_results()
        if not ctx.soft:
            state.last_leaves = ctx.node.clone()
            return y
        total = ctx.weight.new_zeros(ctx.batch).index_add(0, ctx.sample, ctx.weight)
        weight = ctx.weight / total[ctx.sample].clamp_min(1e-12)  # renormalised over the kept paths
        probs = ctx.weight.new_zeros(ctx.batch, 2 ** state.depth)
        state.last_leaf_probs = probs.index_put((ctx.sample, ctx.node), weight, accumulate=True)
        state.last_paths = PathOutputs(y, ctx.sample, ctx.node, weight)
        w = weight.to(y.dtype).view(-1, *([1] * (y.ndim - 1)))
        out = y.new_zeros((ctx.batch,) + tuple(y.shape[1:]))
        return out.index_add(0, ctx.sample, w * y)


def _caller() -> tuple:
    """(id, code) of the nearest frame outside torch.nn's module machinery and this file."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.endswith(("module.py", "routing.py"))
                             and ("torch" in f.f_code.co_filename or f.f_code.co_filename == __file__)):
        f = f.f_back
    return (id(f), f.f_code) if f is not None else (0, None)


def _check_continuation(ctx: _Context, x: torch.Tensor) -> None:
    """A unit called outside the model's own forward continues the routing of the partial forward that
    ran the first unit. That is sound while that forward is still running (a prefix such as
    ``forward_features``), or when ``x`` is that forward's output (``forward_head(forward_features(x))``);
    otherwise the rows may belong to another batch, so refuse rather than route them wrongly."""
    f = sys._getframe(2)
    while f is not None:
        if (id(f), f.f_code) == ctx.caller:
            return
        f = f.f_back
    last = ctx.last_out() if ctx.last_out is not None else None
    x, last = feats(x), feats(last) if last is not None else None
    if last is not None and (x is last or (x.device == last.device and x.untyped_storage().data_ptr()
                                           == last.untyped_storage().data_ptr())):
        return
    raise RuntimeError("this routed unit continues a partial forward of the tree, but its input is not that "
                       "forward's output, so the routing of its rows is unknown: call forward_head (or the "
                       "later units) on the unchanged output of forward_features, or run the whole model")


class _Recorded(Exception):
    """Ends the recording forward of :func:`route_on` after the last router."""


@contextlib.contextmanager
def route_on(model: nn.Module, x_route):
    """Inside the block, a branched ``model`` routes each sample by the features of the same sample in
    ``x_route`` (e.g. its unaugmented version) instead of those of the input it is called with.

    Entering records what every router reads for ``x_route`` (eval mode: BatchNorm's running statistics,
    as deployed; no gradient; the forward stops after the last router). Calls in the block must pass
    the same samples in the same order (an augmented copy). The routers' logits are still computed
    with gradient, so they train; the layers below a router get no gradient through it (the leaves'
    losses still reach them). Soft and hard routing alike; a path that was not recorded (``top_k``
    pruned it while recording) routes on its own features."""
    state = tree_state(model)
    state.recording = {}
    try:
        with kept_train_flags(model), torch.no_grad():
            model.eval()
            try:
                model(x_route)
            except _Recorded:
                pass
        recorded = state.recording
    finally:
        state.recording = None
        state.ctx = None
    state.route_source = recorded
    try:
        yield model
    finally:
        state.route_source = None


def _enter_forward(model: nn.Module, _args) -> None:
    model._sigmab_tree.in_forward = True


def _exit_forward(model: nn.Module, _args, _out) -> None:
    model._sigmab_tree.in_forward = False


def attach(model: nn.Module, state: TreeState) -> None:
    """Make ``model`` a tree with ``state``: the routed units read it; the model's own forward marks
    the span in which soft routing may run."""
    model._sigmab_tree = state
    model.register_forward_pre_hook(_enter_forward)
    model.register_forward_hook(_exit_forward, always_call=True)


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (hooks found by identity, so a deep copy's hooks are its own)."""
    for hooks, fn in ((model._forward_pre_hooks, _enter_forward), (model._forward_hooks, _exit_forward)):
        for key in [k for k, v in hooks.items() if v is fn]:
            del hooks[key]
            getattr(model, "_forward_hooks_always_called", {}).pop(key, None)
    if hasattr(model, "_sigmab_tree"):
        del model._sigmab_tree


def is_branched(model: nn.Module) -> bool:
    """True when ``model`` was restructured by :func:`sigmab_plugin.branch` (or loaded as a tree)."""
    return isinstance(getattr(model, "_sigmab_tree", None), TreeState)


def tree_state(model: nn.Module) -> TreeState:
    state = getattr(model, "_sigmab_tree", None)
    if not isinstance(state, TreeState):
        raise ValueError(f"{type(model).__name__} is not branched: call sigmab_plugin.branch(model, ...) first")
    return state


def set_routing(model: nn.Module, mode: Optional[str] = None, temperature: Optional[float] = None, *,
                top_k=False, balance_rate: Optional[float] = None, bn_weighting: Optional[bool] = None) -> nn.Module:
    """Set how a branched ``model`` routes, in place; arguments left out keep their value.

    ``mode``: ``"hard"`` (argmax, one path per sample), ``"soft"`` (every path, mixed by probability,
    differentiable) or ``"auto"`` (soft in train mode, hard in eval). ``temperature``: of the router
    softmax in soft mode. ``top_k``: soft routing keeps only each sample's ``k`` most probable paths
    (None: all). ``balance_rate``: step per training batch of the routers' load-balancing offsets (0:
    off). ``bn_weighting``: in soft training, node BatchNorm statistics weighted by path probability.
    """
    state = tree_state(model)
    if mode is not None and mode not in ROUTING_MODES:
        raise ValueError(f"routing mode {mode!r} is unknown; choose one of {ROUTING_MODES}")
    new = {}
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or temperature == float("inf"):
            raise ValueError(f"temperature={temperature!r} must be a finite positive number")
        new["temperature"] = float(temperature)
    if top_k is not False:
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be None (all paths) or an integer >= 1")
        new["top_k"] = top_k
    if balance_rate is not None:
        if isinstance(balance_rate, bool) or not isinstance(balance_rate, (int, float)) or not 0 <= balance_rate < 10:
            raise ValueError(f"balance_rate={balance_rate!r} must be a number in [0, 10)")
        new["balance_rate"] = float(balance_rate)
    if bn_weighting is not None:
        if not isinstance(bn_weighting, bool):
            raise TypeError(f"bn_weighting={bn_weighting!r} must be True or False")
        new["bn_weighting"] = bn_weighting
    if mode is not None:
        new["mode"] = mode
    for k, v in new.items():
        setattr(state, k, v)
    state.spec["routing"] = state.settings()
    return model


def forward_leaf(model: nn.Module, x: torch.Tensor, leaf: int) -> torch.Tensor:
    """The output of one root-to-leaf path for every sample of ``x`` (routers bypassed, hard routing,
    the model's train/eval mode as it is): what the tree computes for the samples it routes to ``leaf``."""
    state = tree_state(model)
    n = 2 ** state.depth
    if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf < n:
        raise ValueError(f"leaf={leaf!r} is not a leaf of this depth-{state.depth} tree: use 0..{n - 1}")
    saved = state.mode
    f = feats(x)
    state.mode, state.forced_leaves = "hard", torch.full((f.shape[0],), leaf, dtype=torch.long, device=f.device)
    try:
        return model(x)
    finally:
        state.mode, state.forced_leaves = saved, None


def route(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The leaf index (0 .. 2**depth - 1) each sample of ``x`` takes under hard routing."""
    state = tree_state(model)
    saved = state.mode
    state.mode = "hard"
    try:
        with kept_train_flags(model), torch.no_grad():
            model.eval()
            model(x)
    finally:
        state.mode = saved
    return state.last_leaves.clone()
