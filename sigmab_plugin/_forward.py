"""How SigmaB runs the user's model: ``model(x)``, or Torch-Pruning's ``forward_fn(model, x)`` convention
(a model that needs extra arguments, or whose output must be picked from a dict or tuple).

``branch(..., forward_fn=f)`` (and the Torch-Pruning pruner) hold ``f`` in a context variable for the
length of that one call; every calibration, tracing, graph-building and check forward goes through
:func:`run_model`. The variable is reset when the call returns or fails, so nothing outlives it.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

import torch
from torch import nn

_FORWARD_FN: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("sigmab_forward_fn", default=None)


@contextlib.contextmanager
def using_forward_fn(forward_fn: Optional[Callable]):
    """Within the block every calibration, tracing and check forward runs ``forward_fn(model, x)``
    (Torch-Pruning's convention) instead of ``model(x)``; ``None`` keeps ``model(x)``."""
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be a callable (model, inputs) -> output, got {type(forward_fn).__name__}")
    token = _FORWARD_FN.set(forward_fn)
    try:
        yield
    finally:
        _FORWARD_FN.reset(token)


def current_forward_fn() -> Optional[Callable]:
    """The ``forward_fn`` of the enclosing :func:`using_forward_fn` block (None: ``model(x)``)."""
    return _FORWARD_FN.get()


def run_model(model: nn.Module, x: torch.Tensor):
    """``model(x)``, or ``forward_fn(model, x)`` inside :func:`using_forward_fn`."""
    fn = _FORWARD_FN.get()
    return model(x) if fn is None else fn(model, x)
