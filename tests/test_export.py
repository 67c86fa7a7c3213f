"""Deploying one path: export_path equals the hard-routed tree on the inputs routed to that leaf (every
family, depth 2 and 3), is plain (no routing, no channel gather/scatter where widths line up) and goes
through torch.export; a deployment folder loads only the files of the nodes its inputs reach."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import sigmab_plugin as sb
import sigmab_plugin.export as export_mod
from sigmab_plugin.export import ChannelGather, ChannelScatter
from sigmab_plugin.routing import NodeVariant, PathBatchNorm, RoutedModule
from conftest import FAMILIES, images, make_model, modules_run

CALIB = images(96, seed=1)
X = images(16, seed=2)


def _tree(family, depth, **kw):
    return sb.branch(make_model(family), depth=depth, keep_ratio=0.5, calib_data=CALIB, progress=False,
                     prune_residual=family != "convnext", **kw)


def _close(a, b):
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max())), float((a - b).abs().max())


CASES = [(f, d) for f in FAMILIES for d in (2, 3)]


@pytest.mark.parametrize("family,depth", CASES)
def test_exported_path_equals_the_tree_on_its_inputs(family, depth):
    tree = _tree(family, depth)
    with torch.no_grad():
        out, leaves = tree(X), sb.route(tree, X)
        assert len(leaves.unique()) > 1
        rep = sb.param_report(tree)
        for leaf in leaves.unique().tolist():
            path = sb.export_path(tree, leaf)
            rows = leaves == leaf
            _close(path(X[rows]), out[rows])
            assert not any(isinstance(m, (RoutedModule, NodeVariant, PathBatchNorm)) for m in path.modules())
            assert not sb.is_branched(path) and not path._forward_pre_hooks
            ran = modules_run(path, lambda: path(X[:1]))
            routers = sum(p.numel() for r in tree.modules() if isinstance(r, RoutedModule) and r.routers is not None
                          for p in r.routers[(leaf >> (depth - r.level)) >> 1].parameters())
            assert sum(p.numel() for m in ran for p in m.parameters(recurse=False)) == rep["active_params"][leaf] - routers


@pytest.mark.parametrize("family", ["resnet", "cifar_resnet_b"])
def test_no_gather_or_scatter_where_channels_line_up(family):
    for residual in (False, True):
        tree = sb.branch(make_model(family), depth=2, keep_ratio=0.5, calib_data=CALIB, progress=False,
                         prune_residual=residual)
        path = sb.export_path(tree, 0)
        assert not any(isinstance(m, (ChannelGather, ChannelScatter)) for m in path.modules())
        widths = [m.out_channels for m in path.modules() if isinstance(m, nn.Conv2d)]
        dense = [m.out_channels for m in make_model(family).modules() if isinstance(m, nn.Conv2d)]
        assert sum(widths) < sum(dense)  # pruned end to end


@pytest.mark.parametrize("family", ["resnet", "efficientnet", "cifar_resnet_a"])
def test_exported_path_through_torch_export(family):
    tree = _tree(family, 2)
    path = sb.export_path(tree, 1)
    program = torch.export.export(path, (X[:1],))  # batch 1: the deployed shape
    with torch.no_grad():
        for i in range(3):
            _close(program.module()(X[i:i + 1]), path(X[i:i + 1]))


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="the ONNX exporter/runtime is not installed")
def test_exported_path_through_onnx(tmp_path):
    import onnxruntime

    path = sb.export_path(_tree("resnet", 2), 0)
    torch.onnx.export(path, (X[:1],), str(tmp_path / "path.onnx"), input_names=["x"], dynamo=False)
    ort = onnxruntime.InferenceSession(str(tmp_path / "path.onnx"))
    with torch.no_grad():
        _close(torch.from_numpy(ort.run(None, {"x": X[:1].numpy()})[0]), path(X[:1]))


def test_deployment_reads_only_the_nodes_its_inputs_reach(tmp_path, monkeypatch):
    tree = _tree("resnet", 2)
    sb.export_deployment(tree, tmp_path / "dep")
    leaves = sb.route(tree, X)
    opened = []
    real = export_mod.load_file
    monkeypatch.setattr(export_mod, "load_file", lambda p, **kw: opened.append(p.rsplit("/", 1)[-1]) or real(p, **kw))
    dep = sb.load_deployment(tmp_path / "dep", make_model("resnet"), max_paths=1)
    assert opened == ["backbone.safetensors"]
    assert all(p.is_meta for r in dep.modules() if isinstance(r, RoutedModule) for p in r.variants.parameters())
    leaf = int(leaves[0])
    rows = leaves == leaf
    with torch.no_grad():
        _close(dep(X[rows]), tree(X[rows]))
    assert opened[1:] == [f"node_1_{leaf >> 1}.safetensors", f"node_2_{leaf}.safetensors"]
    held = [j for j, v in enumerate(dep.layer4.variants) if not next(v.parameters()).is_meta]
    assert held == [leaf]
    with torch.no_grad():
        _close(dep(X), tree(X))  # every leaf: nodes come and go, outputs stay exact
    assert set(opened) <= {"backbone.safetensors"} | {f"node_1_{j}.safetensors" for j in range(2)} | \
        {f"node_2_{j}.safetensors" for j in leaves.unique().tolist()}
