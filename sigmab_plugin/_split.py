"""Channel allocation and splitting over Torch-Pruning's coupled groups (DependencyGraph).

Phase A (``allocate``) scores every channel of every coupled group a level owns, per node, by the
mean |activation| its consumers saw on that node's calibration samples, and picks each node's
keep-set (aligned to grouped convolutions, rounded, siblings covering every channel if asked).
Phase B (``build_node``) deep-copies the dense model, builds a DependencyGraph on the copy, prunes
each planned group to its keep-set and lifts out the node's units. Groups are keyed by the name of
their root module (the out-channel module ``get_all_groups`` starts from), stable across copies.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from ._forward import current_forward_fn
from ._trace import PARAM_LAYERS

_CONV = (nn.Conv1d, nn.Conv2d)


_CUSTOM_PRUNERS: Dict[type, object] = {}


def register_pruner(module_type: type, pruner) -> None:
    """Teach every DependencyGraph this project builds to prune ``module_type`` with ``pruner``
    (a ``tp.pruner.BasePruningFunc``), e.g. a shortcut that pads channels. Duplicates are refused."""
    if module_type in _CUSTOM_PRUNERS:
        raise ValueError(f"a pruner for {module_type.__name__} is already registered")
    _CUSTOM_PRUNERS[module_type] = pruner


def registered_pruners() -> Dict[type, object]:
    """The pruners given to :func:`register_pruner`, as Torch-Pruning's ``customized_pruners`` mapping."""
    return dict(_CUSTOM_PRUNERS)


@dataclass
class GroupInfo:
    key: str  # root module name
    n: int  # channels of the root
    levels: set  # levels whose modules the group touches (0 = backbone)
    producers: int  # dense layers that only write these channels (>= 2 means a residual stream)
    align: int  # channels per kept position block (grouped convs), 1 otherwise
    consumers: Dict[str, Tuple[List[int], List[int]]] = field(default_factory=dict)  # name -> (idxs, root_idxs)
    writers: set = field(default_factory=set)  # modules whose output channels these are
    members: set = field(default_factory=set)  # every named module the group touches
    column_norms: Dict[str, torch.Tensor] = field(default_factory=dict)  # consumer -> L2 norm of each input column


def _level_of(name: str, unit_level: Dict[str, int]) -> int:
    while name:
        if name in unit_level:
            return unit_level[name]
        name = name.rpartition(".")[0]
    return 0


def build_graph(model: nn.Module, example: torch.Tensor, pruners=None) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``model`` (a copy: tracing needs autograd, so frozen parameters of the
    copy are made trainable; ``build_node`` restores each parameter's flag after pruning)."""
    model.eval()  # tracing must not touch BatchNorm statistics
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                     forward_fn=current_forward_fn(),
                                                     customized_pruners={**registered_pruners(), **(pruners or {})})


def describe_groups(model: nn.Module, dg: tp.DependencyGraph, unit_level: Dict[str, int],
                    ignored: Sequence[str]) -> List[GroupInfo]:
    names = {m: n for n, m in model.named_modules()}
    ignored_modules = [model.get_submodule(n) for n in ignored]
    infos = []
    for group in dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=PARAM_LAYERS):
        root = group[0].dep.target.module
        if root not in names:
            continue
        outs, ins, levels, align = set(), set(), set(), 1
        consumers, norms = {}, {}
        for item in group.items:
            module = item.dep.target.module
            name = names.get(module)
            if name is None:
                continue
            levels.add(_level_of(name, unit_level))
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                outs.add(name)
            elif dg.is_in_channel_pruning_fn(item.dep.handler):
                ins.add(name)
                if isinstance(module, PARAM_LAYERS):
                    consumers[name] = (list(item.idxs), list(item.root_idxs))
                    norms[name] = column_norms(module)
            if isinstance(module, _CONV) and 1 < module.groups < module.in_channels:
                align = max(align, module.groups)
        writers = [model.get_submodule(n) for n in outs - ins]  # layers that only write these channels
        producers = sum(1 for m in writers if isinstance(m, PARAM_LAYERS) and getattr(m, "groups", 1) == 1)
        n = dg.get_out_channels(root)
        members = {names[i.dep.target.module] for i in group.items if i.dep.target.module in names}
        infos.append(GroupInfo(names[root], n, levels, producers, align, consumers, outs, members, norms))
    return infos


def column_norms(module: nn.Module) -> torch.Tensor:
    """L2 norm of the weights each input channel of a conv/linear layer feeds (one value per input
    channel; a grouped conv's column holds only its own group's outputs)."""
    w = module.weight.detach().double()
    if isinstance(module, nn.Linear):
        return w.norm(dim=0).cpu()
    groups = getattr(module, "groups", 1)
    per_group = w.view(groups, w.shape[0] // groups, w.shape[1], -1)  # (groups, out/group, in/group, k)
    return per_group.pow(2).sum(dim=(1, 3)).sqrt().flatten().cpu()  # group-major input order


def _keep_count(ratio: float, n: int, round_to: int) -> int:
    k = math.ceil(ratio * n / round_to) * round_to
    return max(1, min(n, k))


def _cover(scores: List[torch.Tensor], k: int) -> List[torch.Tensor]:
    """Top-k per sibling, then swap shared low-score channels for uncovered ones until all are kept."""
    sets = [set(torch.topk(s, k).indices.tolist()) for s in scores]
    n = scores[0].numel()
    norm = [s / s.sum().clamp_min(1e-12) for s in scores]
    uncovered = sorted(set(range(n)) - set().union(*sets), key=lambda c: -max(float(v[c]) for v in norm))
    for c in uncovered:
        order = sorted(range(len(sets)), key=lambda i: -float(norm[i][c]))
        for i in order:
            shared = [x for x in sets[i] if any(x in sets[j] for j in range(len(sets)) if j != i)]
            if shared:
                drop = min(shared, key=lambda x: float(norm[i][x]))
                sets[i].remove(drop)
                sets[i].add(c)
                break
        else:  # cannot happen while 2k >= n; kept as a guard
            raise RuntimeError(f"coverage failed: channel {c} fits no sibling (k={k}, n={n})")
    return [torch.tensor(sorted(s), dtype=torch.long) for s in sets]


def group_scores(info: GroupInfo, stats: Dict[str, torch.Tensor], level: int,
                 unit_level: Dict[str, int], score: str) -> Optional[torch.Tensor]:
    """Per root channel: mean |input| of each consumer in ``level`` (with ``score="activation_weight"``
    times the L2 norm of the weights that input feeds), each consumer normalised to mean 1, summed."""
    total = torch.zeros(info.n, dtype=torch.float64)
    used = False
    for name, (idxs, root_idxs) in info.consumers.items():
        if _level_of(name, unit_level) != level or name not in stats:
            continue
        s = stats[name].double()
        if score == "activation_weight":
            s = s * info.column_norms[name]  # one entry per input channel, as the statistics
        s = s / s.mean().clamp_min(1e-12)
        valid = [(i, r) for i, r in zip(idxs, root_idxs) if r is not None and i < s.numel()]
        total.index_add_(0, torch.tensor([r for _, r in valid], dtype=torch.long),
                         s[torch.tensor([i for i, _ in valid], dtype=torch.long)])
        used = True
    return total if used else None


def allocate(infos: List[GroupInfo], level: int, node_stats: List[Dict[str, torch.Tensor]],
             parent_plans: List[Dict[str, List[int]]], ratio: float, coverage: bool, prune_residual: bool,
             round_to: int, unit_level: Dict[str, int], whole: Sequence[str] = (),
             ratios: Optional[Dict[str, float]] = None, *, score: str) -> List[Dict[str, List[int]]]:
    """Keep-sets (root channel lists) of every node of ``level``; ``node_stats[j]`` are node j's statistics
    (``score``: see :func:`group_scores`).

    Groups touching a module of ``whole`` stay unpruned; ``ratios`` (module name -> keep ratio)
    overrides ``ratio`` for the groups whose channels that module writes."""
    whole, ratios = set(whole), ratios or {}
    n_nodes = len(node_stats)
    plans: List[Dict[str, List[int]]] = [dict() for _ in range(n_nodes)]
    for info in infos:
        if level not in info.levels:
            continue
        if min(info.levels) < level:  # channels enter from the parent: gather what it kept
            for j in range(n_nodes):
                kept = parent_plans[j // 2].get(info.key) if parent_plans else None
                if kept is not None:
                    plans[j][info.key] = kept
            continue
        stream = info.producers >= 2 or max(info.levels) > level
        if (stream and not prune_residual) or info.members & whole:
            continue
        own = [ratios[n] for n in sorted(info.writers | {info.key}) if n in ratios]
        group_ratio = own[0] if own else ratio
        if info.n % info.align:
            continue
        for parent in range(0, n_nodes, 2):
            sibs = [parent, parent + 1]
            scores = [group_scores(info, node_stats[j], level, unit_level, score) for j in sibs]
            if any(s is None for s in scores):
                continue  # nothing in this level reads these channels: leave them whole
            m = info.n // info.align
            pos = [s.view(info.align, m).sum(0) for s in scores]
            k = _keep_count(group_ratio, m, 1 if info.align > 1 else round_to)
            if k >= m:
                continue
            kept = _cover(pos, k) if coverage else [torch.topk(p, k).indices.sort().values for p in pos]
            for j, kp in zip(sibs, kept):
                chans = (torch.arange(info.align).view(-1, 1) * m + kp.view(1, -1)).flatten()
                plans[j][info.key] = sorted(chans.tolist())
    return plans


def boundary_index(infos: List[GroupInfo], plan: Dict[str, List[int]], consumer: Optional[str]) -> Optional[List[int]]:
    """Dense channel positions a boundary tensor keeps at a node (None: all), read off its first consumer."""
    if consumer is None:
        return None
    for info in infos:
        if consumer in info.consumers and info.key in plan:
            idxs, roots = info.consumers[consumer]
            kept = set(plan[info.key])
            return sorted(i for i, r in zip(idxs, roots) if r in kept)
    return None


def prepare_node(dense: nn.Module, example: torch.Tensor, unit_level: Dict[str, int], ignored: Sequence[str],
                 pruners=None):
    """A deep copy of ``dense`` with its DependencyGraph and group descriptions, ready to be pruned."""
    model = copy.deepcopy(dense)
    frozen = {n for n, p in dense.named_parameters() if not p.requires_grad}
    dg = build_graph(model, example, pruners)
    return model, dg, describe_groups(model, dg, unit_level, ignored), frozen


def node_groups(model: nn.Module, dg: tp.DependencyGraph, infos: List[GroupInfo], plan: Dict[str, List[int]]):
    """Torch-Pruning groups that bring ``model`` (a node's copy) to ``plan``: yields (key, group), unpruned."""
    for info in infos:
        kept = plan.get(info.key)
        if kept is None:
            continue
        removed = sorted(set(range(info.n)) - set(kept))
        if not removed:
            continue
        root = model.get_submodule(info.key)
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, removed)
        if not dg.check_pruning_group(group):
            raise RuntimeError(f"pruning group rooted at {info.key!r} to {len(kept)} channels is invalid")
        yield info.key, group


def finish_node(model: nn.Module, frozen: set, unit_names: Sequence[str]) -> List[nn.Module]:
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return [model.get_submodule(n) for n in unit_names]


def build_node(dense: nn.Module, example: torch.Tensor, plan: Dict[str, List[int]], unit_names: Sequence[str],
               unit_level: Dict[str, int], ignored: Sequence[str], pruners=None) -> Tuple[List[nn.Module], List[GroupInfo]]:
    """Deep-copy ``dense``, prune the planned groups through a DependencyGraph, return the node's units."""
    model, dg, infos, frozen = prepare_node(dense, example, unit_level, ignored, pruners)
    for _, group in node_groups(model, dg, infos, plan):
        group.prune()
    return finish_node(model, frozen, unit_names), infos
