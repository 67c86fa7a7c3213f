"""Prune a copy of a model with a Torch-Pruning importance to a parameter budget (bisection on the ratio)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from sigmab_plugin._split import custom_pruners


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_prune(model: nn.Module, example: torch.Tensor, importance, ratio: float, classifier: str) -> nn.Module:
    model.eval()
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=[model.get_submodule(classifier)],
                                      customized_pruners=custom_pruners())
        pruner.step()
    return model


def prune_to_budget(dense: nn.Module, example: torch.Tensor, make_importance: Callable[[nn.Module], object],
                    budget: int, classifier: str, name: str, iters: int = 14) -> nn.Module:
    """The largest model (fewest pruned channels) whose parameter count does not exceed ``budget``."""
    dense_count = count_params(dense)
    if budget >= dense_count:
        return copy.deepcopy(dense)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = copy.deepcopy(dense)
        tp_prune(m, example, make_importance(m), mid, classifier)
        if count_params(m) <= budget:
            best, hi = m, mid
        else:
            lo = mid
    if best is None:
        m = copy.deepcopy(dense)
        tp_prune(m, example, make_importance(m), 0.99, classifier)
        if count_params(m) > budget:
            raise ValueError(f"{name} cannot reach the budget of {budget:,} active params: its smallest model "
                             f"has {count_params(m):,}; raise keep_ratio/target fraction or drop {name}")
        best = m
    return best
