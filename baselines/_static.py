"""Budgets: fit a method's knob so its model has at most a given number of (active) parameters, and
prune a copy of a model with a Torch-Pruning importance (used by the FPGM and HRank baselines)."""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple, TypeVar

import torch
import torch_pruning as tp
from torch import nn

from sigmab_plugin import registered_pruners

T = TypeVar("T")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bisect_budget(build: Callable[[float], T], count: Callable[[T], int], budget: int, lo: float, hi: float,
                  iters: int, *, shrinks: bool, what: str, fix: str) -> Tuple[float, T]:
    """The knob value in [lo, hi] whose model is the largest with ``count(model) <= budget``.

    ``shrinks``: a larger knob gives a smaller model (a pruning ratio); otherwise a larger one (a
    keep ratio). Raises ``ValueError`` naming ``what`` and ``fix`` when even the smallest model
    in range is over the budget.
    """
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        model = build(mid)
        fits = count(model) <= budget
        if fits:
            best = (mid, model)
        if fits == shrinks:
            hi = mid
        else:
            lo = mid
    if best is None:
        extreme = hi if shrinks else lo
        model = build(extreme)
        n = count(model)
        if n > budget:
            raise ValueError(f"{what} cannot reach the budget of {budget:,} active params: its smallest model has "
                             f"{n:,}; {fix}")
        best = (extreme, model)
    return best


def tp_prune(model: nn.Module, example: torch.Tensor, importance, ratio: float, classifier: str,
             shape: Optional[Dict[str, float]] = None) -> nn.Module:
    """Prune ``model`` in place: ``ratio`` everywhere, or with ``shape`` (module name -> relative keep) the layers
    under each named module keep ``(1 - ratio) * shape[name] / max(shape)`` of their channels and the layers
    under no named module keep all of theirs (as a SigmaB tree's shared backbone). ``shape`` is checked by the
    caller (:func:`prune_to_budget`, once per budget search, not once per build)."""
    model.eval()
    ratios = None
    if shape:
        top = max(shape.values())
        ratios = {model.get_submodule(n): 1.0 - (1.0 - ratio) * r / top for n, r in shape.items()}
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=0.0 if shape else ratio,
                                      pruning_ratio_dict=ratios, ignored_layers=[model.get_submodule(classifier)],
                                      customized_pruners=registered_pruners())
        pruner.step()
    return model


def check_shape(model: nn.Module, shape: Dict[str, float]) -> None:
    """``ValueError`` unless every key of ``shape`` names a module of ``model`` and every value is positive."""
    unknown = [n for n in shape if n not in dict(model.named_modules())]
    if unknown or min(shape.values()) <= 0:
        raise ValueError(f"static_shape={shape}: every key must name a module of {type(model).__name__} "
                         f"(unknown: {unknown}) and every value be a positive relative keep ratio")


def prune_to_budget(dense: nn.Module, example: torch.Tensor, make_importance: Callable[[nn.Module], object],
                    budget: int, classifier: str, name: str, iters: int = 14,
                    shape: Optional[Dict[str, float]] = None) -> nn.Module:
    """The largest model (fewest pruned channels) whose parameter count does not exceed ``budget``."""
    if shape:
        check_shape(dense, shape)  # once, before the search builds any model
    if budget >= count_params(dense):
        return copy.deepcopy(dense)

    def build(ratio: float) -> nn.Module:
        m = copy.deepcopy(dense)
        return tp_prune(m, example, make_importance(m), ratio, classifier, shape)
    return bisect_budget(build, count_params, budget, 0.0, 0.99, iters, shrinks=True, what=name,
                         fix=f"raise keep_ratio/target fraction or drop {name}")[1]
