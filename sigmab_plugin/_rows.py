"""Row bookkeeping of a routed forward: what flows between routed units is a tensor or a tuple whose
first element holds the features (PointNet++), and every element shares the batch dim 0. Hard routing
groups rows by node and puts them back in input order; soft routing keeps one row per (path, sample)."""
from __future__ import annotations

from typing import Optional

import torch


def feats(x):
    """The feature tensor of what flows between units: the tensor itself, or a tuple's first element
    (e.g. PointNet++ ``(features, xyz, neighbour indices...)``; every element shares the batch dim 0)."""
    return x[0] if isinstance(x, tuple) else x


def rows(x, idx):
    """Rows ``idx`` (a tensor of indices or a slice) of a tensor or of every element of a tuple."""
    if isinstance(x, tuple):
        return tuple(rows(t, idx) for t in x)
    if idx is None:
        return x
    return x[idx] if isinstance(idx, slice) else x.index_select(0, idx)


def cat_rows(parts: list):
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def put_rows(y, order: torch.Tensor):
    """Rows of ``y`` placed at positions ``order`` (undoes grouping by node)."""
    if isinstance(y, tuple):
        return tuple(put_rows(t, order) for t in y)
    return torch.empty_like(y).index_copy(0, order, y)


def hard_groups(node: torch.Tensor, n_nodes: int):
    """[(node, row index tensor)] for each node present; a single node gets ``None`` (all rows)."""
    if node.numel() == 0:
        return []
    if node.device.type == "meta":  # shapes only: every row through node 0
        return [(0, None)]
    present = torch.unique(node).tolist()
    if len(present) == 1:
        return [(present[0], None)]
    order = torch.argsort(node, stable=True)
    counts = torch.bincount(node, minlength=n_nodes).tolist()
    out, start = [], 0
    for n, c in enumerate(counts):
        if c:
            out.append((n, order[start:start + c]))
            start += c
    return out


def soft_groups(node: torch.Tensor, n_nodes: int):
    """(node id, row slice) for each node present, in node order; rows are already grouped by node."""
    counts = torch.bincount(node, minlength=n_nodes).tolist()
    out, start = [], 0
    for n, c in enumerate(counts):
        if c:
            out.append((n, slice(start, start + c)))
            start += c
    return out


def max_per_sample(weight: torch.Tensor, sample: torch.Tensor, batch: int) -> torch.Tensor:
    return weight.detach().new_zeros(batch).scatter_reduce(0, sample, weight.detach(), "amax", include_self=False)


def top_k_rows(weight: torch.Tensor, sample: torch.Tensor, batch: int, k: Optional[int]) -> Optional[torch.Tensor]:
    """Indices of the ``k`` most probable rows of every sample (None: keep all)."""
    if k is None or weight.numel() <= k * batch:
        return None
    by_weight = torch.argsort(weight, descending=True, stable=True)
    by_sample = by_weight[torch.argsort(sample[by_weight], stable=True)]
    counts = torch.bincount(sample, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(by_sample), device=weight.device) - starts[sample[by_sample]]
    return by_sample[rank < k]
