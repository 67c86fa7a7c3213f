"""`BranchConfig`: every option of Sigma-Branch (SigmaB) restructuring in one validated dataclass.

Keyword arguments of :func:`sigmab_plugin.branch` override the fields of a config; the config
round-trips through ``to_dict``/``from_dict`` (and so through JSON) and is stored with a saved tree.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

CONFIG_VERSION = 1
CHANNEL_SCORES = ("activation", "activation_weight")


def _real(name: str, value, shown: str = "") -> float:
    """``value`` as a float if it is a real number (not a bool, tensor or string); else a ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={shown or repr(value)} must be a real number ({type(value).__name__} given), "
                        "e.g. 0.5")
    return float(value)


@dataclass
class BranchConfig:
    """Options of :func:`sigmab_plugin.branch` (Sigma-Branch restructuring of a pretrained CNN)."""

    depth: int = field(default=2, metadata={"help": "tree levels below the backbone (>= 1)"})
    keep_ratio: Union[float, Sequence[float]] = field(
        default=0.5, metadata={"help": "share of each coupled channel group a node keeps; one float or one per level"})
    split_points: Optional[Sequence[str]] = field(
        default=None, metadata={"help": "module paths whose outputs feed the routers; None picks them from feature_info"})
    seed: int = field(default=0, metadata={"help": "seed of the spherical k-means"})
    coverage: bool = field(
        default=False, metadata={"help": "siblings together keep every dense channel (needs keep_ratio >= 0.5); "
                                         "off: each child keeps its own most active channels (measured +1 pp)"})
    channel_score: str = field(
        default="activation_weight", metadata={
            "help": "how a node ranks its channels: 'activation_weight' (mean |input| of the consumers on the node's "
                    "samples times the L2 norm of the weights each input feeds, as Wanda; trees +0.5 pp on a CIFAR "
                    "and +1.1 pp on a ModelNet40 validation split) or 'activation' (the mean |input| alone)"})
    prune_residual: bool = field(
        default=False, metadata={"help": "also prune residual-stream channels (groups with several producers)"})
    round_to: int = field(default=1, metadata={"help": "kept channel counts are multiples of this"})
    ignored_layers: Optional[Sequence[str]] = field(
        default=None, metadata={"help": "module paths kept whole (unpruned) in every node"})
    keep_ratio_dict: Optional[Dict[str, float]] = field(
        default=None, metadata={"help": "module path -> keep ratio of the channel groups that module writes"})
    router_grid: int = field(
        default=1, metadata={"help": "routers read each split-point feature map averaged over a grid x grid layout "
                                     "(1: global average; 2: four quadrants, 4x the features; image maps only)"})
    router_tau: Optional[float] = field(
        default=None, metadata={"help": "scale of the cosine router logits; None: per router, median margin 1"})
    kmeans_restarts: int = field(default=4, metadata={"help": "spherical k-means restarts (best objective kept)"})
    kmeans_iters: int = field(default=50, metadata={"help": "spherical k-means iterations per restart"})
    min_cluster_share: float = field(
        default=0.1, metadata={"help": "smallest share of a parent's calibration samples a child receives"})
    min_leaf_samples: int = field(default=4, metadata={"help": "calibration samples needed per leaf"})
    calib_batch_size: int = field(default=64, metadata={"help": "batch size used when calib_data is one tensor"})
    progress: bool = field(default=True, metadata={"help": "show progress bars during calibration"})
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.keep_ratio, (list, tuple)):
            self.keep_ratio = [_real("keep_ratio", r, f"{self.keep_ratio!r}") for r in self.keep_ratio]
        else:
            self.keep_ratio = _real("keep_ratio", self.keep_ratio)
        if self.split_points is not None:
            if isinstance(self.split_points, str) or not isinstance(self.split_points, (list, tuple)) \
                    or not all(isinstance(s, str) for s in self.split_points):
                raise TypeError(f"split_points must be a list of module paths, got {self.split_points!r}")
            self.split_points = list(self.split_points)
        if self.ignored_layers is not None:
            if isinstance(self.ignored_layers, str) or not isinstance(self.ignored_layers, (list, tuple)) \
                    or not all(isinstance(s, str) for s in self.ignored_layers):
                raise TypeError(f"ignored_layers must be a list of module paths, got {self.ignored_layers!r}")
            self.ignored_layers = list(self.ignored_layers)
        if self.keep_ratio_dict is not None:
            if not isinstance(self.keep_ratio_dict, dict) or not all(isinstance(k, str) for k in self.keep_ratio_dict):
                raise TypeError(f"keep_ratio_dict must map module paths to keep ratios, got {self.keep_ratio_dict!r}")
            self.keep_ratio_dict = {k: _real(f"keep_ratio_dict[{k!r}]", v) for k, v in self.keep_ratio_dict.items()}
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first bad field, its value and the fix."""
        for name in ("depth", "seed", "round_to", "router_grid", "kmeans_restarts", "kmeans_iters", "min_leaf_samples",
                     "calib_batch_size", "version"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}={v!r} must be an integer ({type(v).__name__} given)")
        for name in ("coverage", "prune_residual", "progress"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"{name}={v!r} must be True or False ({type(v).__name__} given)")
        if self.channel_score not in CHANNEL_SCORES:
            raise ValueError(f"channel_score={self.channel_score!r} is not one of {CHANNEL_SCORES}: use one of them")
        if self.router_tau is not None:
            _real("router_tau", self.router_tau)
        _real("min_cluster_share", self.min_cluster_share)
        if self.depth < 1:
            raise ValueError(f"depth={self.depth!r} is invalid: use an integer >= 1")
        ratios = self.keep_ratios() + list((self.keep_ratio_dict or {}).values())
        for r in ratios:
            if not (math.isfinite(r) and 0.0 < r <= 1.0):
                raise ValueError(f"keep_ratio={self.keep_ratio!r} / keep_ratio_dict={self.keep_ratio_dict!r} is "
                                 "invalid: every ratio must lie in (0, 1]")
        if isinstance(self.keep_ratio, list) and len(self.keep_ratio) != self.depth:
            raise ValueError(
                f"keep_ratio has {len(self.keep_ratio)} entries for depth={self.depth}: give one float or "
                f"exactly {self.depth} (one per level)")
        if self.coverage and min(ratios) < 0.5:
            raise ValueError(
                f"coverage=True needs keep_ratio >= 0.5 (two siblings must hold every channel), got "
                f"{self.keep_ratio!r}: raise keep_ratio or set coverage=False")
        if self.split_points is not None and len(self.split_points) != self.depth:
            raise ValueError(
                f"split_points={self.split_points!r} has {len(self.split_points)} entries but depth={self.depth} "
                f"needs exactly {self.depth} (the root router's and one per internal level)")
        checks = [("round_to", self.round_to >= 1), ("router_grid", self.router_grid >= 1),
                  ("router_tau", self.router_tau is None or (math.isfinite(self.router_tau) and self.router_tau > 0)),
                  ("kmeans_restarts", self.kmeans_restarts >= 1), ("kmeans_iters", self.kmeans_iters >= 1),
                  ("min_cluster_share", 0.0 <= self.min_cluster_share < 0.5),
                  ("min_leaf_samples", self.min_leaf_samples >= 1), ("calib_batch_size", self.calib_batch_size >= 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: {_HELP[name]}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not supported (this release reads {CONFIG_VERSION})")

    def keep_ratios(self) -> list:
        """The keep ratio of each level (1..depth)."""
        if isinstance(self.keep_ratio, list):
            return list(self.keep_ratio)
        return [float(self.keep_ratio)] * self.depth

    def replace(self, **overrides: Any) -> "BranchConfig":
        """A validated copy with ``overrides`` applied; unknown names raise ``TypeError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown BranchConfig option(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BranchConfig":
        if not isinstance(data, dict):
            raise TypeError(f"BranchConfig.from_dict needs a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown BranchConfig field(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(BranchConfig)}
