"""Spherical k-means in torch (Dhillon & Modha 2001): the clustering behind SigmaB's router init.

Points and centroids live on the unit sphere; similarity is the cosine. Seeding is k-means++ on the
cosine distance ``1 - cos``; several seeded restarts keep the best objective; an emptied cluster is
re-seeded with the point farthest from its centroid; an optional minimum share moves the points with
the smallest margin into a starving cluster so no child of the tree is left without samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d), unit rows
    labels: torch.Tensor  # (n,), int64
    objective: float  # mean cosine of each point to its centroid


def _plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    dist = (1.0 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        if float(dist.sum()) <= 0:  # every point coincides with a centroid: pick uniformly
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(dist, 1, generator=gen))
        centroids.append(x[idx])
        dist = torch.minimum(dist, (1.0 - x @ x[idx]).clamp_min(0))
    return torch.stack(centroids)


def _update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)
    new = F.normalize(sums, dim=1)
    for j in torch.nonzero(counts == 0).flatten().tolist():  # re-seed an empty cluster
        cos_own = (x * centroids[labels]).sum(1)
        new[j] = x[int(torch.argmin(cos_own))]
    return new


def _enforce_min_share(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, min_count: int) -> torch.Tensor:
    labels = labels.clone()
    k = centroids.shape[0]
    sims = x @ centroids.T
    for _ in range(k):
        counts = torch.bincount(labels, minlength=k)
        small = int(torch.argmin(counts))
        if int(counts[small]) >= min_count:
            break
        others = torch.nonzero(labels != small).flatten()
        margin = sims[others, labels[others]] - sims[others, small]  # cheapest moves first
        for i in torch.argsort(margin, stable=True).tolist():
            src = int(labels[others[i]])
            if int(counts[src]) <= min_count:
                continue
            labels[others[i]] = small
            counts[src] -= 1
            counts[small] += 1
            if int(counts[small]) >= min_count:
                break
    return labels


def spherical_kmeans(x: torch.Tensor, k: int = 2, *, restarts: int = 4, iters: int = 50, seed: int = 0,
                     min_share: float = 0.0) -> KMeansResult:
    """Cluster the rows of ``x`` by cosine similarity; deterministic for a given ``seed``.

    ``min_share`` (< 1/k) guarantees every cluster at least ``ceil(min_share * n)`` points (and one).
    """
    if x.ndim != 2:
        raise ValueError(f"spherical_kmeans needs a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        raise ValueError(f"spherical_kmeans needs at least k={k} points, got {n}")
    if not torch.isfinite(x).all():
        raise ValueError("spherical_kmeans got non-finite features; check the model and its inputs")
    x = F.normalize(x.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    # canonical order (a seeded random projection) so the result does not depend on the row order
    order = torch.argsort(x @ torch.randn(x.shape[1], generator=gen, dtype=torch.float64), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    x = x[order]
    best = None
    for _ in range(restarts):
        centroids = _plusplus(x, k, gen)
        labels = torch.argmax(x @ centroids.T, dim=1)
        for _ in range(iters):
            centroids = _update(x, labels, centroids)
            new_labels = torch.argmax(x @ centroids.T, dim=1)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
        objective = float((x * centroids[labels]).sum(1).mean())
        if best is None or objective > best.objective + 1e-12:
            best = KMeansResult(centroids, labels, objective)
    min_count = max(1, int(-(-min_share * n // 1))) if min_share > 0 else 1
    labels = _enforce_min_share(x, best.labels, best.centroids, min(min_count, n // k))
    if not torch.equal(labels, best.labels):
        centroids = _update(x, labels, best.centroids)
        best = KMeansResult(centroids, labels, float((x * centroids[labels]).sum(1).mean()))
    return KMeansResult(best.centroids.float(), best.labels[inverse], best.objective)
