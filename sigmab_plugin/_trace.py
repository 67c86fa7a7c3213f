"""Find where a model can be cut: split-point candidates and the routed units after the root split.

A *unit* is a module that runs exactly once, wholly after the root split point; units are maximal
(their parent is not wholly after it), and a unit that straddles a later split point is replaced by
its children, which is allowed only for ``nn.Sequential`` (whose forward just chains them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ._forward import run_model
from ._modes import kept_train_flags

PARAM_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the layers whose channels SigmaB scores and prunes


@dataclass
class Trace:
    enter: Dict[str, int]  # first pre-hook event index per module name
    exit: Dict[str, int]  # last hook event index per module name
    calls: Dict[str, int]
    order: List[str]  # module names in order of first call
    width: Dict[str, int]  # size of dim 1 (channels) of each module's output (0 if not a tensor of ndim > 1)


def trace_calls(model: nn.Module, example: torch.Tensor) -> Trace:
    """Run ``model(example)`` once (eval, no grad) and record when every submodule enters and exits."""
    enter, exit_, calls, order, width, handles = {}, {}, {}, [], {}, []
    clock = [0]

    def pre(name):
        def hook(_m, _inp):
            clock[0] += 1
            if name not in enter:
                enter[name] = clock[0]
                order.append(name)
            calls[name] = calls.get(name, 0) + 1
        return hook

    def post(name):
        def hook(_m, _inp, out):
            clock[0] += 1
            exit_[name] = clock[0]
            f = out[0] if isinstance(out, tuple) and out and torch.is_tensor(out[0]) else out
            width[name] = f.shape[1] if torch.is_tensor(f) and f.ndim > 1 else 0
        return hook

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
    try:
        with kept_train_flags(model), torch.no_grad():
            model.eval()
            run_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return Trace(enter, exit_, calls, order, width)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(name: str) -> List[str]:
    """Every enclosing module path (a ModuleList in between is never called, so look past it)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def split_candidates(model: nn.Module, trace: Trace) -> List[str]:
    """Split-point candidates in execution order: timm ``feature_info`` modules, else top-level stages.

    The last candidate is included; callers exclude it when choosing split points automatically.
    """
    names: List[str] = []
    info = getattr(model, "feature_info", None)
    if info is not None:
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        names = [e["module"] for e in entries if isinstance(e, dict) and "module" in e]
    if not names:
        names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    return [n for n in names if trace.calls.get(n) == 1]


def auto_split_points(model: nn.Module, trace: Trace, depth: int) -> List[str]:
    cands = split_candidates(model, trace)
    usable = cands[:-1]  # the last stage's output feeds only the head
    if not cands:
        raise ValueError(
            f"{type(model).__name__} has no usable split points (no feature_info and no top-level stage "
            "called exactly once); pass split_points=[...] with module paths")
    if len(usable) < depth:
        raise ValueError(
            f"depth={depth} needs {depth} split points but {type(model).__name__} offers {len(usable)} "
            f"({usable}): use depth <= {len(usable)} or pass split_points=[...] (e.g. blocks inside a stage)")
    return usable[-depth:]


def plan_units(model: nn.Module, trace: Trace, split_points: Sequence[str]) -> List[List[str]]:
    """Return the unit names of each level (level 1 first) for the given split points."""
    modules = dict(model.named_modules())
    cands = split_candidates(model, trace)
    for s in split_points:
        if s not in modules or trace.calls.get(s, 0) == 0:
            raise ValueError(f"split point {s!r} not found among the modules the forward runs; "
                             f"candidates: {cands}")
        if trace.calls[s] != 1:
            raise ValueError(f"split point {s!r} runs {trace.calls[s]} times per forward; it must run once. "
                             f"candidates: {cands}")
    ends = [trace.exit[s] for s in split_points]
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"split points {list(split_points)} are not in execution order; candidates: {cands}")
    t0 = ends[0]
    after = {n for n in trace.order if trace.enter[n] > t0}
    units = sorted((n for n in after if not any(a in after for a in _ancestors(n))), key=lambda n: trace.enter[n])
    for t in ends[1:]:
        units = _refine(units, t, modules, trace, cands)
    for u in units:
        if trace.calls[u] != 1:
            raise ValueError(f"module {u!r} runs {trace.calls[u]} times per forward after the root split; "
                             "a routed module must run once (shared modules cannot be branched)")
    if not any(any(True for _ in modules[u].parameters()) for u in units):
        raise ValueError(f"nothing with parameters runs after split point {split_points[0]!r}; "
                         f"choose an earlier one; candidates: {cands}")
    levels: List[List[str]] = [[] for _ in split_points]
    for u in units:
        level = sum(trace.exit[u] > t for t in ends[1:])  # number of later split points before it ends
        levels[level].append(u)
    for i, names in enumerate(levels):
        if not names:
            raise ValueError(f"level {i + 1} between the split points {list(split_points)} is empty; "
                             f"candidates: {cands}")
    return levels


def _refine(units: List[str], t: int, modules: Dict[str, nn.Module], trace: Trace, cands: List[str]) -> List[str]:
    while True:
        straddle: Optional[str] = next((u for u in units if trace.enter[u] < t < trace.exit[u]), None)
        if straddle is None:
            return units
        if not isinstance(modules[straddle], nn.Sequential):
            raise ValueError(f"a split point ends inside {straddle!r} ({type(modules[straddle]).__name__}), "
                             f"whose forward is not a plain sequence; candidates: {cands}")
        kids = [f"{straddle}.{k}" for k, _ in modules[straddle].named_children() if f"{straddle}.{k}" in trace.enter]
        i = units.index(straddle)
        units = units[:i] + sorted(kids, key=lambda n: trace.enter[n]) + units[i + 1:]
