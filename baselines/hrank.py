"""HRank (Lin et al., CVPR 2020) as a Torch-Pruning ``Importance``: the average rank of each filter's
output feature maps over calibration images (higher rank = more information = kept)."""
from __future__ import annotations

from typing import Dict

import torch
import torch_pruning as tp
from torch import nn

from ._static import prune_to_budget
from .registry import Method, RunContext, register_method


@torch.no_grad()
def feature_map_ranks(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """Per conv layer name: the mean over ``images`` of ``matrix_rank`` of each output channel's map.

    The ranks are computed on the CPU whatever the model's device, and the count is the same. On an H200
    the HRank runs of a full-width PointNet++ had not finished preparing after four minutes, where FPGM's
    pruning to the same budget took 6 s; CUDA's SVD of hundreds of thousands of small maps is the likely
    cause (HRank's whole preparation of a quarter-width model takes about 13 s on 2 CPU cores)."""
    sums: Dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(_m, _i, out, name=name):
                r = torch.linalg.matrix_rank(out.float().cpu()).double().sum(0)  # (C,) summed over the batch
                sums[name] = sums.get(name, 0) + r
            handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {k: v / len(images) for k, v in sums.items()}


class HRankImportance(tp.importance.Importance):
    """Group importance = mean over the group's producer convs of their filters' average feature-map rank."""

    def __init__(self, ranks: Dict[str, torch.Tensor], model: nn.Module):
        self.ranks = ranks
        self.names = {m: n for n, m in model.named_modules()}

    @torch.no_grad()
    def __call__(self, group, **kwargs):
        score = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        count = 0
        for item in group.items:
            name = self.names.get(item.dep.layer)
            if name not in self.ranks or item.dep.pruning_fn != tp.pruner.function.prune_conv_out_channels:
                continue
            score.index_add_(0, torch.tensor(item.root_idxs), self.ranks[name].cpu()[item.idxs].double())
            count += 1
        return None if count == 0 else (score / count).float()


@register_method("hrank")
class HRank(Method):
    static = True

    def prepare(self, run: RunContext):
        ranks = feature_map_ranks(run.dense, run.calib)
        return prune_to_budget(run.dense, run.calib[:2], lambda m: HRankImportance(ranks, m), run.budget,
                               run.classifier, self.name, shape=run.static_shape)
