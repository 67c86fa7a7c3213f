"""Router fitting of a SigmaB tree: spherical k-means per node and cosine routers from its centroids.

``grow_routers`` clusters each internal node's calibration samples (pooled split-point features,
centred) into two children, level by level, and starts each router as the cosine classifier of the
two centroids, biased so it reproduces the cluster sizes. ``refit_routers`` then refits the routers
below the root on the features the *pruned* nodes really produce (teacher-forced along the dense
clustering's paths); fitted on dense features they collapsed to one leaf.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _calib
from ._forward import run_model
from .config import BranchConfig
from .kmeans import spherical_kmeans
from .router import CosineRouter
from .routing import RoutedModule


def fit_router(feats: torch.Tensor, cfg: BranchConfig, seed: int):
    """Spherical k-means (k=2) on one node's features; returns the router and each sample's child."""
    center = feats.mean(0)
    km = spherical_kmeans(feats - center, 2, restarts=cfg.kmeans_restarts, iters=cfg.kmeans_iters, seed=seed,
                          min_share=cfg.min_cluster_share)
    router = CosineRouter(km.centroids, 1.0, center=center, grid=cfg.router_grid)
    return router, set_threshold(router, feats, int((km.labels == 0).sum()), cfg.router_tau)


@torch.no_grad()
def set_threshold(router: CosineRouter, feats: torch.Tensor, n0: int, tau: Optional[float]) -> torch.Tensor:
    """Bias the router so exactly ``n0`` of ``feats`` go to child 0 (the cluster sizes) and scale it:
    ``tau`` fixed, or (None) such that the median sample sits at logit margin 1 from the boundary."""
    router.bias.zero_()
    router.tau.fill_(1.0)
    logits = router(feats)
    margin = logits[:, 0] - logits[:, 1]
    ranked = margin.sort(descending=True).values
    cut = 0.5 * (ranked[n0 - 1] + ranked[n0]) if 0 < n0 < len(ranked) else ranked.new_zeros(())
    if tau is None:
        spread = float((margin - cut).abs().median())
        tau = 1.0 / spread if spread > 1e-8 else 10.0
    router.tau.fill_(tau)
    router.bias.copy_(torch.stack([-cut * tau / 2, cut * tau / 2]))
    return router(feats).argmax(1)


class _Stop(Exception):
    """Ends a calibration forward once what it was run for has been recorded."""


def _run(model: nn.Module, x: torch.Tensor) -> None:
    try:
        run_model(model, x)
    except _Stop:
        pass


def refit_routers(tree: nn.Module, dense: nn.Module, split_points: List[str], routers: List[List[CosineRouter]],
                  calib_data, cfg: BranchConfig, device, calib: _calib.Pass1) -> None:
    """Refit the routers below the root on the features the pruned nodes really produce.

    Every calibration sample follows its path in the dense clustering: taken from pass 1
    (``calib.paths``) when the batch holds the samples pass 1 saw at that position (checked by their fingerprints, so
    a shuffled loader stays right), else from a dense forward that stops at the last split point.
    The tree runs forced along those paths up to its last router; each router then becomes the
    cosine classifier of its two children's mean pruned features, biased to the cluster sizes.
    """
    depth = len(split_points)
    if depth < 2:
        return
    state = tree._sigmab_tree
    feats = {l: [] for l in range(1, depth)}  # level -> [(pooled features, parent node, target child)]
    path = {}
    handles = []
    for l, s in enumerate(split_points):
        def dense_hook(_m, _i, out, l=l):
            path[l + 1] = _calib.route_children(routers[l], path[l], out)
            if l + 1 == depth:
                raise _Stop  # every path is known: the rest of the dense model is not needed
        handles.append(dense.get_submodule(s).register_forward_hook(dense_hook))
    for m in tree.modules():
        if isinstance(m, RoutedModule) and m.routers is not None and m.level >= 2:
            def tree_hook(mod, inp):
                ctx, l = mod._tree.ctx, mod.level - 1
                feats[l].append((mod.routers[0].pool(inp[0]).float().cpu(), ctx.node.cpu(),
                                 (path[l + 1][ctx.sample] & 1).cpu()))
                if l == depth - 1:
                    raise _Stop  # the last routers' inputs are recorded: the leaves need not run
            handles.append(m.register_forward_pre_hook(tree_hook))
    start = 0
    try:
        state.mode = "hard"
        with torch.no_grad():
            for x in _calib.iter_inputs(calib_data, cfg.calib_batch_size):
                b = x.shape[0]
                path.clear()
                rows = slice(start, start + b)
                if start + b <= len(calib.fingerprints) and torch.equal(_calib.fingerprint(x),
                                                                       calib.fingerprints[rows]):
                    path.update({l: calib.paths[l][rows].to(device) for l in range(1, depth + 1)})
                else:
                    path[0] = torch.zeros(b, dtype=torch.long, device=device)
                    _run(dense, _calib.fast_layout(x))
                state.forced_leaves = path[depth]
                _run(tree, _calib.fast_layout(x))
                state.ctx = None
                start += b
    finally:
        state.forced_leaves = None
        state.mode = "auto"
        state.ctx = None
        for h in handles:
            h.remove()
    _calib.check_second_pass(len(calib.fingerprints), start)
    for l in range(1, depth):
        f = torch.cat([t[0] for t in feats[l]])
        node, target = torch.cat([t[1] for t in feats[l]]), torch.cat([t[2] for t in feats[l]])
        for j, router in enumerate(routers[l]):
            rows = node == j
            fj, tj = f[rows], target[rows]
            if int(tj.sum()) in (0, len(tj)):
                continue  # one child only: keep the dense fit
            center = fj.mean(0)
            unit = F.normalize(fj - center, dim=1)
            with torch.no_grad():
                router.center.copy_(center)
                router.centroids.copy_(torch.stack([F.normalize(unit[tj == c].mean(0), dim=0) for c in (0, 1)]))
            set_threshold(router, fj.to(router.centroids.device), int((tj == 0).sum()), cfg.router_tau)


def grow_routers(features: List[torch.Tensor], cfg: BranchConfig):
    """Routers of every internal node, level by level, each fitted on its own samples. Returns the
    routers, each node's share of the samples, and every sample's node id at each level (0..depth)."""
    n = features[0].shape[0]
    members = {(0, 0): torch.arange(n)}
    routers: List[List[CosineRouter]] = []
    for l in range(cfg.depth):
        row = []
        for j in range(2 ** l):
            idx = members[(l, j)]
            if idx.numel() < 2 * cfg.min_leaf_samples * 2 ** (cfg.depth - l - 1):
                raise ValueError(
                    f"node {l}/{j} receives {idx.numel()} calibration samples, too few to split further; "
                    f"give more calib_data (>= {cfg.min_leaf_samples * 2 ** cfg.depth} samples and balanced) "
                    "or lower depth / min_cluster_share")
            f = features[l][idx]
            spread = float((f - f.mean(0)).norm(dim=1).max())
            if spread <= 1e-6 * max(float(f.norm(dim=1).max()), 1e-12):
                raise ValueError(
                    f"the {idx.numel()} calibration samples of node {l}/{j} give identical features at split point "
                    f"{l + 1} (all-zero or repeated inputs?), so they cannot be split; give varied, real inputs")
            router, child = fit_router(f, cfg, cfg.seed + 1000 * l + j)
            row.append(router)
            for c in (0, 1):
                members[(l + 1, 2 * j + c)] = idx[child == c]
        routers.append(row)
    shares = {f"{l}/{j}": idx.numel() / n for (l, j), idx in members.items()}
    paths = [torch.zeros(n, dtype=torch.long) for _ in range(cfg.depth + 1)]
    for (l, j), idx in members.items():
        paths[l][idx] = j
    return routers, shares, paths
