"""FPGM through NNI 3.0 (``FPGMPruner`` masks + ``ModelSpeedup``), a cross-check of the Torch-Pruning FPGM.

NNI prunes the listed conv layers' filters; its speedup cannot shrink residual sums whose inputs carry
different masks, so only block-internal convs (the single producer of a coupled group, found with
Torch-Pruning's DependencyGraph) are listed. The sparsity is bisected to the budget by counting the
parameters NNI's masks remove (applied through the DependencyGraph, fast); the final model is then
built by NNI's own ModelSpeedup and its count is checked against that estimate.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Dict, List

import torch
import torch_pruning as tp
from torch import nn

from sigmab_plugin import registered_pruners

from ._static import bisect_budget, count_params
from .registry import Method, RunContext, register_method


def _graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                     customized_pruners=registered_pruners())


def internal_convs(model: nn.Module, example: torch.Tensor, classifier: str) -> List[str]:
    """Convs that alone write a coupled channel group (no residual partner), excluding the classifier."""
    probe = copy.deepcopy(model).eval()
    dg = _graph(probe, example)
    names = {m: n for n, m in probe.named_modules()}
    out = []
    for group in dg.get_all_groups(ignored_layers=[probe.get_submodule(classifier)], root_module_types=[nn.Conv2d]):
        producers = {names[i.dep.target.module] for i in group.items
                     if dg.is_out_channel_pruning_fn(i.dep.handler) and isinstance(i.dep.target.module, nn.Conv2d)
                     and i.dep.target.module.groups == 1}
        if len(producers) == 1:
            out.extend(producers)
    return sorted(out)


def nni_masks(model: nn.Module, layers: List[str], ratio: float) -> Dict[str, torch.Tensor]:
    """Indices of the filters NNI's FPGMPruner removes from each layer at sparsity ``ratio``."""
    from nni.compression.pruning import FPGMPruner

    logging.getLogger("nni").setLevel(logging.ERROR)
    m = copy.deepcopy(model)
    pruner = FPGMPruner(m, [{"op_names": layers, "sparse_ratio": ratio}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return {name: torch.nonzero(masks[name]["weight"].flatten(1).abs().sum(1) == 0).flatten() for name in layers}


def apply_masks(model: nn.Module, example: torch.Tensor, removed: Dict[str, torch.Tensor]) -> nn.Module:
    """Prune the masked filters (and everything coupled) through the DependencyGraph."""
    m = copy.deepcopy(model).eval()
    dg = _graph(m, example)
    for name, idx in removed.items():
        if len(idx):
            dg.get_pruning_group(m.get_submodule(name), tp.prune_conv_out_channels, idx.tolist()).prune()
    return m


def nni_speedup(model: nn.Module, layers: List[str], ratio: float, example: torch.Tensor) -> nn.Module:
    from nni.compression.pruning import FPGMPruner
    from nni.compression.speedup import ModelSpeedup

    m = copy.deepcopy(model).eval()
    pruner = FPGMPruner(m, [{"op_names": layers, "sparse_ratio": ratio}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    with contextlib.redirect_stdout(io.StringIO()):  # NNI prints progress lines of its own
        ModelSpeedup(m, example, masks, graph_module=torch.fx.symbolic_trace(m),
                     logger=logging.getLogger("nni")).speedup_model()
    return m


@register_method("fpgm_nni")
class FPGMNNI(Method):
    static = True

    def prepare(self, run: RunContext):
        if run.static_shape:
            raise ValueError(f"fpgm_nni prunes one ratio everywhere; static_shape={run.static_shape} is for fpgm and "
                             f"hrank: drop it or choose one of those")
        example = run.calib[:2]
        layers = internal_convs(run.dense, example, run.classifier)
        if count_params(run.dense) <= run.budget:
            return copy.deepcopy(run.dense)
        best, estimate = bisect_budget(lambda r: apply_masks(run.dense, example, nni_masks(run.dense, layers, r)),
                                       count_params, run.budget, 0.0, 0.99, 12, shrinks=True, what="fpgm_nni",
                                       fix="(only block-internal convs are pruned) raise the budget or drop fpgm_nni")
        estimate = count_params(estimate)
        model = nni_speedup(run.dense, layers, best, example)
        if count_params(model) != estimate:
            raise RuntimeError(f"NNI ModelSpeedup left {count_params(model):,} params, expected {estimate:,}")
        return model
