"""route_on / FinetuneConfig.route_inputs: routers decide on another version of each sample (its unaugmented
input) while the model computes on the one it is called with."""
from __future__ import annotations

import copy

import pytest
import torch

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from sigmab_plugin.finetune import FinetuneConfig
from conftest import images, make_model


@pytest.fixture(scope="module")
def tree():
    return sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64, seed=1), keep_ratio=0.5,
                     progress=False)


def _units(model, level):
    return [m for m in model.modules() if type(m).__name__ == "RoutedModule" and m.level == level]


def test_hard_routing_follows_the_other_input(tree):
    model = copy.deepcopy(tree).eval()
    clean, moved = images(16, seed=2), images(16, seed=3)
    want = sb.route(model, clean)
    assert not torch.equal(want, sb.route(model, moved))  # the two inputs route differently on their own
    with torch.no_grad(), sb.route_on(model, clean):
        out = model(moved)
    assert torch.equal(sb.tree_state(model).last_leaves, want)
    with torch.no_grad():  # each sample computed on `moved` along the leaf its clean version takes
        ref = torch.stack([sb.forward_leaf(model, moved[i:i + 1], int(want[i]))[0] for i in range(16)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sb.tree_state(model).route_source is None and sb.tree_state(model).recording is None


def test_soft_routing_on_the_same_input_is_unchanged_and_routers_train(tree):
    model = copy.deepcopy(tree).eval()
    sb.set_routing(model, "soft", 0.5)
    x = images(8, seed=4)
    with torch.no_grad():
        plain = model(x)
        plain_probs = sb.tree_state(model).last_leaf_probs
        with sb.route_on(model, x):
            routed = model(x)
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sb.tree_state(model).last_leaf_probs, plain_probs)
    model.train()
    with sb.route_on(model, images(8, seed=5)):
        out = model(x)
    sb.tree_loss(model, out, torch.arange(8) % 10)[0].backward()
    routers = [p for n, p in model.named_parameters() if "routers" in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


def test_recording_stops_after_the_last_router_and_restores_flags(tree):
    model = copy.deepcopy(tree).train()
    model.layer1.eval()  # a flag of its own (as freeze_batchnorm sets) survives the recording forward
    calls = []
    hooks = [u.register_forward_pre_hook(lambda m, a: calls.append(m.level)) for u in _units(model, 2)]
    sb.set_routing(model, "hard")
    with torch.no_grad(), sb.route_on(model, images(4, seed=6)):
        assert calls == [2]  # the recording forward reached the last router's unit and stopped there
        model(images(4, seed=7))
    for h in hooks:
        h.remove()
    assert calls.count(2) == 1 + len(_units(model, 2))  # then the block's own forward ran every unit of level 2
    assert model.training and not model.layer1.training


def test_batch_size_mismatch_is_refused(tree):
    model = copy.deepcopy(tree).eval()
    with torch.no_grad(), sb.route_on(model, images(4, seed=1)):
        with pytest.raises(RuntimeError, match="same samples"):
            model(images(6, seed=2))


def test_route_inputs_clean_routes_training_on_unaugmented_batches(tree, monkeypatch):
    seen = []
    real = ft.route_on

    def spy(model, x):
        seen.append(x.clone())
        return real(model, x)
    monkeypatch.setattr(ft, "route_on", spy)
    x = (torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    y = torch.arange(16) % 10
    norm = lambda t: t.float() / 255 - 0.5  # noqa: E731
    cfg = FinetuneConfig(epochs=1, batch_size=8, progress=False, route_inputs="clean")
    ft.finetune(copy.deepcopy(tree), x, y, norm, cfg)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(cfg.seed * 100003))
    assert len(seen) == 2 and torch.equal(seen[0], norm(x[perm[:8]]))  # the unaugmented rows of the first batch
    seen.clear()
    ft.finetune(make_model("cifar_resnet_b"), x, y, norm, cfg)  # no tree: nothing to route
    assert seen == []


def test_bn_recalibration_under_clean_routing_reads_the_unaugmented_batches(tree, monkeypatch):
    seen = []
    real = ft.recalibrate_batchnorm

    def spy(model, batches, max_batches):
        batches = list(batches)
        seen.append(batches)
        return real(model, batches, max_batches)
    monkeypatch.setattr(ft, "recalibrate_batchnorm", spy)
    x = (torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    y = torch.arange(16) % 10
    norm = lambda t: t.float() / 255 - 0.5  # noqa: E731
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0 * 100003 - 1))
    want = [norm(x[perm[:8]]), norm(x[perm[8:]])]  # the recalibration pass's permutation, unaugmented
    for inputs in ("clean", "augmented"):
        cfg = FinetuneConfig(epochs=1, batch_size=8, progress=False, bn_mode="shared", route_inputs=inputs)
        ft.finetune(copy.deepcopy(tree), x, y, norm, cfg)
    clean, augmented = seen
    assert len(clean) == 2 and all(torch.equal(a, b) for a, b in zip(clean, want))
    assert not all(torch.equal(a, b) for a, b in zip(augmented, want))  # the default still reads augmented ones


def test_route_inputs_is_validated(tree):
    with pytest.raises(ValueError, match="route_inputs='sideways'"):
        FinetuneConfig(route_inputs="sideways")
    with pytest.raises(ValueError, match="augment=False"):
        FinetuneConfig(route_inputs="clean", augment=False)
    x, y = images(8, seed=1), torch.arange(8) % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model = copy.deepcopy(tree)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="in-memory"):
        ft.finetune(model, loader, None, None, FinetuneConfig(epochs=1, progress=False, route_inputs="clean"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_route_keeps_every_modules_own_train_flag(tree):
    model = copy.deepcopy(tree).train()
    model.layer1.eval()  # e.g. BatchNorm that freeze_batchnorm fixed: model.train(True) afterwards would undo it
    sb.route(model, images(4, seed=8))
    assert model.training and not model.layer1.training and model.layer2.training
