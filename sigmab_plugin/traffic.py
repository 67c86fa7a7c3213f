"""A memory-traffic model: off-chip bytes read per inference, layer by layer, for a dense model, a
statically pruned model and each path of a SigmaB tree (the paper's premise, made measurable).

Model of the accelerator: an on-chip buffer of ``buffer_bytes`` holds weights that stay resident
across inferences (loaded once, so free per inference); every other weight is streamed from off-chip
memory on every inference that uses it. Weights are ``bytes_per_weight`` each (1, 2 or 4); a layer's
weights are resident whole or not at all. Residency is chosen once, first-fit in execution order:
for a tree, over the modules every input runs (backbone), then the routers, then level by level
over every node (a resident node serves whichever inputs reach it). Activations are counted apart
and as an upper bound: each conv/linear layer reads its input and writes its output off-chip once,
at the same bytes per value, with no on-chip reuse of feature maps.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from ._trace import PARAM_LAYERS
from .routing import RoutedModule, forward_leaf, is_branched, tree_state


def _run_order(model: nn.Module, call) -> List[tuple]:
    """(module, owned parameter count, activation values in+out for conv/linear) in execution order."""
    order, handles, seen = [], [], set()

    def hook(m, inp, out):
        if m in seen:
            return
        seen.add(m)
        own = sum(p.numel() for p in m.parameters(recurse=False))
        act = 0
        if isinstance(m, PARAM_LAYERS) and torch.is_tensor(out):
            act = inp[0][:1].numel() + out[:1].numel()
        if own or act:
            order.append((m, own, act))
    for m in model.modules():
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return order


def _path_routers(model: nn.Module, leaf: int) -> List[nn.Module]:
    depth = tree_state(model).depth
    return [r.routers[(leaf >> (depth - r.level)) >> 1] for r in model.modules()
            if isinstance(r, RoutedModule) and r.routers is not None]


def _resident(candidates: List[tuple], budget: int) -> set:
    """First-fit in order: (module, bytes) pairs kept on chip while they fit."""
    left, resident = budget, set()
    for m, nbytes in candidates:
        if 0 < nbytes <= left:
            resident.add(m)
            left -= nbytes
    return resident


def traffic(model: nn.Module, x: torch.Tensor, buffer_bytes: int, bytes_per_weight: int) -> Dict[str, object]:
    """Off-chip bytes per inference of ``model`` on one input ``x`` (batch 1). For a tree: per leaf,
    the worst leaf and the expectation over the calibration leaf shares."""
    if x.shape[0] != 1:
        raise ValueError(f"traffic() models one inference: give a batch of 1, got {x.shape[0]}")
    if bytes_per_weight not in (1, 2, 4) or buffer_bytes < 0:
        raise ValueError(f"bytes_per_weight={bytes_per_weight!r} must be 1, 2 or 4 and buffer_bytes >= 0")
    b = bytes_per_weight
    was = model.training
    model.eval()
    try:
        if not is_branched(model):
            order = _run_order(model, lambda: model(x))
            resident = _resident([(m, n * b) for m, n, _ in order], buffer_bytes)
            return _summary(order, resident, b)
        state = tree_state(model)
        leaves = 2 ** state.depth
        paths = {leaf: _run_order(model, lambda leaf=leaf: forward_leaf(model, x, leaf)) for leaf in range(leaves)}
        for leaf in range(leaves):  # forward_leaf bypasses the routers on the path: they run when deployed
            paths[leaf] += [(r, sum(p.numel() for p in r.parameters()), 0) for r in _path_routers(model, leaf)]
        in_node = {m for r in model.modules() if isinstance(r, RoutedModule) for v in r.variants for m in v.modules()}
        routers = [m for r in model.modules() if isinstance(r, RoutedModule) and r.routers is not None
                   for m in r.routers]
        shared = [(m, n * b) for m, n, _ in paths[0] if m not in in_node and m not in routers]
        nodes = []
        for level in range(1, state.depth + 1):
            for leaf in range(0, leaves, 2 ** (state.depth - level)):
                nodes += [(m, n * b) for m, n, _ in paths[leaf] if m in in_node and (m, n * b) not in nodes]
        candidates = shared + [(r, sum(p.numel() for p in r.parameters()) * b) for r in routers] + nodes
        resident = _resident(candidates, buffer_bytes)
        per_leaf = [_summary(paths[leaf], resident, b) for leaf in range(leaves)]
        shares = state.spec.get("calibration", {}).get("shares", {})
        w = [shares.get(f"{state.depth}/{j}", 1 / leaves) for j in range(leaves)]
        return {"leaves": per_leaf,
                "weight_bytes": max(p["weight_bytes"] for p in per_leaf),
                "weight_bytes_expected": sum(s * p["weight_bytes"] for s, p in zip(w, per_leaf)) / sum(w),
                "activation_bytes": max(p["activation_bytes"] for p in per_leaf),
                "resident_bytes": sum(n for m, n in candidates if m in resident),
                "stored_bytes": sum(n for _, n in candidates)}
    finally:
        model.train(was)


def _summary(order: List[tuple], resident: set, b: int) -> Dict[str, object]:
    layers = [{"module": type(m).__name__, "params": n, "resident": m in resident,
               "weight_bytes": 0 if m in resident else n * b, "activation_bytes": act * b} for m, n, act in order]
    return {"weight_bytes": sum(r["weight_bytes"] for r in layers),
            "activation_bytes": sum(r["activation_bytes"] for r in layers),
            "resident_bytes": sum(r["params"] * b for r in layers if r["resident"]), "layers": layers}


def traffic_table(models: Dict[str, nn.Module], x: torch.Tensor, buffers_mib=(0.5, 2, 8),
                  bytes_per_weight=(1, 2, 4), extra: Optional[dict] = None) -> List[dict]:
    """One row per (model, buffer, bytes per weight): weight and activation bytes per inference."""
    rows = []
    for name, model in models.items():
        for mib in buffers_mib:
            for b in bytes_per_weight:
                t = traffic(model, x, int(mib * 2 ** 20), b)
                rows.append({"model": name, "buffer_mib": mib, "bytes_per_weight": b, **(extra or {}),
                             "weight_bytes": t["weight_bytes"], "activation_bytes": t["activation_bytes"],
                             "weight_bytes_expected": t.get("weight_bytes_expected", t["weight_bytes"])})
    return rows
