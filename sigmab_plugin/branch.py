"""`branch()`: restructure a pretrained CNN into a Sigma-Branch (SigmaB) tree, in place.

Steps (DESIGN.md "The method"): find split points and the routed units; calibrate (pass 1: pooled
split-point features); cluster each node's samples with spherical k-means into two children and
initialise its cosine router from the centroids; calibrate (pass 2: per-node channel activity);
allocate each node's keep-set per coupled group; prune a deep copy per node through Torch-Pruning's
DependencyGraph; swap routed modules in. Nothing touches ``model`` until every node is built, and a
failed final check puts the original modules back.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _calib, _split, _trace
from .config import BranchConfig
from .kmeans import spherical_kmeans
from .routing import CosineRouter, NodeVariant, RoutedModule, TreeState, pool_features, set_routing

SPEC_FORMAT = "sigmab-tree"
_UNSET = object()


def _is_branched(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_sigmab_tree", None), TreeState)


def _resolve_config(config, **kwargs) -> BranchConfig:
    if config is not None and not isinstance(config, BranchConfig):
        raise TypeError(f"config must be a BranchConfig, got {type(config).__name__}")
    base = config if config is not None else BranchConfig()
    overrides = {k: v for k, v in kwargs.items() if v is not _UNSET}
    return base.replace(**overrides) if overrides else base


def _fit_router(feats: torch.Tensor, cfg: BranchConfig, seed: int):
    """Spherical k-means (k=2) on one node's features; returns the router and each sample's child."""
    center = feats.mean(0)
    km = spherical_kmeans(feats - center, 2, restarts=cfg.kmeans_restarts, iters=cfg.kmeans_iters, seed=seed,
                          min_share=cfg.min_cluster_share)
    router = CosineRouter(km.centroids, 1.0, center=center)
    return router, _set_threshold(router, feats, int((km.labels == 0).sum()), cfg.router_tau)


@torch.no_grad()
def _set_threshold(router: CosineRouter, feats: torch.Tensor, n0: int, tau: Optional[float]) -> torch.Tensor:
    """Bias the router so exactly ``n0`` of ``feats`` go to child 0 (the cluster sizes) and scale it:
    ``tau`` fixed, or (None) such that the median sample sits at logit margin 1 from the boundary."""
    router.bias.zero_()
    router.tau.fill_(1.0)
    logits = router(feats)
    margin = logits[:, 0] - logits[:, 1]
    ranked = margin.sort(descending=True).values
    cut = 0.5 * (ranked[n0 - 1] + ranked[n0]) if 0 < n0 < len(ranked) else ranked.new_zeros(())
    if tau is None:
        spread = float((margin - cut).abs().median())
        tau = 1.0 / spread if spread > 1e-8 else 10.0
    router.tau.fill_(tau)
    router.bias.copy_(torch.stack([-cut * tau / 2, cut * tau / 2]))
    return router(feats).argmax(1)


def _refit_routers(tree: nn.Module, dense: nn.Module, split_points: List[str], routers: List[List[CosineRouter]],
                   calib_data, cfg: BranchConfig, device) -> None:
    """Refit the routers below the root on the features the pruned nodes really produce.

    Each calibration batch runs through the dense model (its clustering gives every sample's path)
    and then through the tree forced along that path; each router then becomes the cosine classifier
    of its two children's mean pruned features, biased to the cluster sizes.
    """
    depth = len(split_points)
    if depth < 2:
        return
    state = tree._sigmab_tree
    feats = {l: [] for l in range(1, depth)}  # level -> [(pooled features, parent node, target child)]
    path = {}
    handles = []
    for l, s in enumerate(split_points):
        def dense_hook(_m, _i, out, l=l):
            path[l + 1] = _calib.route_children(routers[l], path[l], out)
        handles.append(dense.get_submodule(s).register_forward_hook(dense_hook))
    for m in tree.modules():
        if isinstance(m, RoutedModule) and m.routers is not None and m.level >= 2:
            def tree_hook(mod, inp):
                ctx, l = mod._tree.ctx, mod.level - 1
                feats[l].append((pool_features(inp[0]).float().cpu(), ctx.node.cpu(),
                                 (path[l + 1][ctx.sample] & 1).cpu()))
            handles.append(m.register_forward_pre_hook(tree_hook))
    try:
        state.mode = "hard"
        with torch.no_grad():
            for x in _calib.iter_inputs(calib_data, cfg.calib_batch_size):
                path.clear()
                path[0] = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                dense(x)
                state.forced_leaves = path[depth]
                tree(x)
    finally:
        state.forced_leaves = None
        state.mode = "auto"
        for h in handles:
            h.remove()
    for l in range(1, depth):
        f = torch.cat([t[0] for t in feats[l]])
        node, target = torch.cat([t[1] for t in feats[l]]), torch.cat([t[2] for t in feats[l]])
        for j, router in enumerate(routers[l]):
            rows = node == j
            fj, tj = f[rows], target[rows]
            if int(tj.sum()) in (0, len(tj)):
                continue  # one child only: keep the dense fit
            center = fj.mean(0)
            unit = F.normalize(fj - center, dim=1)
            with torch.no_grad():
                router.center.copy_(center)
                router.centroids.copy_(torch.stack([F.normalize(unit[tj == c].mean(0), dim=0) for c in (0, 1)]))
            _set_threshold(router, fj.to(router.centroids.device), int((tj == 0).sum()), cfg.router_tau)


def _grow_routers(features: List[torch.Tensor], cfg: BranchConfig):
    """Routers of every internal node, level by level, each fitted on its own samples."""
    n = features[0].shape[0]
    members = {(0, 0): torch.arange(n)}
    routers: List[List[CosineRouter]] = []
    for l in range(cfg.depth):
        row = []
        for j in range(2 ** l):
            idx = members[(l, j)]
            if idx.numel() < 2 * cfg.min_leaf_samples * 2 ** (cfg.depth - l - 1):
                raise ValueError(
                    f"node {l}/{j} receives {idx.numel()} calibration samples, too few to split further; "
                    f"give more calib_data (>= {cfg.min_leaf_samples * 2 ** cfg.depth} samples and balanced) "
                    "or lower depth / min_cluster_share")
            router, child = _fit_router(features[l][idx], cfg, cfg.seed + 1000 * l + j)
            row.append(router)
            for c in (0, 1):
                members[(l + 1, 2 * j + c)] = idx[child == c]
        routers.append(row)
    shares = {f"{l}/{j}": idx.numel() / n for (l, j), idx in members.items()}
    return routers, shares


def _classifier(model: nn.Module, trace: _trace.Trace) -> List[str]:
    names = {m: n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and head in names and any(True for _ in head.parameters()):
            layers = [f"{names[head]}.{n}".strip(".") for n, m in head.named_modules()
                      if isinstance(m, _split._PARAM_LAYERS)]
            if layers:
                return layers[-1:]
    layers = [n for n in trace.order if isinstance(model.get_submodule(n), _split._PARAM_LAYERS)]
    return layers[-1:]


def first_consumers(model: nn.Module, trace: _trace.Trace, units: List[str]) -> List[Optional[str]]:
    """For the boundary after each unit: the first conv/linear that runs after it (None after the last)."""
    layers = [n for n in trace.order if isinstance(model.get_submodule(n), _split._PARAM_LAYERS)]
    out = []
    for u in units:
        later = [n for n in layers if trace.enter[n] > trace.exit[u]]
        out.append(later[0] if later else None)
    return out


def build_tree(model: nn.Module, spec: dict, example: torch.Tensor,
               routers: List[List[CosineRouter]]) -> Tuple[Dict[str, nn.Module], TreeState]:
    """Build the routed modules described by ``spec`` from the dense ``model`` (not modified)."""
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
            node_units, infos = _split.build_node(model, example, plan, lv, unit_level, spec["classifier"])
            prev = None if l == 1 else _split.boundary_index(infos, plan, consumers[levels[l - 2][-1]])
            for u, m in zip(lv, node_units):
                out = _split.boundary_index(infos, plan, consumers[u])
                variants[u].append(NodeVariant(m, _index(prev, example.device), _index(out, example.device), widths[u]))
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


def branch(model: nn.Module, depth=_UNSET, *, calib_data, keep_ratio=_UNSET, split_points=_UNSET, seed=_UNSET,
           config: Optional[BranchConfig] = None, **options) -> nn.Module:
    """Restructure ``model`` into a SigmaB tree in place and return the same object.

    Args:
        model: a pretrained CNN (any timm CNN, or a model whose forward runs its stages in order).
        depth: tree levels below the backbone (default 2).
        calib_data: tensor, DataLoader or re-iterable of batches (tensors or (x, y) tuples) on the
            model's device, used for clustering and channel allocation.
        keep_ratio: share of each coupled channel group a node keeps, one float or one per level.
        split_points: module paths feeding the routers (default: picked from ``feature_info``).
        seed: seed of the spherical k-means.
        config: a ``BranchConfig``; keyword arguments (including any of its fields) override it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _is_branched(model):
        raise ValueError(f"{type(model).__name__} is already branched; branch a fresh dense model")
    cfg = _resolve_config(config, depth=depth, keep_ratio=keep_ratio, split_points=split_points, seed=seed,
                          **options)
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters to branch")
    device = params[0].device
    _calib.check_calib_data(calib_data)
    first = next(iter(_calib.iter_inputs(calib_data, cfg.calib_batch_size)), None)
    if first is None:
        raise ValueError("calib_data is empty: give at least "
                         f"{cfg.min_leaf_samples * 2 ** cfg.depth} samples")
    _calib.check_batch(first, device, "first batch")
    example = first[:2]
    was_training = model.training
    model.eval()
    try:
        return _branch(model, cfg, calib_data, example, device)
    finally:
        model.train(was_training)


def _branch(model, cfg: BranchConfig, calib_data, example, device) -> nn.Module:
    trace = _trace.trace_calls(model, example)
    split_points = list(cfg.split_points) if cfg.split_points else _trace.auto_split_points(model, trace, cfg.depth)
    levels = _trace.plan_units(model, trace, split_points)
    units = [u for lv in levels for u in lv]
    unit_level = {u: l for l, lv in enumerate(levels, start=1) for u in lv}
    classifier = _classifier(model, trace)

    features = _calib.split_features(model, split_points, calib_data, cfg, device)
    n = features[0].shape[0]
    if n < cfg.min_leaf_samples * 2 ** cfg.depth:
        raise ValueError(f"calib_data has {n} samples; a depth-{cfg.depth} tree needs at least "
                         f"{cfg.min_leaf_samples * 2 ** cfg.depth} (min_leaf_samples x 2**depth): give more data")
    routers, shares = _grow_routers(features, cfg)
    for row in routers:
        for r in row:
            r.to(device)
    sums, counts = _calib.channel_stats(model, split_points, levels, routers, calib_data, cfg, device)

    probe = copy.deepcopy(model)
    infos = _split.describe_groups(probe, _split.build_graph(probe, example), unit_level, classifier)
    del probe
    plans: Dict[str, dict] = {}
    parent_plans: List[dict] = []
    for l in range(1, cfg.depth + 1):
        node_stats = [{k: v[j] / max(float(counts[l][j]), 1.0) for k, v in sums[l].items()} for j in range(2 ** l)]
        level_plans = _split.allocate(infos, l, node_stats, parent_plans, cfg.keep_ratios()[l - 1], cfg.coverage,
                                      cfg.prune_residual, cfg.round_to, unit_level)
        plans.update({f"{l}/{j}": p for j, p in enumerate(level_plans)})
        parent_plans = level_plans

    spec = {
        "format": SPEC_FORMAT, "version": 1, "model": type(model).__name__, "config": cfg.to_dict(),
        "split_points": split_points, "levels": levels, "classifier": classifier,
        "consumers": first_consumers(model, trace, units), "widths": [trace.width[u] for u in units],
        "input_shape": list(example.shape[1:]), "dense_params": sum(p.numel() for p in model.parameters()),
        "plan": plans, "calibration": {"samples": n, "shares": shares},
    }
    dense = copy.deepcopy(model)
    routed, state = build_tree(model, spec, example, routers)
    originals = swap_in(model, routed)
    try:
        model._sigmab_tree = state
        _refit_routers(model, dense, split_points, routers, calib_data, cfg, device)
        _check_forward(model, example)
    except Exception as err:
        swap_in(model, originals)
        del model._sigmab_tree
        raise ValueError(f"the branched {type(model).__name__} failed its check forward ({err}); the model was "
                         "left as it was: choose other split_points, or report the architecture") from err
    return model


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        for mode in ("hard", "soft"):
            set_routing(model, mode)
            out = model(example)
            if not torch.is_tensor(out) or out.shape[0] != example.shape[0] or not torch.isfinite(out).all():
                raise RuntimeError(f"{mode} routing gave {type(out).__name__} of shape {getattr(out, 'shape', None)}")
    set_routing(model, "auto")
