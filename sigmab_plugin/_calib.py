"""Calibration passes of SigmaB, streamed with bounded memory.

Pass 1 records the pooled features at every split point (one row per sample: what the clustering
needs) and, while their total stays under ``PER_SAMPLE_STATS_BYTES``, every conv/linear input's
per-channel mean |activation| per sample, so the per-node channel statistics follow from the
clustering without running the model again. Past that bound (many samples, wide models) pass 2
runs: it accumulates, per tree node, the sum over that node's samples of the same statistics, with
memory nodes x channels whatever the number of samples; each sample's node is decided on the fly
by the routers, so shuffled loaders are fine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ._forward import run_model
from ._progress import progress
from ._trace import PARAM_LAYERS
from .router import CosineRouter, pool_features


class CalibDataError(ValueError):
    """calib_data gave different data on two passes (a one-shot iterable)."""


PER_SAMPLE_STATS_BYTES = 512 * 2 ** 20  # per-sample channel statistics kept from pass 1 (then pass 2 is skipped)

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


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """A 4-D CPU batch in channels-last memory order: the same values, and oneDNN's convolutions run
    faster on it (timm ResNet-50, batch 64 at 112 px, 2 threads: 1.33 -> 0.98 s a forward, measured by
    hand once; branch() as a whole in benchmarks/bench_branch.py); other batches as they are."""
    if x.ndim == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


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


def check_second_pass(first: int, second: int) -> None:
    if first != second:
        raise CalibDataError(
            f"calib_data gave {first} samples on its first pass and {second} on its second: calibration reads it "
            "twice, so it must give the same data each time (a tensor, a list or a DataLoader; an iterable backed "
            "by a generator can be read once only)")


def _finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"non-finite activations at {where}: the model produces inf/NaN on the calibration "
                         "data; check its weights and the input normalisation")


def route_children(routers: List[CosineRouter], parent: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Child node id of every row, given its parent node id and the split-point output ``out``."""
    child = torch.empty_like(parent)
    pooled = routers[0].pool(out)  # every router of a level pools alike
    for j in torch.unique(parent).tolist():
        rows = parent == j
        child[rows] = 2 * j + routers[j](pooled[rows]).argmax(1)
    return child


def _channel_stat(mod: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    """Per-sample, per-channel mean |x| of a conv/linear input: (batch, C_in)."""
    x = x.detach()
    if isinstance(mod, nn.Linear):
        s = x.abs().reshape(x.shape[0], -1, x.shape[-1]).mean(1)
    else:
        s = x.abs().flatten(2).mean(2)
    _finite(s, f"the input of {where!r}")
    return s


def _stat_layers(model: nn.Module, levels: Sequence[Sequence[str]]):
    """(level, full module path, module) of every conv/linear inside the routed units."""
    for l, units in enumerate(levels, start=1):
        for u in units:
            for name, m in model.get_submodule(u).named_modules():
                if isinstance(m, PARAM_LAYERS):
                    yield l, (f"{u}.{name}" if name else u), m


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Per-sample (sum, sum of squares) of a batch: tells whether a later pass sees the same samples."""
    f = x.detach().flatten(1).double()
    return torch.stack([f.sum(1), (f * f).sum(1)], 1).cpu()


@dataclass
class Pass1:
    features: List[torch.Tensor]  # per split point, (N, C_l) pooled features (float32, CPU)
    per_sample: Optional[Dict[tuple, torch.Tensor]]  # {(level, layer): (N, C_in)}, None past the memory bound
    fingerprints: torch.Tensor  # (N, 2), see fingerprint()
    paths: Optional[List[torch.Tensor]] = None  # each sample's node id per level, set once routers are grown


def split_features(model: nn.Module, split_points: Sequence[str], data, cfg, device,
                   levels: Sequence[Sequence[str]] = ()) -> Pass1:
    """Pass 1: pooled features at every split point and the per-sample channel statistics of the
    layers in ``levels`` (dropped once they outgrow ``PER_SAMPLE_STATS_BYTES``: then
    :func:`channel_stats` computes them in a pass 2)."""
    store: Dict[str, List[torch.Tensor]] = {s: [] for s in split_points}
    stats: Optional[Dict[tuple, List[torch.Tensor]]] = {}
    size = 0
    handles = []
    for s in split_points:
        def hook(_m, _i, out, s=s):
            f = pool_features(out, cfg.router_grid).detach().float()
            _finite(f, f"split point {s!r}")
            store[s].append(f.cpu())
        handles.append(model.get_submodule(s).register_forward_hook(hook))

    def stat_hook(mod, inp, key):
        nonlocal stats, size
        if stats is None:
            return
        st = _channel_stat(mod, inp[0], key[1]).float().cpu()
        size += st.numel() * 4
        if size > PER_SAMPLE_STATS_BYTES:
            stats = None  # too many samples x channels to keep: pass 2 accumulates per node instead
            return
        stats.setdefault(key, []).append(st)
    for l, full, m in _stat_layers(model, levels):
        handles.append(m.register_forward_pre_hook(lambda mod, inp, key=(l, full): stat_hook(mod, inp, key)))
    prints = []
    try:
        with torch.no_grad():
            for b, x in enumerate(progress(iter_inputs(data, cfg.calib_batch_size), cfg.progress,
                                            "sigmab calibrate (features, activations)")):
                check_batch(x, device, f"batch {b}")
                prints.append(fingerprint(x))
                run_model(model, fast_layout(x))
    finally:
        for h in handles:
            h.remove()
    return Pass1([torch.cat(store[s]) if store[s] else torch.zeros(0) for s in split_points],
                 {k: torch.cat(v) for k, v in stats.items()} if stats is not None else None,
                 torch.cat(prints) if prints else torch.zeros(0, 2, dtype=torch.float64))


def node_stats(per_sample: Dict[tuple, torch.Tensor], paths: List[torch.Tensor]):
    """:func:`channel_stats`' sums and counts, from pass 1's per-sample statistics and the paths."""
    depth = len(paths) - 1
    sums: List[Dict[str, torch.Tensor]] = [dict() for _ in range(depth + 1)]
    for (l, full), st in per_sample.items():
        sums[l][full] = torch.zeros(2 ** l, st.shape[1], dtype=torch.float64).index_add_(0, paths[l], st.double())
    counts = [torch.bincount(paths[l], minlength=2 ** l).double() for l in range(depth + 1)]
    return sums, counts


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

    for l, full, m in _stat_layers(model, levels):
        def stat_hook(mod, inp, l=l, full=full):
            s = _channel_stat(mod, inp[0], full)
            acc = sums[l].setdefault(full, torch.zeros(2 ** l, s.shape[1], dtype=torch.float64))
            acc.index_add_(0, node[l].cpu(), s.double().cpu())
        handles.append(m.register_forward_pre_hook(stat_hook))
    try:
        with torch.no_grad():
            for b, x in enumerate(progress(iter_inputs(data, cfg.calib_batch_size), cfg.progress,
                                            "sigmab calibrate 2/2 (activations per node)")):
                node.clear()
                node[0] = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                run_model(model, fast_layout(x))
    finally:
        for h in handles:
            h.remove()
    return sums, counts
