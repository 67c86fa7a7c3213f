"""The cosine router of a tree node and the features it reads at a split point."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._rows import feats


def pool_features(x, grid: int = 1) -> torch.Tensor:
    """Per-sample feature vector at a split point: average pool for images, max pool for point sets
    (a tuple between units, as in PointNet++, carries its features first). ``grid`` > 1 averages an
    image feature map over a ``grid x grid`` layout of cells instead of the whole map
    (``C * grid**2`` features, channel-major: where in the image a feature fires, not only how much)."""
    x = feats(x)
    if grid > 1 and x.ndim != 2:
        if x.ndim != 4:
            raise ValueError(f"router_grid={grid} pools image feature maps (B, C, H, W) over a grid; this split point "
                             f"gives shape {tuple(x.shape)}: use router_grid=1")
        return F.adaptive_avg_pool2d(x, grid).flatten(1)
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        return x.amax(dim=2)
    if x.ndim == 2:
        return x
    raise ValueError(f"cannot pool a split-point output of shape {tuple(x.shape)}; expected (B,C[,N|H,W])")


class CosineRouter(nn.Module):
    """Two-way cosine classifier: ``logits = tau * cos(pool(x) - center, c_k) + b_k + balance_k``.

    ``center`` (the node's mean calibration feature) and ``tau`` are buffers set by branch().
    Centring matters: pooled post-ReLU features share one orthant, so uncentred cosines are all
    close to 1 and a router on them is ill-conditioned. ``balance`` is a load-balancing offset that
    is not trained by gradient: like BatchNorm's running statistics it is updated by training-mode
    forwards (see :meth:`update_balance`), pulling each child's share of hard decisions to 1/2.
    ``grid`` is how the router pools a feature map (:func:`pool_features`; ``BranchConfig.router_grid``).
    """

    def __init__(self, centroids: torch.Tensor, tau: float, bias: Optional[torch.Tensor] = None,
                 center: Optional[torch.Tensor] = None, grid: int = 1):
        super().__init__()
        self.grid = int(grid)
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.bias = nn.Parameter(torch.zeros(centroids.shape[0]) if bias is None else bias.detach().clone().float())
        self.register_buffer("tau", torch.tensor(float(tau)))
        dim = centroids.shape[1]
        self.register_buffer("center", torch.zeros(dim) if center is None else center.detach().clone().float())
        self.register_buffer("balance", torch.zeros(centroids.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # float32 whatever the model's dtype (half, bfloat16)
        f = F.normalize(self.pool(x).float() - self.center.float(), dim=1)
        c = F.normalize(self.centroids.float(), dim=1)
        return self.tau.float() * f @ c.T + self.bias.float() + self.balance.float()

    def pool(self, x) -> torch.Tensor:
        """The router's input features of a split-point output (a pooled (B, D) tensor passes through)."""
        return pool_features(x, self.grid)

    def extra_repr(self) -> str:
        return f"dim={self.centroids.shape[1]}, grid={self.grid}"

    @torch.no_grad()
    def update_balance(self, choice: torch.Tensor, rate: float) -> None:
        """Move ``balance`` toward equal shares of the hard ``choice`` (0/1 per row) of one batch."""
        if choice.numel() == 0 or rate <= 0:
            return
        share1 = choice.float().mean()
        step = rate * (share1 - 0.5)  # too many to child 1: favour child 0
        self.balance.add_(torch.stack([step, -step]).to(self.balance.dtype))
