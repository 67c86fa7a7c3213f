"""BatchNorm statistics as deployment sees them: re-estimated under hard routing, and frozen while training.

Soft training runs every path on every sample, so a node's batch statistics describe all samples,
while in hard inference it only sees those routed to it; and a router near its decision boundary can
take the other side when the trunk's BatchNorm switches from batch to running statistics (measured on
ModelNet40: ``benchmarks/results/ablate_mn40.md``). :func:`recalibrate_batchnorm` sets every running
statistic to the population statistics of the samples that reach the layer under hard routing, and
:func:`freeze_batchnorm` then keeps statistics fixed while training (BatchNorm in eval mode, its affine
weights still trained): those of a tree's shared layers (``FinetuneConfig(bn_mode="shared")``: the root
router sees in training what deployment computes) or all of them (``bn_mode="frozen"``).
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from torch import nn

from ._modes import kept_train_flags
from .routing import RoutedModule, is_branched, set_routing, tree_state

BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> List[nn.Module]:
    """Every BatchNorm layer of ``model`` that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, BN) and m.track_running_stats]


def shared_batchnorms(model: nn.Module) -> List[nn.Module]:
    """The BatchNorm layers of a branched ``model`` outside its tree's nodes (the shared backbone, and any
    shared layer after the leaves); none for a model without a tree."""
    if not is_branched(model):
        return []
    in_nodes = {id(m) for r in model.modules() if isinstance(r, RoutedModule) for m in r.modules()}
    return [m for m in batchnorms(model) if id(m) not in in_nodes]


def freeze_batchnorm(model: nn.Module, which: str = "all") -> List[nn.Module]:
    """Put BatchNorm layers of ``model`` in eval mode (running statistics), the rest untouched: ``"all"`` of
    them or the tree's ``"shared"`` ones (:func:`shared_batchnorms`). Returns the layers frozen."""
    if which not in ("all", "shared"):
        raise ValueError(f"which={which!r}: choose 'all' or 'shared'")
    norms = batchnorms(model) if which == "all" else shared_batchnorms(model)
    for m in norms:
        m.eval()
    return norms


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` from ``batches`` (input
    tensors, or ``(x, ...)`` tuples of them, already normalised), as the average over the batches (not a
    moving average); returns the number of batches used.

    A branched model routes hard (one path per sample), so each node's statistics are those of the
    samples routed to it, as in deployment. A layer that no sample reached keeps its statistics. Every
    module's train/eval flag, the routing settings and the routers' balance offsets are left as they were.
    """
    norms = batchnorms(model)
    if not norms:
        return 0
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms}
    momenta = {m: m.momentum for m in norms}
    routing = tree_state(model).settings() if is_branched(model) else None
    used = 0
    with kept_train_flags(model):  # every module gets its own train/eval flag back
        try:
            if routing is not None:
                set_routing(model, "hard", balance_rate=0.0)
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches
            model.train()
            for xb in batches:
                if max_batches is not None and used >= max_batches:
                    break
                model(xb[0] if isinstance(xb, (tuple, list)) else xb)
                used += 1
        except BaseException:
            used = -1  # failed: every layer gets its statistics back
            raise
        finally:
            for m in norms:
                m.momentum = momenta[m]
                if used < 0 or int(m.num_batches_tracked) == 0:  # or no sample reached it (a leaf nothing was routed to)
                    for buf, old in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved[m]):
                        buf.copy_(old)
            if routing is not None:
                set_routing(model, **routing)
    return used
