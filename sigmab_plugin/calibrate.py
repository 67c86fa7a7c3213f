"""Routing calibration: make a tree's hard decisions send each leaf the share its soft routing gives it.

Soft training balances the *probability mass* of the leaves, and a router can satisfy that by hedging:
every sample at 30/70 gives a 30% share of mass and 0% of hard decisions. Measured on ModelNet40
(PointNet++ SSG, depth 2): training mass 24/24/26/26%, argmax shares 13/9/41/37%, hard test routing
5/2/58/35%. The leaves learned on their mass, so deployment should route in the same proportions.

:func:`calibrate_routing` reads every router's margin (``logit_0 - logit_1``) on calibration data in
eval mode, computes each leaf's soft mass at ``temperature`` (the last training temperature), then,
top-down, shifts each router's ``balance`` offset so that the samples hard-routed to its node split
between its children in the proportion of their soft mass. The ranking of samples by each router is
unchanged: only thresholds move. The offsets are buffers, so ``save_branched``/``load_branched`` and
the deployment export carry them.

    report = sb.calibrate_routing(tree, calib_images)        # after fine-tuning, on training inputs
    report["leaf_share_after"]                               # hard shares on those inputs
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ._forward import run_model, using_forward_fn
from .routing import RoutedModule, tree_state

Data = Union[torch.Tensor, Iterable]


def _batches(data: Data, batch_size: int) -> Iterable[torch.Tensor]:
    if torch.is_tensor(data):
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
    else:
        for item in data:
            yield item[0] if isinstance(item, (tuple, list)) else item


def _router_modules(model: nn.Module) -> Dict[int, RoutedModule]:
    levels = {}
    for m in model.modules():
        if isinstance(m, RoutedModule) and m.routers is not None:
            levels.setdefault(m.level, m)
    return levels


@torch.no_grad()
def router_margins(model: nn.Module, data: Data, batch_size: int = 256) -> Dict[Tuple[int, int], torch.Tensor]:
    """``{(level, node): margin}``: every router's ``logit_0 - logit_1`` (offsets included) for every
    sample of ``data``, each computed on the features its node really receives (the samples are sent
    down that node's path whatever the routers above decide). Eval mode, hard routing."""
    state = tree_state(model)
    depth = state.depth
    levels = _router_modules(model)
    margins: Dict[Tuple[int, int], List[torch.Tensor]] = {}
    current = {"leaf": 0}
    done = set()  # routers already read in an earlier forced pass

    def hook(mod: RoutedModule, args):
        key = (mod.level, current["leaf"] >> (depth - mod.level + 1))
        if key not in done:
            logits = mod.routers[key[1]](args[0])
            margins.setdefault(key, []).append((logits[:, 0] - logits[:, 1]).float().cpu())

    handles = [m.register_forward_pre_hook(hook) for m in levels.values()]
    saved_mode, was_training = state.mode, model.training
    try:
        model.eval()
        state.mode = "hard"
        for leaf in range(0, 2 ** depth, 2):  # the leftmost leaf under each deepest router covers every router
            current["leaf"] = leaf
            for x in _batches(data, batch_size):
                state.forced_leaves = torch.full((x.shape[0],), leaf, dtype=torch.long, device=x.device)
                run_model(model, x)
            done.update(margins)
    finally:
        state.forced_leaves = None
        state.mode = saved_mode
        model.train(was_training)
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in margins.items()}


def _soft_leaf_mass(margins: Dict[Tuple[int, int], torch.Tensor], depth: int, temperature: float) -> torch.Tensor:
    """(N, 2**depth) leaf probabilities of soft routing at ``temperature``."""
    n = next(iter(margins.values())).shape[0]
    probs = torch.ones(n, 1, dtype=torch.float64)
    for level in range(1, depth + 1):
        p0 = torch.stack([torch.sigmoid(margins[(level, p)].double() / temperature) for p in range(probs.shape[1])], 1)
        probs = torch.stack([probs * p0, probs * (1 - p0)], 2).reshape(n, -1)
    return probs


def _descend(margins: Dict[Tuple[int, int], torch.Tensor], level: int, node: torch.Tensor) -> torch.Tensor:
    """Each sample's node one level down, from its router's margin at ``level`` (argmax: ties to child 0)."""
    m = torch.stack([margins[(level, p)] for p in range(2 ** (level - 1))], 1).gather(1, node[:, None])[:, 0]
    return 2 * node + (m < 0).long()


def _hard_leaves(margins: Dict[Tuple[int, int], torch.Tensor], depth: int) -> torch.Tensor:
    node = torch.zeros(next(iter(margins.values())).shape[0], dtype=torch.long)
    for level in range(1, depth + 1):
        node = _descend(margins, level, node)
    return node


def _threshold(m: torch.Tensor, k: int) -> float:
    """An offset ``delta`` with exactly ``k`` of ``m + delta`` >= 0 (up to ties), midway between samples."""
    if len(m) == 0:
        return 0.0
    s = m.sort(descending=True).values.double()
    if k <= 0:
        return float(-s[0]) - 1e-3
    if k >= len(s):
        return float(-s[-1]) + 1e-3
    return float(-(s[k - 1] + s[k]) / 2)


def _target(shares, leaves: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(shares, dtype=torch.float64).flatten()
    except (TypeError, ValueError):
        t = None
    if t is None or t.numel() != leaves or not torch.isfinite(t).all() or (t < 0).any() or t.sum() <= 0:
        raise ValueError(f"shares={shares!r} must be {leaves} finite non-negative numbers, one per leaf, not all 0 "
                         "(e.g. FinetuneConfig's last train_leaf_share), or None for the soft mass")
    return t / t.sum()


def calibrate_routing(model: nn.Module, data: Data, *, temperature: float = 0.1, shares=None,
                      batch_size: int = 256, forward_fn: Optional[Callable] = None) -> dict:
    """Shift the routers' offsets in place so hard routing on ``data`` gives each leaf its soft mass at
    ``temperature`` (see the module docstring), or the given leaf ``shares``; returns the shares before
    and after, the target and the offsets.

    ``data``: model inputs (a tensor, or an iterable of tensors or ``(x, y)`` batches) from the
    training distribution without augmentation; a few hundred to a few thousand samples. Call it once
    after fine-tuning: the soft mass is read from the routers as trained, and moving the offsets moves
    it (a second call with the first call's ``leaf_mass`` as ``shares`` changes nothing). ``shares``
    (one per leaf, normalised) is the training log's ``train_leaf_share``: the mass each leaf trained on.
    """
    state = tree_state(model)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature={temperature!r} must be a finite positive number (the last training "
                         "temperature, FinetuneConfig.temperature_end)")
    target = None if shares is None else _target(shares, 2 ** state.depth)
    with using_forward_fn(forward_fn):
        margins = router_margins(model, data, batch_size)
    if not margins or next(iter(margins.values())).numel() == 0:
        raise ValueError("calibrate_routing needs at least one input sample in data")
    depth, n = state.depth, next(iter(margins.values())).shape[0]
    leaves = 2 ** depth
    mass = _soft_leaf_mass(margins, depth, temperature).sum(0) if target is None else target
    before = torch.bincount(_hard_leaves(margins, depth), minlength=leaves)
    levels = _router_modules(model)
    node = torch.zeros(n, dtype=torch.long)
    offsets = {}
    for level in range(1, depth + 1):
        width = 2 ** (depth - level)  # leaves under each child at this level
        for p in range(2 ** (level - 1)):
            sub = mass[2 * p * width:(2 * p + 2) * width]
            share0 = float(sub[:width].sum() / sub.sum().clamp_min(1e-12))
            here = node == p
            delta = _threshold(margins[(level, p)][here], round(share0 * int(here.sum())))
            margins[(level, p)] = margins[(level, p)] + delta
            router = levels[level].routers[p]
            with torch.no_grad():
                router.balance.add_(torch.tensor([delta / 2, -delta / 2], dtype=router.balance.dtype,
                                                 device=router.balance.device))
            offsets[f"{level}.{p}"] = delta
        node = _descend(margins, level, node)
    return {"samples": n, "temperature": float(temperature),
            "leaf_mass": (mass / mass.sum()).tolist(),
            "leaf_share_before": (before.double() / n).tolist(),
            "leaf_share_after": (torch.bincount(node, minlength=leaves).double() / n).tolist(),
            "offsets": offsets}
