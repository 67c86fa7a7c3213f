"""sb.reconstruct: least-squares refit of a fresh tree's pruned layers to the dense model, per node."""
import copy

import pytest
import torch

import sigmab_plugin as sb
from sigmab_plugin.reconstruct import kept_channels
from conftest import images, make_model


_BUILT = {}


def _tree(family="cifar_resnet_a", keep=0.5, n=192):
    """(dense, a fresh copy of its depth-2 tree, calibration inputs); trees are built once per module."""
    key = (family, keep, n)
    if key not in _BUILT:
        dense = make_model(family)
        x = images(n, seed=1)
        model = copy.deepcopy(dense)
        sb.branch(model, depth=2, calib_data=x, keep_ratio=keep, prune_residual=True, progress=False)
        _BUILT[key] = dense, model.eval(), x
    dense, model, x = _BUILT[key]
    return dense, copy.deepcopy(model), x


def _leaf_gap(model, dense, x):
    """Mean squared distance of every path's logits to the dense logits, over all leaves."""
    with torch.no_grad():
        ref = dense(x)
        return sum(float(((sb.forward_leaf(model, x, j) - ref) ** 2).mean()) for j in range(4)) / 4


def test_index_maps_are_the_tree_weights():
    # every fitted layer of every node is the dense layer restricted to the kept channels, exactly
    dense, model, _ = _tree()
    spec, checked = sb.tree_state(model).spec, 0
    for unit_name, unit in [(n, m) for n, m in model.named_modules() if isinstance(m, sb.routing.RoutedModule)]:
        for node, variant in enumerate(unit.variants):
            kept = kept_channels(dense, spec, unit.level, node)
            for sub, mod in variant.module.named_modules():
                if not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                    continue
                name = f"{unit_name}.{sub}" if sub else unit_name
                k_out, k_in = kept[name]
                w = dense.get_submodule(name).weight[k_out][:, k_in]
                assert torch.equal(mod.weight, w), name
                checked += 1
    assert checked >= 4 * 7  # every leaf's convs and its classifier


def test_refit_brings_every_path_closer_to_dense():
    dense, model, x = _tree()
    before = _leaf_gap(model, dense, x)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    report = sb.reconstruct(model, dense, x, min_samples=16)
    after = _leaf_gap(model, dense, x)
    assert after < 0.8 * before, (before, after)
    errs = report["relative_error_before"]
    assert len(errs) >= 4 * 7 and set(errs) == set(report["relative_error_after"])
    assert all(report["relative_error_after"][k] <= errs[k] for k in errs)
    assert sum(report["samples"][f"2/{j}"] for j in range(4)) >= len(x)  # routed samples (or all, if few)
    # only values moved: routers, buffers and shapes are as they were
    state = model.state_dict()
    assert all(state[k].shape == v.shape for k, v in snapshot.items())
    assert all(torch.equal(state[k], v) for k, v in snapshot.items() if "router" in k or "idx" in k)
    assert any(not torch.equal(state[k], v) for k, v in snapshot.items() if k.endswith("weight"))


def test_full_keep_ratio_is_left_exact():
    dense, model, x = _tree(keep=1.0)
    report = sb.reconstruct(model, dense, x)
    assert max(report["relative_error_before"].values()) < 1e-10
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-5)


def test_grouped_convolutions_are_skipped_and_the_rest_fit():
    dense, model, x = _tree("mobilenetv3", keep=0.5, n=96)
    before = _leaf_gap(model, dense, x)
    report = sb.reconstruct(model, dense, x, min_samples=8)
    names = report["relative_error_after"]
    assert names and not any("conv_dw" in n for n in names)  # depthwise: not a regression over channels
    assert all(report["relative_error_after"][n] <= report["relative_error_before"][n] for n in names)
    assert _leaf_gap(model, dense, x) < before


def test_reconstructed_tree_saves_and_loads(tmp_path):
    dense, model, x = _tree()
    sb.reconstruct(model, dense, x)
    sb.save_branched(model, tmp_path / "t")
    back = sb.load_branched(make_model("cifar_resnet_a"), tmp_path / "t").eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("kwargs, match", [({"ridge": 0.0}, "ridge=0.0"), ({"max_rows": 0}, "max_rows=0")])
def test_bad_settings_are_refused_and_the_model_untouched(kwargs, match):
    dense, model, x = _tree()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        sb.reconstruct(model, dense, x, **kwargs)
    with pytest.raises(ValueError, match="before branch"):
        sb.reconstruct(model, model, x)
    with pytest.raises(ValueError, match="no samples"):
        sb.reconstruct(model, dense, x[:0])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())


def test_a_dense_model_that_is_not_the_source_is_refused_and_the_model_untouched():
    dense, model, x = _tree()
    other = copy.deepcopy(dense)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)  # the same architecture, other weights: a refit would run and spoil the tree
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"not the model this tree was branched from .*\d+ of \d+ node layers"):
        sb.reconstruct(model, other, x)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        next(m for m in trained.modules() if isinstance(m, torch.nn.Linear)).weight.add_(1e-3)  # trained since
    with pytest.raises(ValueError, match="not the model this tree was branched from"):
        sb.reconstruct(trained, dense, x)
    with pytest.raises(ValueError, match="does not fit the tree's plan"):  # another architecture
        sb.reconstruct(model, make_model("mobilenetv3"), x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())
    # a statically pruned model against another dense model: no layer is a selection of its dense layer
    from sigmab_plugin.baselines._static import tp_prune
    import torch_pruning as tp
    pruned = tp_prune(copy.deepcopy(dense), x[:2], tp.importance.FPGMImportance(p=2), 0.4, "linear")
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    with pytest.raises(ValueError, match="none of the .* layers named as in dense is a channel selection"):
        sb.reconstruct(pruned, other, x)
    assert all(torch.equal(pruned.state_dict()[k], v) for k, v in before.items())


def test_match_channels_finds_the_selection_or_refuses():
    from sigmab_plugin.reconstruct import match_channels

    w = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    out, inp = [1, 4, 7], [0, 2, 3, 5]
    assert match_channels(w[out][:, inp], w) == (out, inp)
    assert match_channels(w, w) == (list(range(8)), list(range(6)))
    assert match_channels(w[out][:, inp] + 1e-3, w) is None  # trained away from the dense weights
    assert match_channels(torch.randn(9, 6, 3, 3), w) is None  # more channels than the dense layer


def test_statically_pruned_model_is_refit_too():
    # an FPGM-pruned model (Torch-Pruning): kept channels found from its weights, every pruned layer refit
    from sigmab_plugin.baselines._static import tp_prune

    import torch_pruning as tp

    dense = make_model("cifar_resnet_a")
    x = images(128, seed=2)
    pruned = tp_prune(copy.deepcopy(dense), x[:2], tp.importance.FPGMImportance(p=2), 0.4, "linear")
    with torch.no_grad():
        gap_before = float(((pruned(x) - dense(x)) ** 2).mean())
    report = sb.reconstruct(pruned, dense, x)
    with torch.no_grad():
        gap_after = float(((pruned(x) - dense(x)) ** 2).mean())
    convs = [n for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(convs) <= set(report["relative_error_after"])  # every conv matched its dense layer
    assert gap_after < 0.8 * gap_before, (gap_before, gap_after)
    assert report["samples"] == {"model": 128}
