"""SigmaB where Torch-Pruning users look: a pruner whose ``step()`` branches, and SigmaB's channel score
as a Torch-Pruning ``Importance``.

``SigmaBPruner`` follows ``tp.pruner.BasePruner``'s constructor conventions (model, example_inputs,
importance, pruning_ratio = 1 - keep ratio, pruning_ratio_dict, ignored_layers, round_to,
customized_pruners) and ``step()`` restructures the model in place into a SigmaB tree, exactly as
:func:`sigmab_plugin.branch` with the same settings; ``step(interactive=True)`` yields every node's
pruning groups before they are applied (call ``group.prune()``; a group left unpruned keeps its
channels in that node and below it). ``ActivationImportance`` scores a group by the mean |input| its
consumer layers see on calibration data times the norm of the weights each input feeds (or the mean |input|
alone, ``score="activation"``): SigmaB's per-node allocation score, usable by any static Torch-Pruning pruner.

    pruner = SigmaBPruner(model, example_inputs, calib_data=images, depth=2, pruning_ratio=0.5)
    pruner.step()                           # model is now a tree
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

from . import _calib, _split
from ._forward import run_model, using_forward_fn
from ._modes import kept_train_flags
from ._trace import PARAM_LAYERS
from .branch import _resolve_config, _restore_flags, assemble, plan_tree, prepare
from .config import CHANNEL_SCORES, BranchConfig


class ActivationImportance(tp.importance.Importance):
    """Channel importance = mean |activation| entering the group's consumer layers (conv/linear inputs)
    over ``calib_data`` times the L2 norm of the weights each input feeds (``score="activation"``: without it),
    each layer normalised to mean 1 and summed over the group: the score SigmaB allocates each node's
    channels with (``BranchConfig.channel_score``), computed over all the data (a static pruner has one node)."""

    def __init__(self, model: nn.Module, calib_data, batch_size: int = 64, forward_fn: Optional[Callable] = None,
                 score: str = BranchConfig.channel_score):
        if score not in CHANNEL_SCORES:
            raise ValueError(f"score={score!r} is not one of {CHANNEL_SCORES}: use one of them")
        self.score = score
        _calib.check_calib_data(calib_data)
        sums: Dict[nn.Module, torch.Tensor] = {}
        count = [0]
        handles = []
        for m in model.modules():
            if isinstance(m, PARAM_LAYERS):
                def hook(mod, inp):
                    x = inp[0].detach()
                    s = x.abs().reshape(x.shape[0], -1, x.shape[-1]).mean(1) if isinstance(mod, nn.Linear) \
                        else x.abs().flatten(2).mean(2)
                    sums[mod] = sums.get(mod, 0) + s.double().sum(0).cpu()
                handles.append(m.register_forward_pre_hook(hook))
        try:
            with kept_train_flags(model), torch.no_grad(), using_forward_fn(forward_fn):
                model.eval()
                for x in _calib.iter_inputs(calib_data, batch_size):
                    run_model(model, x)
                    count[0] += x.shape[0]
        finally:
            for h in handles:
                h.remove()
        if count[0] == 0:
            raise ValueError("calib_data is empty: ActivationImportance needs calibration inputs")
        self.stats = {m: v / count[0] for m, v in sums.items()}

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Optional[torch.Tensor]:
        score = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        used = False
        for item in group.items:
            stats = self.stats.get(item.dep.target.module)
            if stats is None or item.dep.pruning_fn not in _IN_CHANNEL or any(r is None for r in item.root_idxs):
                continue
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            if int(idxs.max()) >= stats.numel():
                continue
            if self.score == "activation_weight":
                stats = stats * _split.column_norms(item.dep.target.module)
            s = stats / stats.mean().clamp_min(1e-12)
            score.index_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long), s[idxs])
            used = True
        return score.float() if used else None


_IN_CHANNEL = (tp.pruner.function.prune_conv_in_channels, tp.pruner.function.prune_linear_in_channels)


class SigmaBPruner:
    """A Torch-Pruning-style pruner whose ``step()`` turns ``model`` into a SigmaB tree in place.

    Args follow ``tp.pruner.BasePruner``: ``pruning_ratio`` is the share of each coupled channel group
    a node removes (``branch(keep_ratio=1 - pruning_ratio)``); ``pruning_ratio_dict`` maps a module (or
    a tuple of modules) to its own ratio; ``ignored_layers`` stay whole in every node; ``round_to``
    rounds kept channel counts; ``customized_pruners`` teach the graph new layer types; ``forward_fn(model,
    x) -> logits`` runs models that ``model(x)`` cannot (as in :func:`sigmab_plugin.branch`). SigmaB's own
    arguments (``calib_data``, ``depth``, ``split_points``, ``seed``, any ``BranchConfig`` field) are
    keywords; ``config`` gives a whole ``BranchConfig``.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, importance=None, *, calib_data,
                 depth: int = 2, pruning_ratio: float = 0.5,
                 pruning_ratio_dict: Optional[Dict[object, float]] = None,
                 ignored_layers: Optional[Sequence[nn.Module]] = None, round_to: Optional[int] = None,
                 customized_pruners: Optional[dict] = None, forward_fn=None,
                 config: Optional[BranchConfig] = None, **options):
        if importance is not None and not isinstance(importance, ActivationImportance):
            raise TypeError(f"importance={type(importance).__name__}: SigmaBPruner scores channels per tree node by "
                            "activation on that node's own samples; pass importance=None (or an ActivationImportance)")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be a callable (model, inputs) -> logits, got {type(forward_fn).__name__}")
        if isinstance(pruning_ratio, bool) or not isinstance(pruning_ratio, (int, float)) \
                or not 0 <= pruning_ratio < 1:
            raise ValueError(f"pruning_ratio={pruning_ratio!r} must be a number in [0, 1) (1 - keep ratio)")
        names = {m: n for n, m in model.named_modules()}
        keep_dict = {}
        for key, ratio in (pruning_ratio_dict or {}).items():
            for module in (key if isinstance(key, tuple) else (key,)):
                if module not in names:
                    raise ValueError(f"pruning_ratio_dict has a key {type(module).__name__} that is not a module of "
                                     "the model; use the model's own submodules")
                if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
                    raise ValueError(f"pruning_ratio_dict[{names[module]!r}]={ratio!r} must lie in [0, 1)")
                keep_dict[names[module]] = 1.0 - float(ratio)
        ignored = []
        for module in ignored_layers or []:
            if module not in names:
                raise ValueError(f"ignored_layers holds a {type(module).__name__} that is not a module of the model")
            ignored.append(names[module])
        if importance is not None:  # its score is the one every node ranks its channels by
            # a config's channel_score counts as stated only when it is not the default (a default is no choice)
            from_config = None if config is None or config.channel_score == BranchConfig.channel_score \
                else config.channel_score
            stated = options.get("channel_score", from_config)
            if stated not in (None, importance.score):
                raise ValueError(f"channel_score={stated!r} contradicts importance's score={importance.score!r}: "
                                 "give one of them")
            options["channel_score"] = importance.score
        if round_to is not None:
            options["round_to"] = round_to
        if keep_dict:
            options["keep_ratio_dict"] = keep_dict
        if ignored:
            options["ignored_layers"] = ignored
        self.model = model
        self.pruners = dict(customized_pruners or {})
        self.config = _resolve_config(config, depth=depth, keep_ratio=1.0 - float(pruning_ratio), **options)
        self.calib_data = calib_data
        self.forward_fn = forward_fn
        self.example, self.device = prepare(model, self.config, calib_data, example_inputs)

    def step(self, interactive: bool = False):
        """Branch the model in place (``interactive``: a generator of the groups to prune, node by node)."""
        if interactive:
            return self._interactive()
        self._run(lambda spec, routers: None)
        return None

    def _run(self, build_nodes):
        flags = {name: m.training for name, m in self.model.named_modules()}
        self.model.eval()
        try:
            with using_forward_fn(self.forward_fn):
                spec, routers, calib = plan_tree(self.model, self.config, self.calib_data, self.example, self.device,
                                                 self.pruners)
                nodes = build_nodes(spec, routers)
                assemble(self.model, spec, routers, self.calib_data, self.config, self.example, self.device, nodes,
                         self.pruners, calib=calib)
        finally:
            _restore_flags(self.model, flags)

    def _interactive(self) -> Iterable:
        flags = {name: m.training for name, m in self.model.named_modules()}
        self.model.eval()
        try:
            with using_forward_fn(self.forward_fn):  # never held across a yield: the caller runs in between
                spec, routers, calib = plan_tree(self.model, self.config, self.calib_data, self.example, self.device,
                                                 self.pruners)
            levels = spec["levels"]
            unit_level = {u: l for l, lv in enumerate(levels, start=1) for u in lv}
            nodes = {}
            for l, units in enumerate(levels, start=1):
                for j in range(2 ** l):
                    key = f"{l}/{j}"
                    plan = spec["plan"].setdefault(key, {})
                    with using_forward_fn(self.forward_fn):
                        copy_, dg, infos, frozen = _split.prepare_node(self.model, self.example, unit_level,
                                                                      spec["classifier"], self.pruners)
                    n_of = {i.key: i.n for i in infos}
                    for group_key, group in list(_split.node_groups(copy_, dg, infos, plan)):
                        group.sigmab_node = key
                        yield group
                        if dg.get_out_channels(copy_.get_submodule(group_key)) == n_of[group_key]:
                            _drop(spec["plan"], group_key, l, j, len(levels))  # left unpruned by the user
                    nodes[key] = (_split.finish_node(copy_, frozen, units), infos)
            with using_forward_fn(self.forward_fn):
                assemble(self.model, spec, routers, self.calib_data, self.config, self.example, self.device, nodes,
                         self.pruners, calib=calib)
        finally:
            _restore_flags(self.model, flags)


def _drop(plans: Dict[str, dict], group_key: str, level: int, node: int, depth: int) -> None:
    """Forget a group's keep-set at a node and at every node below it (they inherited it)."""
    for l in range(level, depth + 1):
        span = 2 ** (l - level)
        for j in range(node * span, (node + 1) * span):
            plans.get(f"{l}/{j}", {}).pop(group_key, None)


__all__: List[str] = ["ActivationImportance", "SigmaBPruner"]
