"""SigmaB from Torch-Pruning and NNI: the pruner and the compressor build the same tree as branch()
with the same settings, ignored/excluded layers stay whole in every node, interactive steps yield
each node's groups, and the exposed Importance changes what a static Torch-Pruning pruner keeps."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

import sigmab_plugin as sb
from sigmab_plugin.nni import SigmaBPruner as NNISigmaB
from sigmab_plugin.torch_pruning import ActivationImportance, SigmaBPruner
from conftest import images, make_model

CALIB = images(64, seed=1)
X = images(8, seed=2)


def _same_tree(a: nn.Module, b: nn.Module) -> None:
    assert sb.tree_state(a).spec["plan"] == sb.tree_state(b).spec["plan"]
    with torch.no_grad():
        assert torch.equal(a(X), b(X))


@pytest.mark.parametrize("ratio", [None, 0.3])
def test_tp_pruner_equals_branch(ratio):
    kw = {} if ratio is None else {"pruning_ratio": ratio}
    model = make_model("resnet")
    SigmaBPruner(model, X[:2], calib_data=CALIB, progress=False, **kw).step()
    ref = sb.branch(make_model("resnet"), calib_data=CALIB, progress=False,
                    **({} if ratio is None else {"keep_ratio": 1 - ratio}))
    _same_tree(model, ref)


def test_nni_config_list_over_every_layer_equals_branch():
    model = make_model("resnet")
    out = NNISigmaB(model, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.4}], calib_data=CALIB,
                    progress=False).compress()
    assert out is model
    _same_tree(model, sb.branch(make_model("resnet"), calib_data=CALIB, keep_ratio=0.6, progress=False))


def _whole_in_every_node(tree: nn.Module, dense: nn.Module, name: str) -> int:
    unit = next(u for u in sb.tree_state(tree).spec["levels"][-1] if name.startswith(u + "."))
    shape = dense.get_submodule(name).weight.shape
    variants = tree.get_submodule(unit).variants
    for v in variants:
        assert v.module.get_submodule(name[len(unit) + 1:]).weight.shape == shape
    return len(variants)


def test_ignored_and_excluded_layers_stay_whole():
    name = "layer4.0.conv1"
    dense = make_model("resnet")
    model = make_model("resnet")
    SigmaBPruner(model, X[:2], calib_data=CALIB, ignored_layers=[model.get_submodule(name)], progress=False).step()
    assert _whole_in_every_node(model, dense, name) == 4
    other = sb.branch(make_model("resnet"), calib_data=CALIB, progress=False)  # without: it is pruned
    assert other.layer4.variants[0].module[0].conv1.weight.shape != dense.get_submodule(name).weight.shape
    model = make_model("resnet")
    NNISigmaB(model, [{"op_types": ["Conv2d", "Linear"], "exclude_op_names": [name], "sparse_ratio": 0.5}],
              calib_data=CALIB, progress=False).compress()
    assert _whole_in_every_node(model, dense, name) == 4


def test_pruning_ratio_dict_sets_one_layers_ratio():
    model = make_model("resnet")
    conv = model.layer4[0].conv1
    SigmaBPruner(model, X[:2], calib_data=CALIB, pruning_ratio=0.5, pruning_ratio_dict={conv: 0.25},
                 progress=False).step()
    kept = [v.module[0].conv1.out_channels for v in model.layer4.variants]
    assert kept == [384] * 4 and model.layer4.variants[0].module[1].conv1.out_channels == 256  # the others: 0.5


def test_interactive_step_yields_each_nodes_groups():
    model = make_model("resnet")
    seen = {}
    for group in SigmaBPruner(model, X[:2], calib_data=CALIB, progress=False).step(interactive=True):
        seen.setdefault(group.sigmab_node, 0)
        seen[group.sigmab_node] += 1
        group.prune()
    assert set(seen) == {"1/0", "1/1", "2/0", "2/1", "2/2", "2/3"} and min(seen.values()) > 0
    _same_tree(model, sb.branch(make_model("resnet"), calib_data=CALIB, progress=False))
    skipped = make_model("resnet")
    for group in SigmaBPruner(skipped, X[:2], calib_data=CALIB, progress=False).step(interactive=True):
        if group.sigmab_node != "2/1":  # the user keeps node 2/1's own groups whole
            group.prune()
    with torch.no_grad():
        assert skipped(X).shape == (8, 10)
    widths = [v.module[0].conv1.out_channels for v in skipped.layer4.variants]
    assert widths[1] == 512 and widths[0] == widths[2] == widths[3] == 256, widths
    assert "layer4.0.conv1" not in sb.tree_state(skipped).spec["plan"]["2/1"]


def test_activation_importance_changes_what_a_static_pruner_keeps():
    def keep(importance_factory):
        m = make_model("resnet")
        pruner = tp.pruner.BasePruner(m, X[:2], importance=importance_factory(m), pruning_ratio=0.5,
                                      ignored_layers=[m.fc])
        pruner.step()
        return m

    a = keep(lambda m: ActivationImportance(m, CALIB))
    b = keep(lambda m: tp.importance.MagnitudeImportance(p=2))
    assert a.layer3[0].conv1.out_channels == b.layer3[0].conv1.out_channels
    dense = make_model("resnet")
    ref = dense.layer3[0].bn1.weight.detach()

    def kept(m):  # which dense channels survived, found by their (distinct) BatchNorm scales
        return {int((ref - v).abs().argmin()) for v in m.layer3[0].bn1.weight.detach()}
    assert kept(a) != kept(b) and len(kept(a)) == a.layer3[0].conv1.out_channels


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(importance=tp.importance.MagnitudeImportance()), TypeError, "importance=MagnitudeImportance"),
    (dict(forward_fn="model(x)"), TypeError, "forward_fn must be a callable"),
    (dict(pruning_ratio=1.5), ValueError, "pruning_ratio=1.5"),
    (dict(pruning_ratio_dict={nn.Conv2d(3, 3, 1): 0.5}), ValueError, "not a module of the model"),
    (dict(ignored_layers=[nn.Linear(2, 2)]), ValueError, "not a module of the model"),
])
def test_tp_pruner_refuses_bad_input_before_touching_the_model(kwargs, exc, match):
    model = make_model("resnet")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        SigmaBPruner(model, X[:2], calib_data=CALIB, progress=False, **kwargs).step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not sb.is_branched(model)


@pytest.mark.parametrize("config_list,exc,match", [
    ([{"op_types": ["Conv2d"], "sparse_ratio": 1.2}], ValueError, "sparse_ratio"),
    ([{"op_names": ["nothing.here"], "sparse_ratio": 0.5}], ValueError, "does not have"),
    ([{"op_names": ["layer1"], "sparse_ratio": 0.5}], ValueError, "selects no Conv/Linear"),
    ("Conv2d", TypeError, "config_list must be a non-empty list"),
])
def test_nni_compressor_refuses_bad_config(config_list, exc, match):
    model = make_model("resnet")
    with pytest.raises(exc, match=match):
        NNISigmaB(model, config_list, calib_data=CALIB, progress=False).compress()
    assert not sb.is_branched(model)
