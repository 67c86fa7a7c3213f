"""SigmaB as an NNI compressor driven by a ``config_list``.

``SigmaBPruner(model, config_list, calib_data=..., depth=2).compress()`` follows NNI 3.0's pruner
conventions: built from the model and a ``config_list`` whose entries select modules with
``op_names`` / ``op_types`` / ``op_names_re`` and exclude them with ``exclude_op_names`` /
``exclude_op_types`` (NNI's own parser, ``select_modules_by_config``), each with a ``sparse_ratio``.
The channel groups a selected conv/linear writes are pruned to ``1 - sparse_ratio`` in every node;
groups written by no selected layer stay whole, and excluded layers stay whole in every node
(nothing that touches them is pruned). ``compress()`` branches the model in place and returns it.

It does not subclass ``nni.compression.base.compressor.Pruner``: that base wraps every selected
module for masking as soon as it is built, while SigmaB replaces whole units once, at ``compress()``
(until then the model is untouched). FPGM through NNI stays in ``sigmab_plugin.baselines.fpgm_nni``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

from torch import nn

from ._trace import PARAM_LAYERS
from .branch import branch
from .config import BranchConfig


def _parse(model: nn.Module, config_list: List[dict]):
    """(keep ratio per selected module, modules kept whole) from an NNI ``config_list``."""
    from nni.compression.base.config import select_modules_by_config, trans_legacy_config_list

    if not isinstance(config_list, list) or not all(isinstance(c, dict) for c in config_list) or not config_list:
        raise TypeError(f"config_list must be a non-empty list of dicts (NNI's format), got {config_list!r}")
    keep: Dict[str, float] = {}
    whole: set = set()
    names = dict(model.named_modules())
    for i, config in enumerate(trans_legacy_config_list([dict(c) for c in config_list])):
        unknown = [n for n in list(config.get("op_names") or []) + list(config.get("exclude_op_names") or [])
                   if n not in names]
        if unknown:
            raise ValueError(f"config_list[{i}] names {unknown}, which {type(model).__name__} does not have: check "
                             "op_names/exclude_op_names (names as in model.named_modules())")
        selected, public, _ = select_modules_by_config(model, config)
        excluded = set(config.get("exclude_op_names", []))
        for type_name in config.get("exclude_op_types", []):
            excluded |= {n for n, m in names.items() if type(m).__name__ == type_name}
        if public.get("exclude"):
            excluded |= set(selected)
            selected = {}
        whole |= {n for n in excluded if isinstance(model.get_submodule(n), PARAM_LAYERS)}
        layers = [n for n, m in selected.items() if isinstance(m, PARAM_LAYERS)]
        if not layers:
            if not excluded:
                raise ValueError(f"config_list[{i}] selects no Conv/Linear layer of {type(model).__name__}: check "
                                 "op_names/op_types (names as in model.named_modules(), types like 'Conv2d')")
            continue
        ratio = public.get("sparse_ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0 <= ratio < 1:
            raise ValueError(f"config_list[{i}] needs a 'sparse_ratio' in [0, 1) (the share each node removes), "
                             f"got {ratio!r}")
        for n in layers:
            keep[n] = 1.0 - float(ratio)
    return {n: r for n, r in keep.items() if n not in whole}, sorted(whole)


class SigmaBPruner:
    """An NNI-style compressor: ``SigmaBPruner(model, config_list, calib_data=...).compress()`` -> tree.

    SigmaB's own options (``depth``, ``split_points``, ``seed``, any ``BranchConfig`` field, or a whole
    ``config``) are keywords, as are ``customized_pruners`` for layers Torch-Pruning does not know.
    """

    def __init__(self, model: nn.Module, config_list: List[dict], *, calib_data, depth: int = 2,
                 config: Optional[BranchConfig] = None, customized_pruners: Optional[dict] = None, **options):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.keep_ratio_dict, self.whole = _parse(model, config_list)
        base = config or BranchConfig()
        self.config = base.replace(depth=depth, keep_ratio=1.0, keep_ratio_dict=self.keep_ratio_dict or None,
                                   ignored_layers=self.whole or None, **options)
        self.model, self.config_list, self.calib_data = model, config_list, calib_data
        self.customized_pruners = customized_pruners

    def compress(self) -> nn.Module:
        """Branch the model in place (validated first, untouched on failure) and return it."""
        return branch(self.model, calib_data=self.calib_data, config=self.config,
                      customized_pruners=self.customized_pruners)
