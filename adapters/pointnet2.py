"""PointNet++ classifiers (Qi et al., NeurIPS 2017), single-scale (SSG) and multi-scale (MSG) grouping,
in pure PyTorch (no compiled extensions), shaped for SigmaB and Torch-Pruning.

Input ``(B, 3, N)`` float coordinates (the layout of the common public implementations). Farthest
point sampling starts at point 0 in eval mode (the same cloud always gives the same output) and at a
random point in train mode; ball query takes the first ``nsample`` points inside the radius (padded
with the first one). Shared MLPs are 1x1 convolutions with BatchNorm and ReLU, pooled by max.

Two choices make the model prunable and branchable:
* grouping concatenates the gathered **features before** the relative coordinates, so a pruned
  feature channel's input column in the next MLP is its own index whatever the pruning library
  infers about the coordinates (they carry no autograd history, so a concat offset computed from the
  traced graph can miss them; reported for torch-pruning 1.6.1, not reproduced by our masked check on
  a small network, where the coordinates-first gap was 1e-4 against 1e-8);
  ``load_public_checkpoint`` converts checkpoints of the coordinates-first layout;
* sampling and grouping depend only on the coordinates, so ``grouping(xyz)`` computes every level's
  indices once per forward (before the first set-abstraction level, in the backbone), and each level
  receives ``(features, xyz, its indices..., later levels' indices...)``: a tree's nodes never
  recompute them, and ``GroupingCache`` reuses them for clouds seen before (eval, the teacher).

``timm.create_model("pointnet2_ssg", num_classes=40, width=0.5)`` builds them after
``import sigmab_plugin``; ``feature_info`` names the set-abstraction levels (split points).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

SSG = [(512, [(0.2, 32, [64, 64, 128])]), (128, [(0.4, 64, [128, 128, 256])]), (None, [(None, None, [256, 512, 1024])])]
MSG = [(512, [(0.1, 16, [32, 32, 64]), (0.2, 32, [64, 64, 128]), (0.4, 128, [64, 96, 128])]),
       (128, [(0.2, 32, [64, 64, 128]), (0.4, 64, [128, 128, 256]), (0.8, 128, [128, 128, 256])]),
       (None, [(None, None, [256, 512, 1024])])]


def square_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, S, 3), (B, N, 3) -> (B, S, N) squared distances (by |a|^2 + |b|^2 - 2ab: no (B, S, N, 3) tensor)."""
    return (a.square().sum(-1).unsqueeze(2) + b.square().sum(-1).unsqueeze(1) - 2 * a @ b.transpose(1, 2)).clamp_min(0)


def farthest_point_sample(xyz: torch.Tensor, npoint: int, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, 3) -> (B, npoint) indices of iteratively farthest points, from ``start`` (default point 0)."""
    b, n, _ = xyz.shape
    out = torch.zeros(b, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), device=xyz.device, dtype=xyz.dtype)
    far = torch.zeros(b, dtype=torch.long, device=xyz.device) if start is None else start
    batch = torch.arange(b, device=xyz.device)
    for i in range(npoint):
        out[:, i] = far
        d = (xyz - xyz[batch, far].unsqueeze(1)).square().sum(-1)
        dist = torch.minimum(dist, d)
        far = dist.argmax(-1)
    return out


def ball_query(radius: float, nsample: int, xyz: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, N, 3), (B, S, 3) -> (B, S, nsample): the first ``nsample`` point indices within ``radius`` of
    each center (index order), padded with the first one found."""
    n = xyz.shape[1]
    inside = square_distance(centers, xyz) <= radius * radius
    order = torch.where(inside, torch.arange(n, device=xyz.device), n)
    idx = order.topk(min(nsample, n), dim=-1, largest=False, sorted=True).values
    if nsample > n:
        idx = torch.cat([idx, idx[..., :1].expand(*idx.shape[:-1], nsample - n)], -1)
    return torch.where(idx == n, idx[..., :1], idx)


def gather(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """points (B, C, N), idx (B, ...) -> (B, C, ...)."""
    b, c, _ = points.shape
    flat = idx.reshape(b, 1, -1).expand(b, c, -1)
    return points.gather(2, flat).view(b, c, *idx.shape[1:])


def _mlp(channels: Sequence[int], dim: int = 2) -> nn.Sequential:
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
    layers = []
    for a, b in zip(channels[:-1], channels[1:]):
        layers += [conv(a, b, 1, bias=False), norm(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SetAbstraction(nn.Module):
    """One set-abstraction level: sample ``npoint`` centers, group each scale's neighbours, run its shared
    MLP, max-pool, concatenate the scales; ``npoint=None`` groups all points into one.

    Input ``(features or None, xyz (B,3,N), centers (B,S), neighbours per scale (B,S,K)..., later...)``;
    output ``(features (B,C',S), new xyz (B,3,S), later...)``, or the ``(B, C')`` features at group-all.
    """

    def __init__(self, in_channels: int, npoint: Optional[int], scales: Sequence[tuple]):
        super().__init__()
        self.npoint = npoint
        self.scales = [(r, k) for r, k, _ in scales]
        self.branches = nn.ModuleList(_mlp([in_channels + 3, *mlp]) for _, _, mlp in scales)
        self.out_channels = sum(mlp[-1] for _, _, mlp in scales)

    @property
    def n_indices(self) -> int:
        return 0 if self.npoint is None else 1 + len(self.scales)

    def forward(self, x: tuple):
        feats, xyz, *rest = x
        if self.npoint is None:  # group all: one region, absolute coordinates
            grouped = xyz if feats is None else torch.cat([feats, xyz], 1)
            return self.branches[0](grouped.unsqueeze(2)).amax(-1).flatten(1)
        centers, nbrs, rest = rest[0], rest[1:1 + len(self.scales)], tuple(rest[1 + len(self.scales):])
        new_xyz = gather(xyz, centers)
        outs = []
        for branch, nbr in zip(self.branches, nbrs):
            rel = gather(xyz, nbr) - new_xyz.unsqueeze(-1)
            grouped = rel if feats is None else torch.cat([gather(feats, nbr), rel], 1)  # features first
            outs.append(branch(grouped).amax(-1))
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 1), new_xyz) + rest


class GroupingCache:
    """Sampling and grouping indices of clouds seen before, keyed by the cloud's coordinates (and the
    level settings), least recently used dropped first. Shared by every model (a teacher and its tree
    hit the same entries); only deterministic (eval-mode) groupings are stored."""

    def __init__(self, max_clouds: int = 20000):
        self.max_clouds, self.store = max_clouds, OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        if key in self.store:
            self.store.move_to_end(key)
            self.hits += 1
            return self.store[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        self.store[key] = value
        self.store.move_to_end(key)
        while len(self.store) > self.max_clouds:
            self.store.popitem(last=False)


CACHE = GroupingCache()


class PointNet2(nn.Module):
    """PointNet++ classifier: three set-abstraction levels and a 3-layer head (BatchNorm, dropout)."""

    def __init__(self, num_classes: int = 40, variant: str = "ssg", width: float = 1.0, dropout: float = 0.4,
                 cache: bool = True):
        super().__init__()
        if variant not in ("ssg", "msg"):
            raise ValueError(f"variant={variant!r}: choose 'ssg' (single-scale) or 'msg' (multi-scale grouping)")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
            raise ValueError(f"width={width!r} must be a number in (0, 4] (channel multiplier)")
        self.variant, self.width, self.cache = variant, float(width), cache

        def w(c: int) -> int:
            return max(8, int(round(c * width)))
        levels, in_ch, info = [], 0, []
        for i, (npoint, scales) in enumerate(SSG if variant == "ssg" else MSG):
            scales = [(r, k, [w(c) for c in mlp]) for r, k, mlp in scales]
            level = SetAbstraction(in_ch, npoint, scales)
            levels.append(level)
            in_ch = level.out_channels
            info.append(dict(module=f"sa{i + 1}", num_chs=in_ch, reduction=1))
        self.sa1, self.sa2, self.sa3 = levels
        # sampling settings kept apart from the level modules (a SigmaB tree replaces sa2/sa3 by routed units)
        self.grouping_levels = [(lv.npoint, list(lv.scales)) for lv in levels]
        self.head = nn.Sequential(nn.Linear(in_ch, w(512), bias=False), nn.BatchNorm1d(w(512)), nn.ReLU(True),
                                  nn.Dropout(dropout), nn.Linear(w(512), w(256), bias=False), nn.BatchNorm1d(w(256)),
                                  nn.ReLU(True), nn.Dropout(dropout), nn.Linear(w(256), num_classes))
        self.feature_info = info
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        return self.head[-1]

    def _levels(self) -> List[SetAbstraction]:
        return [self.sa1, self.sa2, self.sa3]

    def _settings(self) -> tuple:
        return tuple((npoint, tuple(scales)) for npoint, scales in self.grouping_levels)

    @torch.no_grad()
    def grouping(self, xyz: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Every level's sampling and neighbour indices for clouds ``(B, 3, N)``: they depend only on the
        coordinates. Eval mode: deterministic, cached per cloud; train mode: a random start point."""
        if xyz.ndim != 3 or xyz.shape[1] != 3:
            raise ValueError(f"PointNet++ takes (B, 3, N) coordinates, got shape {tuple(xyz.shape)}")
        if self.training or not self.cache or xyz.device.type == "meta":
            return self._group(xyz, random_start=self.training)
        keys = [(self._settings(), hashlib.blake2b(c.detach().cpu().contiguous().numpy().tobytes(),
                                                   digest_size=16).digest()) for c in xyz]
        found = [CACHE.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = self._group(xyz[missing], random_start=False)
            for j, i in enumerate(missing):
                found[i] = tuple(t[j].to(torch.int32) for t in fresh)
                CACHE.put(keys[i], found[i])
        return tuple(torch.stack([f[k] for f in found]).to(device=xyz.device, dtype=torch.long)
                     for k in range(len(found[0])))

    def _group(self, xyz: torch.Tensor, random_start: bool) -> Tuple[torch.Tensor, ...]:
        pts = xyz.transpose(1, 2).float()
        out = []
        for npoint, scales in self.grouping_levels:
            if npoint is None:
                break
            n = pts.shape[1]
            start = torch.randint(0, n, (pts.shape[0],), device=pts.device) if random_start else None
            centers = farthest_point_sample(pts, min(npoint, n), start)
            new = pts.gather(1, centers.unsqueeze(-1).expand(-1, -1, 3))
            out += [centers] + [ball_query(r, k, pts, new) for r, k in scales]
            pts = new
        return tuple(out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[1] != 3:
            raise ValueError(f"PointNet++ takes (B, 3, N) float coordinates, got {getattr(x, 'shape', type(x))}")
        out = (None, x) + self.grouping(x)
        for level in self._levels():
            out = level(out)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head[:-1](x) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def load_public_checkpoint(model: PointNet2, path: Union[str, Path]) -> PointNet2:
    """Load a checkpoint of the common public layout, where grouping concatenates the coordinates
    *before* the features: the first 1x1 conv of every scale of every level gets its input columns
    permuted (coordinates moved after the features). Needs matching parameter names and shapes
    (``{'model_state_dict': ...}`` or a plain state dict)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("model_state_dict", raw.get("state_dict", raw)) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(raw).__name__}, not a state dict")
    state = dict(state)
    for name, level in (("sa1", model.sa1), ("sa2", model.sa2), ("sa3", model.sa3)):
        for k in range(len(level.branches)):
            key = f"{name}.branches.{k}.0.weight"
            if key not in state:
                raise ValueError(f"{path} has no {key!r}: it does not follow this model's parameter names")
            w = state[key]
            state[key] = torch.cat([w[:, 3:], w[:, :3]], 1)  # [xyz, feats] columns -> [feats, xyz]
    model.load_state_dict(state)
    return model


def _register_with_timm() -> None:
    from timm.models import register_model

    for variant in ("ssg", "msg"):
        def entry(pretrained: bool = False, num_classes: int = 40, variant=variant, **kwargs):
            if pretrained:
                raise ValueError("no downloadable PointNet++ weights: train one or load a local checkpoint")
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and v is not None}
            return PointNet2(num_classes=num_classes, variant=variant, **kwargs)
        entry.__name__ = entry.__qualname__ = f"pointnet2_{variant}"
        entry.__module__ = __name__
        globals()[entry.__name__] = entry
        register_model(entry)


_register_with_timm()
