"""Public API behaviour: in-place identity, routing execution, calibration inputs, errors that leave
the model untouched."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sigmab_plugin as sb
from sigmab_plugin.routing import RoutedModule
from conftest import images, make_model, masked_dense

branch_module = importlib.import_module("sigmab_plugin.branch")

CALIB = images(64, seed=1)
X = images(24, seed=2)


def test_branch_is_in_place_and_keeps_type():
    model = make_model("resnet")
    out = sb.branch(model, depth=2, calib_data=CALIB, progress=False)
    assert out is model and type(out).__name__ == "ResNet"
    assert not model.training and model(X).shape == (24, 10)
    assert "node 2/3" in sb.summary(model) and "calibration share" in sb.summary(model)


def test_training_flag_preserved_and_eval_routes_hard():
    model = make_model("resnet").train()
    sb.branch(model, depth=2, calib_data=CALIB, progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        out = model(X)
        leaves = model._sigmab_tree.last_leaves.clone()
        assert len(leaves.unique()) > 1
        for leaf in leaves.unique().tolist():  # each sample gets exactly its own leaf's output
            rows = leaves == leaf
            assert torch.allclose(out[rows], sb.forward_leaf(model, X, leaf)[rows], atol=1e-5)
        sb.set_routing(model, "soft")
        assert not torch.allclose(model(X), out, atol=1e-4)  # the soft mixture is a different function


def test_hard_routing_runs_each_reached_node_once_on_its_sub_batch():
    model = sb.branch(make_model("resnet"), depth=2, calib_data=CALIB, progress=False)
    leaves = sb.route(model, X)
    calls = {}
    level2 = model.layer4
    for j, v in enumerate(level2.variants):
        v.register_forward_hook(lambda _m, inp, _o, j=j: calls.setdefault(j, []).append(inp[0].shape[0]))
    with torch.no_grad():
        model(X)
    expected = {j: [int((leaves == j).sum())] for j in range(4) if (leaves == j).any()}
    assert calls == expected


def test_outputs_come_back_in_input_order():
    model = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=CALIB, progress=False, keep_ratio=0.5)
    with torch.no_grad():
        batch = model(X)
        single = torch.cat([model(X[i:i + 1]) for i in range(len(X))])
    assert torch.allclose(batch, single, atol=1e-5)


@pytest.mark.parametrize("form", ["tensor", "loader", "list_of_tuples", "shuffled_loader"])
def test_calibration_inputs_give_the_same_tree(form):
    ref = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=CALIB, calib_batch_size=16, progress=False)
    data = {"tensor": CALIB,
            "loader": DataLoader(TensorDataset(CALIB, torch.zeros(64)), batch_size=16),
            "list_of_tuples": [(CALIB[i:i + 16], None) for i in range(0, 64, 16)],
            "shuffled_loader": DataLoader(TensorDataset(CALIB), batch_size=16, shuffle=True,
                                          generator=torch.Generator().manual_seed(3))}[form]
    tree = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=data, calib_batch_size=16, progress=False)
    assert tree._sigmab_tree.spec["plan"] == ref._sigmab_tree.spec["plan"]
    assert torch.allclose(tree(X), ref(X), atol=1e-5)


def test_config_and_keyword_overrides():
    cfg = sb.BranchConfig(depth=1, keep_ratio=0.75, progress=False)
    model = sb.branch(make_model("cifar_resnet_b"), calib_data=CALIB, config=cfg)
    assert model._sigmab_tree.depth == 1
    model = sb.branch(make_model("cifar_resnet_b"), calib_data=CALIB, config=cfg, depth=2, keep_ratio=[1.0, 0.5])
    assert model._sigmab_tree.depth == 2
    assert model._sigmab_tree.spec["config"]["keep_ratio"] == [1.0, 0.5]
    assert model._sigmab_tree.spec["plan"]["1/0"] == {}  # keep 1.0 at level 1 prunes nothing


def test_explicit_split_points_inside_a_stage():
    model = sb.branch(make_model("cifar_resnet_b"), depth=3, calib_data=images(96, seed=4), progress=False,
                      split_points=["layer1", "layer2.1", "layer3.0"])
    assert model._sigmab_tree.spec["levels"] == [["layer2.0", "layer2.1"], ["layer2.2", "layer3.0"],
                                                 ["layer3.1", "layer3.2", "pool", "fc"]]
    assert model(X).shape == (24, 10)


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3 * 32 * 32, 10))

    def forward(self, x):
        return x.flatten(1) @ self.w


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


BAD = [
    (dict(depth=0), ValueError, "depth=0"),
    (dict(depth=4), ValueError, "depth=4 needs 4 split points"),
    (dict(keep_ratio=0.0), ValueError, "keep_ratio=0.0"),
    (dict(keep_ratio=1.5), ValueError, "keep_ratio=1.5"),
    (dict(keep_ratio=0.3, coverage=True), ValueError, "coverage=True needs keep_ratio >= 0.5"),
    (dict(split_points=["layer9", "layer2"]), ValueError, "split point 'layer9' not found"),
    (dict(split_points=["layer2", "layer1"]), ValueError, "not in execution order"),
    (dict(calib_data=CALIB[:10]), ValueError, "calib_data has 10 samples"),
    (dict(calib_data=CALIB.to("meta")), ValueError, "is on meta but the model is on cpu"),
    (dict(calib_data=iter([CALIB])), TypeError, "one-shot iterator"),
    (dict(calib_data=CALIB.clone().fill_(float("nan"))), ValueError, "non-finite"),
    (dict(calib_data="images/"), TypeError, "calib_data yielded a str"),
    (dict(unknown_option=1), TypeError, "unknown BranchConfig option"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD)
def test_bad_input_is_named_and_model_untouched(kwargs, exc, message):
    model = make_model("cifar_resnet_b")
    before, ref = _state(model), model(X)
    kwargs = {"depth": 2, "calib_data": CALIB, "progress": False, **kwargs}
    with pytest.raises(exc, match=message.replace("(", r"\(").replace("[", r"\[")):
        sb.branch(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(X), ref) and not hasattr(model, "_sigmab_tree")


def test_non_finite_activations_are_reported():
    model = make_model("cifar_resnet_b")
    with torch.no_grad():
        model.layer2[0].conv1.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite activations"):
        sb.branch(model, depth=2, calib_data=CALIB, progress=False)


def test_model_without_split_points():
    with pytest.raises(ValueError, match="no usable split points"):
        sb.branch(_Flat(), depth=1, calib_data=CALIB, progress=False)


def test_failed_final_check_restores_the_model(monkeypatch):
    model = make_model("resnet")
    before, ref = _state(model), model(X)

    def boom(*_a):
        raise RuntimeError("synthetic failure")
    monkeypatch.setattr(branch_module, "_check_forward", boom)
    with pytest.raises(ValueError, match="left as it was"):
        sb.branch(model, depth=2, calib_data=CALIB, progress=False)
    assert all(not isinstance(m, RoutedModule) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(X), ref)


def test_branching_twice_and_unbranched_calls_are_refused():
    model = sb.branch(make_model("cifar_resnet_b"), depth=1, calib_data=CALIB, progress=False)
    with pytest.raises(ValueError, match="already branched"):
        sb.branch(model, depth=1, calib_data=CALIB, progress=False)
    with pytest.raises(ValueError, match="not branched"):
        sb.param_report(make_model("cifar_resnet_b"))
    with pytest.raises(ValueError, match="routing mode 'argmax'"):
        sb.set_routing(model, "argmax")


def test_load_refuses_other_architecture(tmp_path):
    model = sb.branch(make_model("cifar_resnet_b"), depth=1, calib_data=CALIB, progress=False)
    sb.save_branched(model, tmp_path)
    with pytest.raises(ValueError, match="same architecture"):
        sb.load_branched(make_model("cifar_resnet_a"), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a save_branched"):
        sb.load_branched(make_model("cifar_resnet_b"), tmp_path / "missing")


@pytest.mark.parametrize("depth", [2, 3])
def test_routers_reproduce_calibration_shares_on_pruned_features(depth):
    """Routers below the root are refitted on the pruned nodes' features: the tree routes the
    calibration data to its leaves in the clustered proportions (no starving leaf). Exact at depth 2;
    deeper, a refitted router matches its children's sizes but not every sample, so counts drift a bit."""
    calib = images(128, seed=5)
    model = sb.branch(make_model("cifar_resnet_b"), depth=depth, keep_ratio=0.5, calib_data=calib, progress=False)
    counts = torch.bincount(sb.route(model, calib), minlength=2 ** depth)
    shares = sb.param_report(model)["leaf_share_calibration"]
    expected = [round(s * 128) for s in shares]
    if depth == 2:
        assert counts.tolist() == expected
    else:
        assert all(abs(c - e) <= 8 for c, e in zip(counts.tolist(), expected)), (counts.tolist(), expected)
    assert min(shares) > 0 and int(counts.min()) > 0


@pytest.mark.parametrize("family", ["resnet", "cifar_resnet_a"])
def test_forward_leaf_is_the_dense_model_masked_to_that_path(family):
    dense = make_model(family)
    model = sb.branch(copy.deepcopy(dense), depth=2, keep_ratio=0.5, calib_data=CALIB, progress=False)
    with torch.no_grad():
        for leaf in range(4):
            ref = masked_dense(dense, model, leaf)(X)
            out = sb.forward_leaf(model, X, leaf)
            assert float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    with pytest.raises(ValueError, match="leaf=4 is not a leaf"):
        sb.forward_leaf(model, X, 4)


def test_hard_routed_training_with_a_one_sample_leaf():
    """A leaf that receives one training sample (hard routing) must not break BatchNorm."""
    model = sb.branch(make_model("resnet"), depth=2, calib_data=CALIB, progress=False)
    model.train()
    sb.set_routing(model, "hard")
    state = model._sigmab_tree
    state.forced_leaves = torch.tensor([0, 0, 0, 3])
    try:
        out = model(X[:4])
    finally:
        state.forced_leaves = None
    out.sum().backward()
    assert state.last_leaves.tolist() == [0, 0, 0, 3]
    assert model.fc.variants[3].module.weight.grad is not None


@pytest.mark.parametrize("coverage", [True, False])
def test_coverage_option_decides_whether_siblings_keep_every_channel(coverage):
    model = sb.branch(make_model("resnet"), depth=2, keep_ratio=0.5, coverage=coverage, calib_data=CALIB,
                      progress=False)
    plan = model._sigmab_tree.spec["plan"]
    dense = make_model("resnet")
    uncovered = 0
    for level in (1, 2):
        for parent in range(0, 2 ** level, 2):
            a, b = plan[f"{level}/{parent}"], plan[f"{level}/{parent + 1}"]
            for key in set(a) & set(b):
                n = dense.get_submodule(key).out_channels
                parent_kept = set(plan[f"{level - 1}/{parent // 2}"].get(key, range(n))) if level > 1 else set(range(n))
                uncovered += len(parent_kept - set(a[key]) - set(b[key]))
    assert (uncovered == 0) == coverage, uncovered
