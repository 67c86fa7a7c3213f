"""FPGM (He et al., CVPR 2019) through Torch-Pruning: ``FPGMImportance`` with its ``BasePruner``.

Note: Torch-Pruning's FPGMImportance measures distances between |w|**p vectors and averages in the
consumer layers' input-channel columns; NNI's FPGMPruner (``fpgm_nni``) uses each layer's raw
filters, as the paper does. The two therefore need not pick the same filters (tests/test_baselines.py).
"""
import torch_pruning as tp

from ._static import prune_to_budget
from .registry import Method, RunContext, register_method


@register_method("fpgm")
class FPGM(Method):
    static = True

    def prepare(self, run: RunContext):
        return prune_to_budget(run.dense, run.calib[:2], lambda _m: tp.importance.FPGMImportance(p=2),
                               run.budget, run.classifier, self.name, shape=run.static_shape)
