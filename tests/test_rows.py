"""A branched model behaves like the model it replaces: every routed unit hands back rows in the
input's order (hard routing), so partial forwards and hooks see each sample's deployed path; soft
routing refuses partial forwards."""
from __future__ import annotations

import copy

import pytest
import torch

import sigmab_plugin as sb
from sigmab_plugin.routing import RoutedModule
from conftest import FAMILIES, images, make_model

CALIB = images(64, seed=1)
X = images(12, seed=2)


def _tree(family):
    return sb.branch(make_model(family), depth=2, keep_ratio=0.5, calib_data=CALIB, progress=False)


def _close(a, b):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= 1e-4 * scale, float((a - b).abs().max())


def _unit_outputs(model, x):
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, RoutedModule):
            handles.append(m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hooks_on_every_routed_unit_see_per_sample_rows(family):
    model = _tree(family)
    leaves = sb.route(model, X)
    assert len(leaves.unique()) > 1, "the batch must reach several leaves for this test to mean anything"
    batch = _unit_outputs(model, X)
    singles = [_unit_outputs(model, X[i:i + 1]) for i in range(len(X))]
    for name, out in batch.items():
        _close(out, torch.cat([s[name] for s in singles]))


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("cifar")])
def test_timm_partial_forwards_equal_per_sample_forwards(family):
    model = _tree(family)
    with torch.no_grad():
        feats = model.forward_features(X)
        _close(model.forward_head(feats), model(X))
        _close(feats, torch.cat([model.forward_features(X[i:i + 1]) for i in range(len(X))]))
        model.forward_features(images(12, seed=9))  # another batch of the same size
        with pytest.raises(RuntimeError, match="routing of its rows is unknown"):
            model.forward_head(feats)  # that batch's routing must not be applied to these rows
        if hasattr(model, "forward_intermediates"):
            try:
                inter = model.forward_intermediates(X, intermediates_only=True)
            except (NotImplementedError, TypeError):
                return
            single = [model.forward_intermediates(X[i:i + 1], intermediates_only=True) for i in range(len(X))]
            for k, t in enumerate(inter):
                _close(t, torch.cat([s[k] for s in single]))


def test_soft_partial_forward_raises_and_full_forward_works():
    model = _tree("resnet").train()  # auto: soft while training
    with pytest.raises(RuntimeError, match="partial forward"):
        model.forward_features(X)
    assert model(X).shape == (12, 10)  # the failed partial forward leaves nothing behind
    sb.set_routing(model, "hard")
    assert model.forward_features(X).shape[0] == 12


def test_deepcopy_after_backward_and_pickled_settings():
    model = _tree("cifar_resnet_b").train()
    sb.set_routing(model, temperature=0.3, top_k=3)
    model(X).sum().backward()
    clone = copy.deepcopy(model)
    assert sb.is_branched(clone) and clone._sigmab_tree is not model._sigmab_tree
    assert clone._sigmab_tree.settings() == model._sigmab_tree.settings()
    units = [m for m in clone.modules() if isinstance(m, RoutedModule)]
    assert all(u._tree is clone._sigmab_tree for u in units)  # one shared state per copy
    clone.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(clone(X), model(X))


def test_empty_batch_gives_an_empty_output():
    model = _tree("resnet")
    with torch.no_grad():
        out = model(X[:0])
    assert out.shape == (0, 10)
    assert sb.route(model, X[:0]).shape == (0,)
