"""Baselines: HRank's importance, the two FPGM variants, the registry and the budget matching."""
from __future__ import annotations


import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from sigmab_plugin.baselines import registry
from sigmab_plugin.baselines.fpgm_nni import internal_convs, nni_masks
from sigmab_plugin.baselines.hrank import HRankImportance, feature_map_ranks
from conftest import images, make_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_hrank_ranks_equal_direct_matrix_rank():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.conv1.weight[:3] = 0  # rank-0 maps (constant = bias) and ...
        model.conv1.weight[3] = model.conv1.weight[3] * 0 + 1e-3  # ... a low-rank one
    x = torch.randn(5, 3, 8, 8)
    ranks = feature_map_ranks(model, x, batch_size=2)
    with torch.no_grad():
        maps = model.conv1(x).numpy()
    direct = np.array([[np.linalg.matrix_rank(maps[i, c]) for c in range(8)] for i in range(5)]).mean(0)
    assert np.allclose(ranks["conv1"].numpy(), direct)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1], verbose=False)
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(8)))
    imp = HRankImportance(ranks, model)(group)
    assert torch.allclose(imp.double(), ranks["conv1"])  # single producer: the group score is its ranks


def _paper_fpgm(w: torch.Tensor) -> torch.Tensor:
    """FPGM as published: sum of Euclidean distances from each raw filter to all others."""
    f = w.flatten(1).double()
    return torch.cdist(f, f).sum(1)


def test_nni_fpgm_follows_the_paper_on_raw_filters():
    model = make_model("cifar_resnet_b")
    layers = internal_convs(model, images(2), "fc")
    assert layers and all(name.endswith("conv1") for name in layers)
    removed = nni_masks(model, layers, 0.5)
    for name in layers:
        w = model.get_submodule(name).weight.detach()
        expected = torch.topk(_paper_fpgm(w), w.shape[0] // 2, largest=False).indices.sort().values
        assert torch.equal(removed[name].sort().values, expected), name


def test_tp_fpgm_uses_powered_weights_and_consumers():
    """Torch-Pruning's FPGMImportance = mean over producer rows and consumer columns of the distance
    sums between |w|**2 vectors (then mean-normalised): not the paper's raw-filter score, so the two
    FPGM baselines may pick different filters (their overlap is in the real-results report)."""
    model = make_model("cifar_resnet_b")
    conv1, conv2 = model.layer2[1].conv1, model.layer2[1].conv2
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=images(1), verbose=False)
    group = dg.get_pruning_group(conv1, tp.prune_conv_out_channels, list(range(conv1.out_channels)))
    got = tp.importance.FPGMImportance(p=2)(group).double()
    rows = conv1.weight.detach().flatten(1).abs().pow(2).double()
    cols = conv2.weight.detach().transpose(0, 1).flatten(1).abs().pow(2).double()
    expected = (torch.cdist(rows, rows).sum(0) + torch.cdist(cols, cols).sum(0)) / 2
    expected = expected / expected.mean()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)  # TP computes in float32
    k = conv1.out_channels // 2
    tp_keep = set(torch.topk(got, k).indices.tolist())
    # TP keeps by its own formula; benchmarks/report_real.py measures its overlap with the paper's picks
    assert tp_keep == set(torch.topk(expected, k).indices.tolist())


def test_registry_refuses_duplicates_and_unknown_names():
    assert {"dense", "sigmab", "fpgm", "hrank", "fpgm_nni"} <= set(registry.available_methods())
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("fpgm")(type("X", (registry.Method,), {}))
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        registry.get_method("magic")


@pytest.mark.parametrize("name,family", [("fpgm", "cifar_resnet_b"), ("hrank", "cifar_resnet_b"),
                                         ("fpgm_nni", "cifar_resnet_b"), ("fpgm", "cifar_resnet_a"),
                                         ("hrank", "cifar_resnet_a")])
def test_static_methods_meet_the_budget(name, family):
    """Option A (zero-pad shortcuts) needs the registered PadShortcut pruner to prune consistently."""
    dense = make_model(family)
    total = sum(p.numel() for p in dense.parameters())
    run = registry.RunContext(dense, images(64), int(0.6 * total), {}, dense.head_name)
    model = registry.get_method(name).prepare(run)
    n = sum(p.numel() for p in model.parameters())
    assert 0.9 * run.budget <= n <= run.budget
    assert model(images(64)).shape == (64, 10)
    assert sum(p.numel() for p in dense.parameters()) == total  # the dense reference is untouched


def test_unreachable_budget_is_an_error():
    run = registry.RunContext(make_model("cifar_resnet_b"), images(16), 100, {}, "fc")
    with pytest.raises(ValueError, match="cannot reach the budget of 100"):
        registry.get_method("fpgm").prepare(run)


def test_sigmab_keep_shape_sets_the_levels_in_proportion_and_meets_the_budget():
    """``keep_shape`` takes effect: each level keeps channels in the given proportion, the common scale is
    searched to the target, and a shape of the wrong length is refused before anything is built."""
    import sigmab_plugin as sb
    dense = make_model("cifar_resnet_b")
    total = sum(p.numel() for p in dense.parameters())
    opts = dict(depth=2, prune_residual=True, coverage=False)

    def prepare(**extra):
        run = registry.RunContext(dense, images(64), int(0.5 * total), {**opts, **extra}, dense.head_name, 0, 0.5)
        return registry.get_method("sigmab").prepare(run)
    flat = sb.tree_state(prepare()).spec["config"]["keep_ratio"]
    tree = prepare(keep_shape=[2.0, 1.0])
    keep = sb.tree_state(tree).spec["config"]["keep_ratio"]
    assert isinstance(flat, float) and isinstance(keep, list)
    assert keep[1] == pytest.approx(keep[0] / 2)  # normalised by the largest entry: [1, 0.5] times the scale
    assert keep[0] > flat > keep[1]
    assert 0.8 * 0.5 * total <= sb.param_report(tree)["active_params_max"] <= 0.5 * total
    with pytest.raises(ValueError, match=r"keep_shape=\[1.0\] needs one positive number per level"):
        prepare(keep_shape=[1.0])


@pytest.mark.parametrize("family", ["cifar_resnet_a", "cifar_resnet_b"])
def test_static_shape_prunes_named_stages_in_proportion_and_leaves_the_rest_whole(family):
    """``static_shape`` takes effect: layers under no named module keep every channel (the tree's backbone),
    the named stages keep channels in the given proportion, and the budget still holds."""
    dense = make_model(family)
    total = sum(p.numel() for p in dense.parameters())
    run = registry.RunContext(dense, images(16), int(0.5 * total), {}, dense.head_name,
                              static_shape={"layer2": 1.0, "layer3": 0.5})
    model = registry.get_method("fpgm").prepare(run)
    width = {n: m.out_channels for n, m in model.named_modules() if n.endswith(".0.conv1")}
    dense_width = {n: m.out_channels for n, m in dense.named_modules() if n.endswith(".0.conv1")}
    assert width["layer1.0.conv1"] == dense_width["layer1.0.conv1"]
    keep2 = width["layer2.0.conv1"] / dense_width["layer2.0.conv1"]
    keep3 = width["layer3.0.conv1"] / dense_width["layer3.0.conv1"]
    assert keep2 < 1 and keep3 == pytest.approx(keep2 / 2, abs=0.05)
    assert 0.8 * run.budget <= sum(p.numel() for p in model.parameters()) <= run.budget
    with pytest.raises(ValueError, match=r"static_shape=\{'stage9': 1.0\}: every key must name a module"):
        registry.get_method("fpgm").prepare(registry.RunContext(dense, images(16), run.budget, {}, dense.head_name,
                                                                static_shape={"stage9": 1.0}))


@pytest.mark.parametrize("family", ["cifar_resnet_a", "resnet"])
def test_tree_allocation_names_each_level_with_its_keep_ratio_and_a_static_method_follows_it(family):
    """harness --static-shape tree: FPGM keeps what the tree's backbone keeps (everything) and prunes each level
    in the tree's proportion (a CIFAR ResNet and a timm ResNet-18)."""
    import sigmab_plugin as sb
    from sigmab_plugin.baselines.harness import tree_allocation
    dense = make_model(family).eval()
    tree = sb.branch(copy.deepcopy(dense), depth=2, calib_data=images(64), keep_ratio=[0.8, 0.4], coverage=False,
                     prune_residual=True, progress=False)
    spec = sb.tree_state(tree).spec
    alloc = tree_allocation(tree)
    assert alloc == {n: k for names, k in zip(spec["levels"], [0.8, 0.4]) for n in names
                     if n not in spec["classifier"]}
    assert set(alloc.values()) == {0.8, 0.4} and not set(alloc) & set(spec["classifier"])
    total = sum(p.numel() for p in dense.parameters())
    classifier = spec["classifier"][0]
    run = registry.RunContext(dense, images(16), int(0.6 * total), {}, classifier, static_shape=alloc)
    model = registry.get_method("fpgm").prepare(run)
    assert sum(p.numel() for p in model.parameters()) <= run.budget
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    dense_widths = {n: m.out_channels for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)}

    def level(name):
        return next((alloc[k] for k in alloc if name == k or name.startswith(k + ".")), None)
    backbone = [n for n in dense_widths if level(n) is None]
    assert backbone and all(widths[n] == dense_widths[n] for n in backbone)  # the tree's backbone stays whole
    kept = {k: [widths[n] / dense_widths[n] for n in dense_widths if level(n) == k] for k in (0.8, 0.4)}
    assert min(kept[0.8]) < 1 and max(kept[0.4]) < min(kept[0.8])  # the leaves' level prunes more


@pytest.mark.parametrize("option", [{"keep_ratio_dict": {"layer2.0.conv1": 0.25}},
                                    {"ignored_layers": ["layer2.0.conv1"]}])
def test_tree_allocation_refuses_a_tree_with_per_module_exceptions(option):
    import sigmab_plugin as sb
    from sigmab_plugin.baselines.harness import tree_allocation
    tree = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64), progress=False, **option)
    with pytest.raises(ValueError, match=f"built with .*{next(iter(option))}.*cannot pass on"):
        tree_allocation(tree)
