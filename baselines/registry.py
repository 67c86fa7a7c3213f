"""A small registry of the methods the harness compares (one file per method registers itself)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

_METHODS: Dict[str, Callable[[], "Method"]] = {}


@dataclass
class RunContext:
    """What every method receives: the same trained dense model, calibration data and budget."""

    dense: nn.Module  # trained dense reference (methods must deep-copy it)
    calib: torch.Tensor  # normalised calibration images
    budget: Optional[int]  # active parameters a static method must not exceed (SigmaB's largest path)
    branch_options: dict  # depth, keep_ratio, prune_residual, ... for SigmaB
    classifier: str  # module name of the final classifier (never pruned)
    seed: int = 0
    target_fraction: Optional[float] = None  # SigmaB: search the keep ratio to reach this active fraction
    # static methods: module name -> relative keep ratio of the layers under it (the common scale is searched
    # to the budget; a module named with 1.0 at the largest entry keeps the most); None: one ratio everywhere
    static_shape: Optional[Dict[str, float]] = None


class Method:
    """A compared method: turns a copy of the dense reference into the model to fine-tune."""

    name = "method"
    static = False  # static pruners are pruned to the SigmaB budget

    def prepare(self, run: RunContext) -> nn.Module:
        raise NotImplementedError


def register_method(name: str):
    """Class decorator: register a ``Method`` under ``name``; a duplicate name raises ``ValueError``."""
    def deco(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {available_methods()}")
    return _METHODS[name]()


def available_methods() -> List[str]:
    _load_builtin()
    return sorted(_METHODS)


def _load_builtin() -> None:
    from . import dense, fpgm, fpgm_nni, hrank, sigmab  # noqa: F401  (each registers itself)
