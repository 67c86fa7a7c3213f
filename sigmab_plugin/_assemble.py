"""Tree assembly: the routed modules of a SigmaB tree, built from a spec and the dense model.

``build_tree`` prunes one deep copy of the dense model per node to its keep-sets (Torch-Pruning),
wraps each node's units in ``NodeVariant``s (kept channels gathered in, output scattered back to
dense width), and gives each unit a ``RoutedModule`` holding the variants of its level. ``swap_in``
puts modules into the model by path and returns the ones it replaced (so a failure can undo it).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _split, _trace
from ._forward import using_forward_fn
from .router import CosineRouter
from .routing import NodeVariant, RoutedModule, TreeState, to_path_batchnorm


def classifier_layers(model: nn.Module, trace: _trace.Trace) -> List[str]:
    names = {m: n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and head in names and any(True for _ in head.parameters()):
            layers = [f"{names[head]}.{n}".strip(".") for n, m in head.named_modules()
                      if isinstance(m, _trace.PARAM_LAYERS)]
            if layers:
                return layers[-1:]
    layers = [n for n in trace.order if isinstance(model.get_submodule(n), _trace.PARAM_LAYERS)]
    return layers[-1:]


def first_consumers(model: nn.Module, trace: _trace.Trace, units: List[str]) -> List[Optional[str]]:
    """For the boundary after each unit: the first conv/linear that runs after it (None after the last)."""
    layers = [n for n in trace.order if isinstance(model.get_submodule(n), _trace.PARAM_LAYERS)]
    out = []
    for u in units:
        later = [n for n in layers if trace.enter[n] > trace.exit[u]]
        out.append(later[0] if later else None)
    return out


def build_tree(model: nn.Module, spec: dict, example: torch.Tensor, routers: List[List[CosineRouter]],
               nodes: Optional[dict] = None, pruners=None) -> Tuple[Dict[str, nn.Module], TreeState]:
    """Build the routed modules described by ``spec`` from the dense ``model`` (not modified).

    ``nodes`` may give, per node key ``"l/j"``, already pruned ``(units, group infos)``; the others
    are pruned here from deep copies of ``model``.
    """
    levels = spec["levels"]
    depth = len(levels)
    units = [u for lv in levels for u in lv]
    unit_level = {u: l for l, lv in enumerate(levels, start=1) for u in lv}
    state = TreeState(depth, spec)
    variants: Dict[str, List[NodeVariant]] = {u: [] for u in units}
    consumers = dict(zip(units, spec["consumers"]))
    widths = dict(zip(units, spec["widths"]))
    for l, lv in enumerate(levels, start=1):
        for j in range(2 ** l):
            plan = spec["plan"].get(f"{l}/{j}", {})
            node_units, infos = (nodes or {}).get(f"{l}/{j}") or _split.build_node(
                model, example, plan, lv, unit_level, spec["classifier"], pruners)
            prev = None if l == 1 else _split.boundary_index(infos, plan, consumers[levels[l - 2][-1]])
            for u, m in zip(lv, node_units):
                out = _split.boundary_index(infos, plan, consumers[u])
                variants[u].append(NodeVariant(to_path_batchnorm(m), _index(prev, example.device),
                                               _index(out, example.device), widths[u]))
                prev = out
    routed = {}
    for l, lv in enumerate(levels, start=1):
        for i, u in enumerate(lv):
            routed[u] = RoutedModule(state, l, variants[u], routers[l - 1] if i == 0 else None,
                                     is_first=(l == 1 and i == 0), is_last=(u == units[-1]))
    return routed, state


def _index(values: Optional[List[int]], device) -> Optional[torch.Tensor]:
    return None if values is None else torch.tensor(values, dtype=torch.long, device=device)


def swap_in(model: nn.Module, routed: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    originals = {}
    for name, new in routed.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals[name] = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
        _set_child(parent, attr, new)
    return originals


def _set_child(parent: nn.Module, attr: str, module: nn.Module) -> None:
    if attr.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def rebuild_tree(base_model: nn.Module, spec: dict, forward_fn=None):
    """The routed modules and tree state of a saved ``spec`` on a fresh dense ``base_model``, routers
    zeroed (their weights come from the saved tensors); ``base_model`` is only run, never changed."""
    device = next(base_model.parameters()).device
    example = torch.zeros(2, *spec["input_shape"], device=device)
    with using_forward_fn(forward_fn):
        trace = _trace.trace_calls(base_model, example)  # router input width = channels at each split point
        grid = int(spec["config"].get("router_grid", 1))  # trees saved before the option pooled globally
        routers = [[CosineRouter(torch.zeros(2, trace.width[split] * grid * grid), 1.0, grid=grid).to(device)
                    for _ in range(2 ** l)] for l, split in enumerate(spec["split_points"])]
        return build_tree(base_model, spec, example, routers)
