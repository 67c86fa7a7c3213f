"""`branch()`: restructure a pretrained CNN into a Sigma-Branch (SigmaB) tree, in place.

Steps (DESIGN.md "The method"): find split points and the routed units; calibrate (one pass: pooled
split-point features and each sample's channel activity); cluster each node's samples with spherical
k-means into two children and initialise its cosine router from the centroids; sum the channel
activity per node (a second pass only when the per-sample statistics outgrow their memory bound);
allocate each node's keep-set per coupled group; prune a deep copy per node through Torch-Pruning's
DependencyGraph; swap routed modules in; refit the routers below the root on the pruned nodes'
features. Nothing touches ``model`` until every node is built, and a failed final check puts the
original modules back.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import _calib, _split, _trace
from ._assemble import build_tree, classifier_layers, first_consumers, swap_in
from ._routers import grow_routers, refit_routers
from .config import BranchConfig
from ._calib import CalibDataError
from ._forward import run_model, using_forward_fn
from .routing import RoutedModule, attach, detach, is_branched, set_routing

SPEC_FORMAT = "sigmab-tree"
_UNSET = object()


def _resolve_config(config, **kwargs) -> BranchConfig:
    if config is not None and not isinstance(config, BranchConfig):
        raise TypeError(f"config must be a BranchConfig, got {type(config).__name__}")
    base = config if config is not None else BranchConfig()
    overrides = {k: v for k, v in kwargs.items() if v is not _UNSET}
    return base.replace(**overrides) if overrides else base


def branch(model: nn.Module, depth=_UNSET, *, calib_data, keep_ratio=_UNSET, split_points=_UNSET, seed=_UNSET,
           config: Optional[BranchConfig] = None, customized_pruners: Optional[dict] = None,
           forward_fn: Optional[Callable] = None, **options) -> nn.Module:
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
        customized_pruners: ``{module type: tp pruning function}`` for layers Torch-Pruning does not
            know (added to those of :func:`register_pruner`, for this call).
        forward_fn: ``forward_fn(model, x) -> logits`` runs the model on a batch ``x`` of calib_data
            (Torch-Pruning's convention; e.g. ``lambda m, x: m(x)["logits"]``); default ``model(x)``.
            Used for every forward of this call; the tree it returns is called as the model was.
    """
    cfg = _resolve_config(config, depth=depth, keep_ratio=keep_ratio, split_points=split_points, seed=seed,
                          **options)
    with using_forward_fn(forward_fn):
        example, device = prepare(model, cfg, calib_data)
        flags = {name: m.training for name, m in model.named_modules()}
        model.eval()
        try:
            return _branch(model, cfg, calib_data, example, device, customized_pruners)
        finally:
            _restore_flags(model, flags)


def prepare(model: nn.Module, cfg: BranchConfig, calib_data, example: Optional[torch.Tensor] = None):
    """Check ``model`` and ``calib_data`` before anything happens; returns (example input, device)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod"):
        raise TypeError(f"{type(model).__name__} is a torch.compile wrapper: branch the uncompiled model "
                        "(model._orig_mod), then compile the tree")
    if is_branched(model):
        raise ValueError(f"{type(model).__name__} is already branched; branch a fresh dense model")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters to branch")
    device = params[0].device
    if device.type == "meta":
        raise ValueError("the model is on the meta device: calibration needs real weights; load them first")
    _calib.check_calib_data(calib_data)
    first = next(iter(_calib.iter_inputs(calib_data, cfg.calib_batch_size)), None)
    if first is None:
        raise ValueError("calib_data is empty: give at least "
                         f"{cfg.min_leaf_samples * 2 ** cfg.depth} samples")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    _calib.check_batch(first, device, "first batch", dtype)
    if example is None:
        return first[:2], device
    _calib.check_batch(example, device, "example_inputs", dtype)
    return example, device


def _restore_flags(model: nn.Module, flags: Dict[str, bool]) -> None:
    """Every module's train/eval flag as before branch(); a node's copy of a unit takes the flags of
    the dense modules it was made from (``u.variants.K.module.rest`` <- ``u.rest``)."""
    for name, m in model.named_modules():
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in ("variants", "routers") and isinstance(model.get_submodule(".".join(parts[:i])),
                                                                   RoutedModule):
                rest = parts[i + 3:] if parts[i] == "variants" and len(parts) > i + 2 else []
                name = ".".join(parts[:i] + rest)
                break
        m.training = flags.get(name, m.training)


def _branch(model, cfg: BranchConfig, calib_data, example, device, pruners=None) -> nn.Module:
    spec, routers, calib = plan_tree(model, cfg, calib_data, example, device, pruners)
    return assemble(model, spec, routers, calib_data, cfg, example, device, pruners=pruners, calib=calib)


def plan_tree(model, cfg: BranchConfig, calib_data, example, device, pruners=None):
    """Everything ``branch`` decides before it builds anything: the spec (split points, units, every
    node's keep-sets) and the routers. ``model`` is only run, never changed."""
    try:
        trace = _trace.trace_calls(model, example)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"{type(model).__name__} cannot run calib_data's first batch (shape "
                         f"{tuple(example.shape)}, dtype {example.dtype}): {err}. Give inputs shaped and typed like "
                         "the model's own inputs") from err
    split_points = list(cfg.split_points) if cfg.split_points else _trace.auto_split_points(model, trace, cfg.depth)
    levels = _trace.plan_units(model, trace, split_points)
    units = [u for lv in levels for u in lv]
    unit_level = {u: l for l, lv in enumerate(levels, start=1) for u in lv}
    classifier = classifier_layers(model, trace)
    names = dict(model.named_modules())
    unknown = [n for n in list(cfg.ignored_layers or []) + list(cfg.keep_ratio_dict or {}) if n not in names]
    if unknown:
        raise ValueError(f"ignored_layers / keep_ratio_dict name {unknown}, which {type(model).__name__} does not "
                         f"have; use module paths from model.named_modules(), e.g. {units[:3]}")

    calib = _calib.split_features(model, split_points, calib_data, cfg, device, levels)
    features = calib.features
    n = features[0].shape[0]
    if n < cfg.min_leaf_samples * 2 ** cfg.depth:
        raise ValueError(f"calib_data has {n} samples; a depth-{cfg.depth} tree needs at least "
                         f"{cfg.min_leaf_samples * 2 ** cfg.depth} (min_leaf_samples x 2**depth): give more data")
    routers, shares, calib.paths = grow_routers(features, cfg)
    for row in routers:
        for r in row:
            r.to(device)
    if calib.per_sample is not None:  # the usual case: no second pass over the data
        sums, counts = _calib.node_stats(calib.per_sample, calib.paths)
        calib.per_sample = None
    else:
        sums, counts = _calib.channel_stats(model, split_points, levels, routers, calib_data, cfg, device)
        _calib.check_second_pass(n, int(counts[1].sum()))

    probe = copy.deepcopy(model)
    infos = _split.describe_groups(probe, _split.build_graph(probe, example, pruners), unit_level, classifier)
    del probe
    plans: Dict[str, dict] = {}
    parent_plans: List[dict] = []
    for l in range(1, cfg.depth + 1):
        node_stats = [{k: v[j] / max(float(counts[l][j]), 1.0) for k, v in sums[l].items()} for j in range(2 ** l)]
        level_plans = _split.allocate(infos, l, node_stats, parent_plans, cfg.keep_ratios()[l - 1], cfg.coverage,
                                      cfg.prune_residual, cfg.round_to, unit_level, cfg.ignored_layers or (),
                                      cfg.keep_ratio_dict, score=cfg.channel_score)
        plans.update({f"{l}/{j}": p for j, p in enumerate(level_plans)})
        parent_plans = level_plans
    if min(cfg.keep_ratios() + list((cfg.keep_ratio_dict or {}).values())) < 1.0 and not any(plans.values()):
        raise ValueError(f"keep_ratio={cfg.keep_ratio} prunes nothing in {type(model).__name__}: no channel group "
                         f"after split point {split_points[0]!r} can be pruned (for instance parameters Torch-Pruning "
                         "cannot trace, or only layers whose channels feed the output); choose other split_points "
                         "or report the architecture")

    spec = {
        "format": SPEC_FORMAT, "version": 1, "model": type(model).__name__, "config": cfg.to_dict(),
        "split_points": split_points, "levels": levels, "classifier": classifier,
        "consumers": first_consumers(model, trace, units), "widths": [trace.width[u] for u in units],
        "input_shape": list(example.shape[1:]), "dense_params": sum(p.numel() for p in model.parameters()),
        "plan": plans, "calibration": {"samples": n, "shares": shares},
    }
    return spec, routers, calib


def assemble(model, spec: dict, routers, calib_data, cfg: BranchConfig, example, device, nodes=None,
             pruners=None, *, calib: _calib.Pass1) -> nn.Module:
    """Build the tree of ``spec`` (``nodes``: node copies already pruned), swap it into ``model``, refit
    the routers below the root from ``calib`` (what :func:`plan_tree` calibrated) and check a forward;
    on any failure ``model`` is put back as it was."""
    dense = copy.deepcopy(model)
    routed, state = build_tree(model, spec, example, routers, nodes, pruners)
    split_points = spec["split_points"]
    originals = swap_in(model, routed)
    try:
        attach(model, state)
        refit_routers(model, dense, split_points, routers, calib_data, cfg, device, calib)
        _check_forward(model, example)
    except Exception as err:
        swap_in(model, originals)
        detach(model)
        if isinstance(err, CalibDataError):
            raise
        raise ValueError(f"the branched {type(model).__name__} failed its check forward ({err}); the model was "
                         "left as it was: choose other split_points, or report the architecture") from err
    return model


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        for mode in ("hard", "soft"):
            set_routing(model, mode)
            out = run_model(model, example)
            if not torch.is_tensor(out) or out.shape[0] != example.shape[0] or not torch.isfinite(out).all():
                raise RuntimeError(f"{mode} routing gave {type(out).__name__} of shape {getattr(out, 'shape', None)} "
                                   "(the model, or forward_fn, must return a logits tensor of one row per input)")
    set_routing(model, "auto")
