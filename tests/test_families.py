"""Exactness of SigmaB on every covered family: keep 1.0 is the dense model, a pruned path is the
dense model with the same channels masked, hard == soft at one-hot routers, counts and save/load."""
from __future__ import annotations

import copy

import pytest
import torch

import sigmab_plugin as sb
from conftest import FAMILIES, images, make_model, masked_dense, modules_run, modules_run_params

CALIB = images(64, seed=1)
X = images(32, seed=2)
# residual pruning through a channel LayerNorm (ConvNeXt) renormalises over the kept channels,
# so it is not a masking of the dense model; option-A zero-pad shortcuts are not prunable streams
RESIDUAL_MASKABLE = [f for f in FAMILIES if f != "convnext"]


def _branched(family, **kw):
    dense = make_model(family)
    tree = sb.branch(copy.deepcopy(dense), calib_data=CALIB, progress=False, **kw)
    return dense, tree


def _close(a, b, tol=1e-5):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_one_reproduces_dense(family):
    dense, tree = _branched(family, depth=2, keep_ratio=1.0)
    ref = dense(X)
    with torch.no_grad():
        _close(tree(X), ref)  # eval mode: hard routing
        sb.set_routing(tree, "soft")
        _close(tree(X), ref)  # mixture of identical paths


@pytest.mark.parametrize("family,residual", [(f, False) for f in FAMILIES] + [(f, True) for f in RESIDUAL_MASKABLE])
def test_pruned_path_equals_masked_dense(family, residual):
    dense, tree = _branched(family, depth=2, keep_ratio=0.5, prune_residual=residual)
    rep = sb.param_report(tree)
    assert rep["active_fraction_max"] < 0.9, "keep 0.5 should prune something"
    leaves = sb.route(tree, X)
    with torch.no_grad():
        out = tree(X)
        for leaf in leaves.unique().tolist():
            rows = leaves == leaf
            _close(out[rows], masked_dense(dense, tree, leaf)(X)[rows], tol=1e-4)
        assert float((out - dense(X)).abs().max()) > 1e-4  # pruning did change the function


@pytest.mark.parametrize("family", ["resnet", "efficientnet", "cifar_resnet_b"])
def test_hard_equals_soft_at_one_hot(family):
    _, tree = _branched(family, depth=2, keep_ratio=0.5)
    with torch.no_grad():
        hard = tree(X)
        sb.set_routing(tree, "soft", temperature=1e-7)
        soft = tree(X)
    _close(soft, hard, tol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_param_report_matches_independent_count(family):
    """Counts by forward hooks: per leaf, the parameters of the modules that ran; stored, the union over
    every leaf's run (each module counted once)."""
    _, tree = _branched(family, depth=2, keep_ratio=0.5, prune_residual=family != "convnext")
    rep = sb.param_report(tree)
    assert rep["dense_params"] == sum(p.numel() for p in make_model(family).parameters())
    union = set()
    for leaf in range(4):
        ran = modules_run(tree, lambda: sb.forward_leaf(tree, X[:1], leaf))
        # routers on the path run too: forward_leaf bypasses them, so they are counted apart
        routers = [r.routers[(leaf >> (2 - r.level)) >> 1] for r in tree.modules()
                   if isinstance(r, sb.routing.RoutedModule) and r.routers is not None]
        owned = ran | {m for r in routers for m in r.modules()}
        union |= owned
        assert sum(p.numel() for m in owned for p in m.parameters(recurse=False)) == rep["active_params"][leaf]
    assert sum(p.numel() for m in union for p in m.parameters(recurse=False)) == rep["total_params"]
    assert rep["active_params_max"] == max(rep["active_params"])
    assert rep["active_fraction_max"] == pytest.approx(rep["active_params_max"] / rep["dense_params"])
    assert rep["bytes_per_inference_max"] >= 4 * rep["active_params_max"]
    leaves = sb.route(tree, X)  # routed inputs read exactly their leaf's parameters
    i = int(leaves[0])
    assert modules_run_params(tree, X[:1]) == rep["active_params"][i]


@pytest.mark.parametrize("family", ["resnet", "regnet", "mobilenetv3", "cifar_resnet_a"])
def test_save_load_identical(family, tmp_path):
    _, tree = _branched(family, depth=2, keep_ratio=0.5)
    assert type(tree) is type(make_model(family))
    sb.save_branched(tree, tmp_path / "tree")
    loaded = sb.load_branched(make_model(family), tmp_path / "tree")
    with torch.no_grad():
        assert torch.equal(loaded(X), tree(X))
        sb.set_routing(tree, "soft")
        sb.set_routing(loaded, "soft")
        assert torch.equal(loaded(X), tree(X))
    assert sb.param_report(loaded) == sb.param_report(tree)
    assert not any(p.suffix == ".pt" for p in (tmp_path / "tree").iterdir())


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_soft_routing_is_differentiable(family):
    _, tree = _branched(family, depth=2, keep_ratio=0.5)
    tree.train()  # auto mode: soft while training
    out = tree(X[:8])
    out.square().mean().backward()
    routed = [m for m in tree.modules() if isinstance(m, sb.routing.RoutedModule)]
    routers = [r for m in routed if m.routers is not None for r in m.routers]
    assert all(r.centroids.grad is not None and r.centroids.grad.abs().sum() > 0 for r in routers)
    assert all(p.grad is not None for m in routed for p in m.variants.parameters() if p.requires_grad)


@pytest.mark.parametrize("score", ["activation", "activation_weight"])  # the second reads grouped column norms
@pytest.mark.parametrize("family", ["resnext", "regnet"])
def test_grouped_conv_keep_sets_are_aligned(family, score):
    """Keep-sets of groups with grouped convolutions keep the same local positions in every group."""
    _, tree = _branched(family, depth=2, keep_ratio=0.5, channel_score=score)
    dense = make_model(family)
    checked = 0
    for node, plan in tree._sigmab_tree.spec["plan"].items():
        for key, kept in plan.items():
            grouped = [m for m in dense.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels
                       and m.in_channels == dense.get_submodule(key).out_channels]
            if not grouped:
                continue
            g, n = grouped[0].groups, dense.get_submodule(key).out_channels
            m = n // g
            local = [sorted(c % m for c in kept if c // m == i) for i in range(g)]
            if all(loc == local[0] for loc in local) and len(kept) == g * len(local[0]):
                checked += 1
            else:
                pytest.fail(f"{node} {key}: keep-set not aligned to {g} groups")
    assert checked > 0
