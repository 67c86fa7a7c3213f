"""Calibration passes of SigmaB, streamed with bounded memory.

Pass 1 records the pooled features at every split point (one row per sample: what the clustering
needs). Pass 2 accumulates, per tree node, the sum over that node's samples of every conv/linear
input's per-channel mean |activation|: memory is nodes x channels, whatever the number of samples,
and each sample's node is decided on the fly by the routers, so shuffled loaders are fine.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Sequence

import torch
from torch import nn

from ._progress import progress
from ._trace import PARAM_LAYERS
from .routing import CosineRouter, pool_features



def iter_inputs(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Input batches of ``data``: a tensor (split into batches), or an iterable of tensors / (x, y, ...)."""
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
        return
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calib_data yielded a {type(x).__name__}; it must yield tensors or (x, y) tuples")
        yield x


def check_calib_data(data) -> None:
    if isinstance(data, torch.Tensor):
        if data.ndim < 2:
            raise ValueError(f"calib_data tensor has shape {tuple(data.shape)}; expected (N, C, ...)")
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"calib_data must be a tensor, a DataLoader or an iterable of batches, "
                        f"got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(f"calib_data is a one-shot iterator ({type(data).__name__}); calibration reads it "
                        "twice: pass a tensor, a DataLoader or a list (e.g. list(your_iterator))")


def check_batch(x: torch.Tensor, device: torch.device, where: str, dtype: torch.dtype = None) -> None:
    if x.device != device:
        raise ValueError(f"calib_data batch is on {x.device} but the model is on {device}: move the data "
                         f"(x.to('{device}')) or the model so they match")
    if not torch.is_floating_point(x):
        raise TypeError(f"calib_data batch has dtype {x.dtype}; expected a floating-point tensor")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"calib_data batch has dtype {x.dtype} but the model's parameters are {dtype}: convert "
                        f"one of them (x.to({dtype}) or model.to({x.dtype}))")
    if not torch.isfinite(x).all():
        raise ValueError(f"calib_data contains non-finite values ({where}); clean the data")


def _finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"non-finite activations at {where}: the model produces inf/NaN on the calibration "
                         "data; check its weights and the input normalisation")


def route_children(routers: List[CosineRouter], parent: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Child node id of every row, given its parent node id and the split-point output ``out``."""
    child = torch.empty_like(parent)
    pooled = pool_features(out)
    for j in torch.unique(parent).tolist():
        rows = parent == j
        child[rows] = 2 * j + routers[j](pooled[rows]).argmax(1)
    return child


def split_features(model: nn.Module, split_points: Sequence[str], data, cfg, device) -> List[torch.Tensor]:
    """Pass 1: pooled features at every split point, (N, C_l) float32 on the CPU."""
    store: Dict[str, List[torch.Tensor]] = {s: [] for s in split_points}
    handles = []
    for s in split_points:
        def hook(_m, _i, out, s=s):
            f = pool_features(out).detach().float()
            _finite(f, f"split point {s!r}")
            store[s].append(f.cpu())
        handles.append(model.get_submodule(s).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b, x in enumerate(progress(iter_inputs(data, cfg.calib_batch_size), cfg.progress,
                                            "sigmab calibrate 1/2 (features)")):
                check_batch(x, device, f"batch {b}")
                model(x)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(store[s]) if store[s] else torch.zeros(0) for s in split_points]


def channel_stats(model: nn.Module, split_points: Sequence[str], levels: Sequence[Sequence[str]],
                  routers: List[List[CosineRouter]], data, cfg, device):
    """Pass 2: per level, {layer name: (2**level, C_in) sums of per-sample mean |input|} and sample counts."""
    depth = len(split_points)
    node = {}  # level -> node id of each row of the current batch
    sums: List[Dict[str, torch.Tensor]] = [dict() for _ in range(depth + 1)]
    counts = [torch.zeros(2 ** l, dtype=torch.float64) for l in range(depth + 1)]
    handles = []

    for l, s in enumerate(split_points):
        def route_hook(_m, _i, out, l=l):
            child = node[l + 1] = route_children(routers[l], node[l], out)
            counts[l + 1].index_add_(0, child.cpu(), torch.ones(child.shape[0], dtype=torch.float64))
        handles.append(model.get_submodule(s).register_forward_hook(route_hook))

    for l, units in enumerate(levels, start=1):
        for u in units:
            for name, m in model.get_submodule(u).named_modules():
                if isinstance(m, PARAM_LAYERS):
                    full = f"{u}.{name}" if name else u
                    def stat_hook(mod, inp, l=l, full=full):
                        x = inp[0].detach()
                        if isinstance(mod, nn.Linear):
                            s = x.abs().reshape(x.shape[0], -1, x.shape[-1]).mean(1)
                        else:
                            s = x.abs().flatten(2).mean(2)
                        _finite(s, f"the input of {full!r}")
                        acc = sums[l].setdefault(full, torch.zeros(2 ** l, s.shape[1], dtype=torch.float64))
                        acc.index_add_(0, node[l].cpu(), s.double().cpu())
                    handles.append(m.register_forward_pre_hook(stat_hook))
    try:
        with torch.no_grad():
            for b, x in enumerate(progress(iter_inputs(data, cfg.calib_batch_size), cfg.progress,
                                            "sigmab calibrate 2/2 (activations)")):
                node.clear()
                node[0] = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                model(x)
    finally:
        for h in handles:
            h.remove()
    return sums, counts
