"""Least-squares reconstruction: refit every pruned layer of a fresh tree so that, on the samples its
node receives, it writes what the dense layer writes (ThiNet/He et al. 2017 style, per node).

A node's layer is the dense layer restricted to the channels the node keeps (``W[kept_out][:, kept_in]``);
with inputs missing, its output drifts from the dense one, and the drift compounds down the path. Here,
node by node from the root down and layer by layer in forward order, the layer's weights (and bias) are
refit by ridge regression so that ``layer(x_node) ~= dense_layer(x_dense)[kept_out]``, where ``x_node`` is
what the node's layer really receives (earlier layers already refit) and ``x_dense`` what the dense layer
receives on the same samples. The ridge pulls towards the current weights, so a node with few samples
moves little. Only weight values change: shapes, routers, the spec and save/load are untouched.
A statically pruned model (FPGM, HRank, any Torch-Pruning result) is refit the same way on all samples,
so a comparison can give every method the same step.

    dense = copy.deepcopy(model)                 # before branch(): the reference the layers are fit to
    sb.branch(model, depth=2, calib_data=x, keep_ratio=0.5)
    report = sb.reconstruct(model, dense, x)     # report["relative_error_before"/"_after"] per layer
"""
from __future__ import annotations

import copy
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._forward import run_model, using_forward_fn
from ._split import build_graph
from .calibrate import Data, _batches
from .routing import RoutedModule, is_branched, tree_state

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_VARIANT = re.compile(r"\.variants\.\d+\.module(?=\.|$)")


def kept_channels(dense: nn.Module, spec: dict, level: int, node: int) -> Dict[str, Tuple[List[int], List[int]]]:
    """``{dense layer name: (kept output channels, kept input channels)}`` for the conv/linear layers of
    one node, read off Torch-Pruning's groups of the node's plan on a copy of ``dense``."""
    probe = copy.deepcopy(dense).eval()
    example = torch.zeros(2, *spec["input_shape"], device=next(dense.parameters()).device)
    dg = build_graph(probe, example)
    names = {m: n for n, m in probe.named_modules()}
    units = spec["levels"][level - 1]
    removed: Dict[str, Tuple[set, set]] = {}
    for key, kept in spec["plan"].get(f"{level}/{node}", {}).items():
        root = probe.get_submodule(key)
        drop = sorted(set(range(dg.get_out_channels(root))) - set(kept))
        if not drop:
            continue
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, drop)
        for item in group.items:
            mod, name = item.dep.target.module, names.get(item.dep.target.module)
            if name is None or not isinstance(mod, _LAYERS) or not any(name == u or name.startswith(u + ".")
                                                                      for u in units):
                continue
            slot = 1 if dg.is_in_channel_pruning_fn(item.dep.handler) else 0
            removed.setdefault(name, (set(), set()))[slot].update(item.idxs)
    out = {}
    for name, mod in probe.named_modules():
        if isinstance(mod, _LAYERS) and any(name == u or name.startswith(u + ".") for u in units):
            n_out, n_in = mod.weight.shape[0], mod.weight.shape[1] * getattr(mod, "groups", 1)
            r_out, r_in = removed.get(name, (set(), set()))
            out[name] = ([i for i in range(n_out) if i not in r_out], [i for i in range(n_in) if i not in r_in])
    return out


def match_channels(pruned: torch.Tensor, dense: torch.Tensor) -> Optional[Tuple[List[int], List[int]]]:
    """(kept output channels, kept input channels) such that ``pruned == dense[kept_out][:, kept_in]``,
    found by looking every kernel of ``pruned`` up among ``dense``'s kernels, or None when no such
    selection exists (a layer that was trained, re-initialised or reshaped)."""
    if pruned.dim() != dense.dim() or pruned.shape[2:] != dense.shape[2:] or any(
            p > d for p, d in zip(pruned.shape[:2], dense.shape[:2])):
        return None
    p = pruned.detach().cpu().reshape(pruned.shape[0], pruned.shape[1], -1)
    d = dense.detach().cpu().reshape(dense.shape[0], dense.shape[1], -1)
    where: Dict[bytes, List[Tuple[int, int]]] = {}
    for r in range(d.shape[0]):
        for c in range(d.shape[1]):
            where.setdefault(d[r, c].numpy().tobytes(), []).append((r, c))
    votes_out = [dict() for _ in range(p.shape[0])]
    votes_in = [dict() for _ in range(p.shape[1])]
    for r in range(p.shape[0]):
        for c in range(p.shape[1]):
            for R, C in where.get(p[r, c].numpy().tobytes(), ()):
                votes_out[r][R] = votes_out[r].get(R, 0) + 1
                votes_in[c][C] = votes_in[c].get(C, 0) + 1
    if not all(votes_out) or not all(votes_in):
        return None
    k_out = [max(v, key=v.get) for v in votes_out]
    k_in = [max(v, key=v.get) for v in votes_in]
    if torch.equal(d[k_out][:, k_in], p):
        return k_out, k_in
    return None


def _rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as regression rows: one per output position, columns in weight.view(out, -1) order."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, nn.Conv1d):
        x, k, d, p, s = x.unsqueeze(2), (1, *mod.kernel_size), (1, *mod.dilation), (0, *mod.padding), (1, *mod.stride)
    else:
        k, d, p, s = mod.kernel_size, mod.dilation, mod.padding, mod.stride
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(mod: nn.Module, y: torch.Tensor, kept_out: List[int]) -> torch.Tensor:
    idx = torch.tensor(kept_out, device=y.device)
    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1]).index_select(1, idx)
    y = y.index_select(1, idx)
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, len(kept_out))


def _fittable(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return (isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str))


@torch.no_grad()
def reconstruct(model: nn.Module, dense: nn.Module, data: Data, *, ridge: float = 1e-2, max_rows: int = 65536,
                min_samples: int = 64, batch_size: int = 128, forward_fn=None, seed: int = 0) -> dict:
    """Refit the pruned layers of ``model`` to ``dense`` (its copy from before pruning) on ``data``
    (inputs, or batches of them). A branched ``model`` is refit node by node from the root down, each
    node on the samples hard routing sends it (all samples when fewer than ``min_samples``); a
    statically pruned one (FPGM, HRank, any Torch-Pruning result) on all samples, its kept channels
    found by matching its weights to the dense ones. ``ridge`` (> 0) scales the pull towards the current
    weights, relative to the mean input energy; ``max_rows`` caps the regression rows per layer (output
    positions, sampled with ``seed``). Returns the per-layer relative errors
    ``||y_dense - layer(x)||^2 / ||y_dense||^2`` before and after, and the samples per node.

    Raises ``ValueError``, with ``model`` untouched, when ``dense`` is not ``model``'s source: a tree layer
    that is not its dense layer restricted to the node's kept channels (another network, or a tree trained
    since it was branched), or a static model none of whose layers is a channel selection of ``dense``'s."""
    if not ridge > 0:
        raise ValueError(f"ridge={ridge!r} must be > 0 (e.g. 1e-2): it keeps every fit well posed")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows={max_rows!r} must be a positive int, e.g. 65536")
    if is_branched(dense):
        raise ValueError("dense is a branched model: give a copy of the model taken before branch() or pruning")
    xs = [b for b in _batches(data, batch_size)]
    if not xs or sum(len(b) for b in xs) == 0:
        raise ValueError("data holds no samples: give the calibration inputs (or a loader of them)")
    was = (model.training, dense.training)
    model.eval()
    dense.eval()
    report = {"relative_error_before": {}, "relative_error_after": {}, "samples": {}}
    gen = torch.Generator().manual_seed(seed)

    def fit(name, t_mod, d_mod, k_out, batches, run):
        before, after = _fit(dense, t_mod, d_mod, k_out, batches, run, ridge, max_rows, gen)
        report["relative_error_before"][name], report["relative_error_after"][name] = before, after
    try:
        with using_forward_fn(forward_fn):
            (_refit_tree if is_branched(model) else _refit_static)(model, dense, xs, min_samples, fit, report)
    finally:
        model.train(was[0])
        dense.train(was[1])
    return report


def _refit_tree(model, dense, xs, min_samples, fit, report) -> None:
    state = tree_state(model)
    depth, dense_names = state.depth, {n for n, _ in dense.named_modules()}
    units = sorted(((m.level, n, m) for n, m in model.named_modules() if isinstance(m, RoutedModule)),
                   key=lambda t: t[0])
    kept_of = _check_source(model, dense, state.spec, units)  # (level, node) -> kept channels, before any fit
    leaves = torch.cat([_run_forced(model, b, None) for b in xs])
    for level, unit_name, unit in units:
        for node, variant in enumerate(unit.variants):
            mine = (leaves >> (depth - level)) == node
            if int(mine.sum()) < min_samples:
                mine = torch.ones_like(mine)
            report["samples"][f"{level}/{node}"] = int(mine.sum())
            batches = _split_rows(xs, mine)
            kept = kept_of[level, node]
            leaf = node << (depth - level)
            run = lambda b, leaf=leaf: _run_forced(model, b, leaf)  # noqa: E731
            for tree_name, dense_name in _node_layers(variant.module, f"{unit_name}.variants.{node}.module", run,
                                                      batches[0], dense_names):
                k_out, k_in = kept.get(dense_name, (None, None))
                t_mod = model.get_submodule(tree_name)
                if k_out is not None and tuple(t_mod.weight.shape[:2]) == (len(k_out), len(k_in)):
                    fit(tree_name, t_mod, dense.get_submodule(dense_name), k_out, batches, run)


_NOT_SOURCE = ("dense is not the model this tree was branched from (or the tree has been trained since): {what}. "
               "Give reconstruct the copy of the model taken before branch() or pruning, and a fresh tree")


def _check_source(model, dense, spec, units) -> Dict[Tuple[int, int], dict]:
    """Every node's kept channels, after checking that each of its layers is the dense layer restricted to
    them: a refit towards another network would run without error and quietly spoil the tree."""
    kept_of, checked, differ = {}, 0, []
    for level, unit_name, unit in units:
        for node, variant in enumerate(unit.variants):
            try:
                kept_of[level, node] = kept = kept_channels(dense, spec, level, node)
            except (AttributeError, KeyError, IndexError, RuntimeError, ValueError) as err:
                raise ValueError(_NOT_SOURCE.format(what=f"its graph does not fit the tree's plan ({err})")) from err
            for sub, mod in variant.module.named_modules():
                name = f"{unit_name}.{sub}" if sub else unit_name
                if not isinstance(mod, _LAYERS) or name not in kept:
                    continue
                k_out, k_in = kept[name]
                ref = dense.get_submodule(name).weight
                if tuple(mod.weight.shape[:2]) != (len(k_out), len(k_in)) or ref.shape[2:] != mod.weight.shape[2:]:
                    continue
                checked += 1
                if not torch.equal(mod.weight, ref[k_out][:, k_in].to(mod.weight.device)):
                    differ.append(f"{unit_name}.variants.{node}.module" + (f".{sub}" if sub else ""))
    if differ:
        raise ValueError(_NOT_SOURCE.format(what=f"{len(differ)} of {checked} node layers are not its layers "
                                                 f"restricted to the kept channels, the first {differ[0]}"))
    return kept_of


def _refit_static(model, dense, xs, _min_samples, fit, report) -> None:
    report["samples"]["model"] = sum(len(b) for b in xs)
    run = lambda b: run_model(model, b)  # noqa: E731
    dense_names = {n for n, _ in dense.named_modules()}
    layers = [(name, match_channels(model.get_submodule(name).weight, dense.get_submodule(name).weight))
              for name, _ in _node_layers(model, "", run, xs[0], dense_names)]  # matched before any fit
    if all(kept is None for _, kept in layers):  # also when no layer is named as one of dense's
        raise ValueError(_NOT_SOURCE.format(what=f"none of the {len(layers)} layers named as in dense is a "
                                                 "channel selection of its dense layer"))
    for name, kept in layers:
        if kept is not None:  # None: a layer that is not a channel selection of its dense one
            fit(name, model.get_submodule(name), dense.get_submodule(name), kept[0], xs, run)


def _run_forced(model: nn.Module, x: torch.Tensor, leaf) -> torch.Tensor:
    """Hard routing through ``run_model`` (so a ``forward_fn`` applies), down ``leaf``'s path for every
    sample, or as the routers decide (``leaf=None``); returns the leaf of every sample."""
    state = tree_state(model)
    saved = state.mode
    state.mode = "hard"
    if leaf is not None:
        state.forced_leaves = torch.full((len(x),), leaf, dtype=torch.long, device=x.device)
    try:
        run_model(model, x)
    finally:
        state.mode, state.forced_leaves = saved, None
    return state.last_leaves.clone()


def _split_rows(xs: List[torch.Tensor], mine: torch.Tensor) -> List[torch.Tensor]:
    out, i = [], 0
    for b in xs:
        sel = mine[i:i + len(b)].to(b.device)
        i += len(b)
        if sel.any():
            out.append(b[sel])
    return out


def _node_layers(root: nn.Module, prefix: str, run, x: torch.Tensor, dense_names: set) -> List[Tuple[str, str]]:
    """(name in the model, dense name) of the fittable layers under ``root`` (named ``prefix``), in the
    order ``run(x)`` runs them."""
    names = {m: ".".join(p for p in (prefix, n) if p)
             for n, m in root.named_modules() if isinstance(m, _LAYERS) and _fittable(m)}
    order: List[str] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: order.append(names[mod]) if names[mod] not in order
                                       else None) for m in names]
    try:
        run(x)
    finally:
        for h in handles:
            h.remove()
    pairs = [(n, _VARIANT.sub("", n, count=1)) for n in order]
    return [(t, d) for t, d in pairs if d in dense_names]


def _fit(dense, t_mod, d_mod, k_out, batches, run, ridge, max_rows, gen) -> Tuple[float, float]:
    grab: Dict[str, torch.Tensor] = {}
    h1 = t_mod.register_forward_hook(lambda m, i, o: grab.__setitem__("x", i[0]))
    h2 = d_mod.register_forward_hook(lambda m, i, o: grab.__setitem__("y", o))
    per_batch = max(1, max_rows // len(batches))
    xs, ys = [], []
    try:
        for b in batches:
            run_model(dense, b)
            run(b)
            x, y = _rows(t_mod, grab["x"]).double(), _targets(t_mod, grab["y"], k_out).double()
            if len(x) > per_batch:
                pick = torch.randperm(len(x), generator=gen)[:per_batch].to(x.device)
                x, y = x[pick], y[pick]
            xs.append(x)
            ys.append(y)
    finally:
        h1.remove()
        h2.remove()
    x, y = torch.cat(xs), torch.cat(ys)
    w0 = t_mod.weight.reshape(t_mod.weight.shape[0], -1).double()
    if t_mod.bias is not None:
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        w0 = torch.cat([w0, t_mod.bias.double()[:, None]], 1)
    energy = float((y ** 2).sum().clamp_min(1e-30))
    before = float(((y - x @ w0.T) ** 2).sum()) / energy
    g = x.T @ x
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    w = torch.linalg.solve(g + lam * torch.eye(len(g), dtype=g.dtype, device=g.device), x.T @ y + lam * w0.T).T
    after = float(((y - x @ w.T) ** 2).sum()) / energy
    if after > before:  # never worse on the fitted rows than what was there
        return before, before
    if t_mod.bias is not None:
        t_mod.bias.copy_(w[:, -1].to(t_mod.bias.dtype))
        w = w[:, :-1]
    t_mod.weight.copy_(w.reshape(t_mod.weight.shape).to(t_mod.weight.dtype))
    return before, after
