"""BranchConfig.router_grid: routers that read a split-point feature map averaged over a grid of cells
(where in the image a feature fires), not only its global average. Checked against an independent pooling,
through calibration (the routers reproduce the clustered shares), exactness (a keep-1.0 tree is the dense
model, a pruned leaf the masked dense model), save/load and deployment, and refused on point sets."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import sigmab_plugin as sb
from sigmab_plugin.router import CosineRouter, pool_features
from conftest import images, make_model, masked_dense

CALIB, X = images(96, seed=1), images(16, seed=2)


def _tree(grid: int, **kw):
    dense = make_model("cifar_resnet_b")
    tree = sb.branch(copy.deepcopy(dense), depth=2, calib_data=CALIB, router_grid=grid, progress=False,
                     **{"keep_ratio": 0.5, **kw})
    return dense, tree


def _routers(tree):
    return [m for m in tree.modules() if isinstance(m, CosineRouter)]


def test_grid_pooling_is_the_mean_of_each_cell():
    x = torch.randn(3, 5, 8, 8)
    cells = x.reshape(3, 5, 2, 4, 2, 4).mean(dim=(3, 5))  # (B, C, 2, 2): quadrant means, channel-major
    assert torch.allclose(pool_features(x, 2), cells.flatten(1), atol=1e-6)
    assert torch.allclose(pool_features(x, 1), x.mean(dim=(2, 3)), atol=1e-6)
    pooled = pool_features(x, 2)
    assert torch.equal(pool_features(pooled, 2), pooled)  # pooled features pass through


def test_grid_routers_read_four_times_the_features_and_keep_the_calibration_shares():
    _, flat = _tree(1)
    _, tree = _tree(2)
    widths = {r.centroids.shape[1] for r in _routers(tree)}
    assert {r.centroids.shape[1] * 4 for r in _routers(flat)} == widths and all(r.grid == 2 for r in _routers(tree))
    counts = torch.bincount(sb.route(tree, CALIB), minlength=4)
    expected = [round(s * len(CALIB)) for s in sb.param_report(tree)["leaf_share_calibration"]]
    assert counts.tolist() == expected and min(expected) > 0
    assert not torch.equal(sb.route(tree, CALIB), sb.route(flat, CALIB))  # the option reached the routing


def test_keep_one_grid_tree_is_the_dense_model_and_a_pruned_leaf_is_masked_dense():
    dense, full = _tree(2, keep_ratio=1.0)
    with torch.no_grad():
        ref = dense.eval()(X)
        assert torch.allclose(full(X), ref, atol=1e-5)
        sb.set_routing(full, "soft")
        assert torch.allclose(full(X), ref, atol=1e-5)
    dense, tree = _tree(2)
    with torch.no_grad():
        for leaf in range(4):
            ref = masked_dense(dense, tree, leaf)(X)
            assert float((sb.forward_leaf(tree, X, leaf) - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_grid_tree_saves_loads_and_deploys_with_identical_outputs(tmp_path):
    _, tree = _tree(2)
    sb.save_branched(tree, tmp_path / "tree")
    again = sb.load_branched(make_model("cifar_resnet_b"), tmp_path / "tree")
    assert all(r.grid == 2 for r in _routers(again))
    with torch.no_grad():
        assert torch.equal(again.eval()(X), tree.eval()(X))
    sb.export_deployment(tree, tmp_path / "deploy")
    deployed = sb.load_deployment(tmp_path / "deploy", make_model("cifar_resnet_b"))
    with torch.no_grad():
        assert torch.equal(deployed.eval()(X), tree(X))


def test_grid_on_point_sets_is_refused_and_the_model_untouched():
    torch.manual_seed(0)
    model = timm.create_model("pointnet2_ssg", num_classes=10, width=0.125).eval()
    before = copy.deepcopy(model.state_dict())
    clouds = torch.randn(32, 3, 128, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"router_grid=2 pools image feature maps .*use router_grid=1"):
        sb.branch(model, depth=2, calib_data=clouds, router_grid=2, progress=False)
    assert not sb.is_branched(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
