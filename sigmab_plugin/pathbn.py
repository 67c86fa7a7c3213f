"""BatchNorm of a tree node, with training statistics weighted by each row's path probability (issue 4,
"BatchNorm consistent between soft training and hard inference"). Re-exported by :mod:`sigmab_plugin.routing`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class PathBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm of a tree node whose training statistics can be weighted per row.

    In soft routing every sample reaches every node, with its path probability as weight. Plain
    batch statistics then describe all samples, while in hard inference a node only sees the samples
    routed to it; weighting each row by its (detached) path probability makes the node's batch and
    running statistics those of its own share of the data. Without weights (hard routing, eval, or
    ``bn_weighting`` off) it is exactly the BatchNorm it replaced.
    """

    row_weight: Optional[torch.Tensor] = None

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.row_weight
        if w is None or not self.training or x.shape[0] < 2:
            return super().forward(x)
        w = w.detach().to(x.dtype).clamp_min(0)
        dims = [0] + list(range(2, x.dim()))
        shape = [-1] + [1] * (x.dim() - 1)
        per_row = w.view(shape) / w.sum().clamp_min(1e-12)
        spatial = x[0, 0].numel()
        mean = (x * per_row).sum(dims) / spatial
        var = ((x - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2 * per_row).sum(dims) / spatial
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.num_batches_tracked.add_(1)
                n_eff = float(w.sum() ** 2 / (w * w).sum().clamp_min(1e-12)) * spatial
                unbiased = var * (n_eff / max(n_eff - 1.0, 1.0))
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        view = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
        if self.affine:
            y = y * self.weight.view(view) + self.bias.view(view)
        return y


def to_path_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ``BatchNorm1d/2d`` inside ``module`` into a :class:`PathBatchNorm` (same tensors)."""
    for name, child in list(module.named_children()):
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            child.__class__ = _PATH_BN[type(child)]
        else:
            to_path_batchnorm(child)
    return module


class PathBatchNorm1d(PathBatchNorm, nn.BatchNorm1d):
    pass


class PathBatchNorm2d(PathBatchNorm, nn.BatchNorm2d):
    pass


_PATH_BN = {nn.BatchNorm1d: PathBatchNorm1d, nn.BatchNorm2d: PathBatchNorm2d}
