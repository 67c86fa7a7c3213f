"""``forward_fn`` (Torch-Pruning's convention): a model that ``model(x)`` cannot run (a required keyword,
a dict output) branches through ``forward_fn(model, x)`` into the same tree as the plain model, from
``branch()``, the Torch-Pruning pruner (also interactive), ``ActivationImportance`` and
``load_branched``; without it the model is refused untouched."""
from __future__ import annotations

import copy

import pytest
import torch

import sigmab_plugin as sb
from sigmab_plugin._forward import current_forward_fn
from sigmab_plugin.torch_pruning import ActivationImportance, SigmaBPruner
from conftest import images, make_model

CALIB = images(64, seed=1)
X = images(8, seed=2)


def dict_model():
    """The test ResNet (same weights as make_model("resnet")) whose forward needs ``scale=`` and returns a dict."""
    model = make_model("resnet")
    base = type(model)

    class DictOut(base):
        def forward(self, x, *, scale):
            return {"logits": base.forward(self, x * scale)}

    model.__class__ = DictOut
    return model


def fwd(model, x):
    return model(x, scale=1.0)["logits"]


def _same(tree_dict, tree_plain):
    assert sb.tree_state(tree_dict).spec["plan"] == sb.tree_state(tree_plain).spec["plan"]
    with torch.no_grad():
        assert torch.equal(fwd(tree_dict, X), tree_plain(X))


def test_branch_with_forward_fn_equals_the_plain_model():
    tree = sb.branch(dict_model(), calib_data=CALIB, forward_fn=fwd, progress=False)
    _same(tree, sb.branch(make_model("resnet"), calib_data=CALIB, progress=False))
    assert current_forward_fn() is None  # nothing outlives the call


def test_without_forward_fn_the_model_is_refused_untouched():
    model = dict_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot run calib_data's first batch"):
        sb.branch(model, calib_data=CALIB, progress=False)
    assert not sb.is_branched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_forward_fn_is_reset_after_a_failure():
    def broken(model, x):
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="boom"):
        sb.branch(dict_model(), calib_data=CALIB, forward_fn=broken, progress=False)
    assert current_forward_fn() is None
    with pytest.raises(TypeError, match="forward_fn must be a callable"):
        sb.branch(dict_model(), calib_data=CALIB, forward_fn="m(x)", progress=False)


@pytest.mark.parametrize("interactive", [False, True])
def test_tp_pruner_forward_fn(interactive):
    model = dict_model()
    pruner = SigmaBPruner(model, X[:2], calib_data=CALIB, forward_fn=fwd, pruning_ratio=0.4, progress=False)
    if interactive:
        for group in pruner.step(interactive=True):
            assert current_forward_fn() is None  # not held while the caller runs
            group.prune()
    else:
        pruner.step()
    _same(model, sb.branch(make_model("resnet"), calib_data=CALIB, keep_ratio=0.6, progress=False))


def test_activation_importance_forward_fn():
    a = ActivationImportance(dict_model(), CALIB, forward_fn=fwd)
    b = ActivationImportance(make_model("resnet"), CALIB)
    assert len(a.stats) == len(b.stats) > 0
    assert all(torch.allclose(x, y) for x, y in zip(a.stats.values(), b.stats.values()))


def test_load_branched_forward_fn(tmp_path):
    tree = sb.branch(dict_model(), calib_data=CALIB, forward_fn=fwd, progress=False)
    sb.save_branched(tree, tmp_path / "t")
    loaded = sb.load_branched(dict_model(), tmp_path / "t", forward_fn=fwd)
    tree.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(fwd(tree, X), fwd(loaded, X))
    sb.export_deployment(tree, tmp_path / "d")
    deployed = sb.load_deployment(tmp_path / "d", dict_model(), max_paths=None, forward_fn=fwd)
    with torch.no_grad():
        assert torch.allclose(fwd(tree, X), fwd(deployed, X), atol=1e-5)
