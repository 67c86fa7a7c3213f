"""Parameter accounting and a readable summary of a SigmaB tree.

Active parameters of a leaf = everything outside the routed units (backbone, glue) + the routers on
its path + its path's node variants; bytes per inference add the buffers those modules read.
"""
from __future__ import annotations

from typing import Dict, List

from torch import nn

from .routing import RoutedModule, tree_state


def _count(module: nn.Module, as_bytes: bool = False) -> int:
    """Parameters of ``module``; with ``as_bytes``, bytes of its parameters and buffers."""
    n = sum(p.numel() * p.element_size() if as_bytes else p.numel() for p in module.parameters())
    if as_bytes:
        n += sum(b.numel() * b.element_size() for b in module.buffers())
    return n


def _routed(model: nn.Module) -> List[RoutedModule]:
    return [m for m in model.modules() if isinstance(m, RoutedModule)]


def _path_counts(model: nn.Module, as_bytes: bool) -> List[int]:
    state = tree_state(model)
    depth = state.depth
    routed = _routed(model)
    shared = _count(model, as_bytes) - sum(_count(r, as_bytes) for r in routed)
    out = []
    for leaf in range(2 ** depth):
        total = shared
        for r in routed:
            node = leaf >> (depth - r.level)
            total += _count(r.variants[node], as_bytes)
            if r.routers is not None:
                total += _count(r.routers[node >> 1], as_bytes)
        out.append(total)
    return out


def param_report(model: nn.Module) -> Dict[str, object]:
    """Stored and active parameter counts of a branched model (see DESIGN.md "Numbers to report")."""
    state = tree_state(model)
    dense = int(state.spec["dense_params"])
    active = _path_counts(model, as_bytes=False)
    nbytes = _path_counts(model, as_bytes=True)
    shares = state.spec.get("calibration", {}).get("shares", {})
    leaf_share = [shares.get(f"{state.depth}/{j}", 0.0) for j in range(2 ** state.depth)]
    expected = sum(a * s for a, s in zip(active, leaf_share)) if sum(leaf_share) > 0 else None
    return {
        "dense_params": dense,
        "total_params": sum(p.numel() for p in model.parameters()),
        "active_params": active,
        "active_params_max": max(active),
        "active_params_min": min(active),
        "active_params_expected": expected,
        "active_fraction_max": max(active) / dense,
        "active_fraction_expected": None if expected is None else expected / dense,
        "bytes_per_inference": nbytes,
        "bytes_per_inference_max": max(nbytes),
        "leaf_share_calibration": leaf_share,
    }


def summary(model: nn.Module) -> str:
    """The tree as text: per node its parameters, its router, keep ratio and share of calibration samples."""
    state = tree_state(model)
    spec, depth = state.spec, state.depth
    routed = _routed(model)
    by_level = {l: [r for r in routed if r.level == l] for l in range(1, depth + 1)}
    rep = param_report(model)
    ratios = spec["config"]["keep_ratio"]
    ratios = ratios if isinstance(ratios, list) else [ratios] * depth
    calib = spec.get("calibration", {})
    shares = calib.get("shares", {})

    def router_of(level: int, node: int) -> str:  # the router of node (level, node) sits in level+1's first unit
        if level == depth:
            return "leaf"
        first = next(r for r in by_level[level + 1] if r.routers is not None)
        return f"router {_count(first.routers[node]):,}"

    shared = _count(model) - sum(_count(r) for r in routed)
    lines = [f"SigmaB tree of {spec['model']}: depth {depth}, split points {spec['split_points']}",
             f"root: backbone {shared:,} params (shared), {router_of(0, 0)}, "
             f"{calib.get('samples', '?')} calibration samples"]
    for l in range(1, depth + 1):
        lines.append(f"level {l} (keep ratio {ratios[l - 1]}): units {spec['levels'][l - 1]}")
        for j in range(2 ** l):
            params = sum(_count(r.variants[j]) for r in by_level[l])
            share = shares.get(f"{l}/{j}")
            tail = f", calibration share {share:.1%}" if share is not None else ""
            lines.append(f"{'  ' * l}node {l}/{j}: {params:,} params, {router_of(l, j)}{tail}")
    lines.append(f"dense {rep['dense_params']:,} | stored {rep['total_params']:,} | active per leaf "
                 f"{rep['active_params']} | max active fraction {rep['active_fraction_max']:.3f}")
    return "\n".join(lines)
