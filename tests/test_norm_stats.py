"""BatchNorm statistics as deployment sees them: recalibrate_batchnorm (population statistics under hard
routing) and FinetuneConfig.bn_mode ('batch', 'shared', 'frozen')."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from sigmab_plugin.finetune import FinetuneConfig
from sigmab_plugin.norm_stats import batchnorms, freeze_batchnorm, recalibrate_batchnorm, shared_batchnorms
from sigmab_plugin.routing import RoutedModule
from conftest import images, make_model

X = (torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
Y = torch.arange(32) % 10
BASE = dict(epochs=1, batch_size=16, lr=0.05, progress=False, augment=False, flip=False)


def normalize(x):
    return x.float() / 255 - 0.5


@pytest.fixture(scope="module")
def tree():
    return sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64, seed=1), keep_ratio=0.5,
                     progress=False)


def _stats(model):
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules() if m in batchnorms(model)}


def test_recalibration_gives_the_population_statistics():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(4)).eval()
    batches = [images(5, seed=s) for s in (1, 2, 3)]
    assert recalibrate_batchnorm(model, iter(batches)) == 3
    with torch.no_grad():
        outs = [conv(b).transpose(0, 1).reshape(4, -1) for b in batches]
    mean = torch.stack([o.mean(1) for o in outs]).mean(0)
    var = torch.stack([o.var(1, unbiased=True) for o in outs]).mean(0)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert not model.training and bn.momentum == 0.1  # flags and momentum restored
    assert recalibrate_batchnorm(model, iter(batches), max_batches=1) == 1
    torch.testing.assert_close(bn.running_mean, outs[0].mean(1))


def test_recalibrated_tree_computes_in_eval_what_hard_training_computes(tree):
    model = copy.deepcopy(tree).eval()
    rate = sb.tree_state(model).settings()
    x = images(256, seed=7)
    offsets = [r.balance.clone() for r in model.modules() if hasattr(r, "balance")]
    with torch.no_grad():
        before = model(x)
        recalibrate_batchnorm(model, [x])
        after = model(x)
        model.train()
        sb.set_routing(model, "hard")
        trained = model(x)  # batch statistics of x: the population statistics the recalibration stored
        sb.set_routing(model, **rate)
        model.eval()
    assert (after - trained).abs().max() < 0.02 * trained.abs().max()  # biased vs unbiased variance only
    assert (before - trained).abs().max() > 0.1 * trained.abs().max()  # the old statistics were others
    assert sb.tree_state(model).settings() == rate and not model.training
    assert all(torch.equal(a, r.balance) for a, r in zip(offsets, [r for r in model.modules() if hasattr(r, "balance")]))


def test_a_node_no_sample_reaches_keeps_its_statistics(tree):
    model = copy.deepcopy(tree)
    root = next(m for m in model.modules() if isinstance(m, RoutedModule) and m.routers is not None)
    root.routers[0].balance.copy_(torch.tensor([1e6, -1e6]))  # every sample goes left at the root
    before = _stats(model)
    recalibrate_batchnorm(model, [images(64, seed=2)])
    after = _stats(model)
    right = {n for n in after if ".variants.1." in n and n.startswith(_level_prefix(model, 1))}
    right |= {n for n in after if any(f".variants.{k}." in n for k in (2, 3)) and n.startswith(_level_prefix(model, 2))}
    assert right, "the test needs nodes on the right of the root"
    for n in right:
        assert torch.equal(after[n][0], before[n][0]) and torch.equal(after[n][1], before[n][1]), n
    changed = [n for n in after if not torch.equal(after[n][0], before[n][0])]
    assert changed and not set(changed) & right


def _level_prefix(model, level):
    return next(n for n, m in model.named_modules() if isinstance(m, RoutedModule) and m.level == level)


def test_shared_batchnorms_are_the_ones_outside_the_nodes(tree):
    shared = shared_batchnorms(tree)
    in_nodes = [m for r in tree.modules() if isinstance(r, RoutedModule) for m in r.modules() if m in batchnorms(tree)]
    assert shared and in_nodes and not set(map(id, shared)) & set(map(id, in_nodes))
    assert len(shared) + len(in_nodes) == len(batchnorms(tree))
    assert shared_batchnorms(make_model("cifar_resnet_b")) == []  # no tree, nothing shared
    model = copy.deepcopy(tree).train()
    frozen = freeze_batchnorm(model, "shared")
    assert all(not m.training for m in frozen) and all(m.training for m in batchnorms(model) if m not in frozen)
    with pytest.raises(ValueError, match="which='some'"):
        freeze_batchnorm(model, "some")


def _finetune(model, **kw):
    ft.finetune(model, X, Y, normalize, FinetuneConfig(**{**BASE, **kw}))
    return model


@pytest.mark.parametrize("mode", ["shared", "frozen"])
def test_bn_mode_keeps_the_statistics_it_freezes(tree, mode):
    start = _stats(tree)
    model = _finetune(copy.deepcopy(tree), bn_mode=mode, bn_recalibration_batches=0)
    end = _stats(model)
    fixed = {n for n, m in model.named_modules() if m in (shared_batchnorms(model) if mode == "shared"
                                                          else batchnorms(model))}
    for n in end:
        same = torch.equal(end[n][0], start[n][0]) and torch.equal(end[n][1], start[n][1])
        assert same == (n in fixed), (mode, n)
    assert all(m.training == o.training for m, o in zip(model.modules(), tree.modules()))  # flags restored
    batch = _stats(_finetune(copy.deepcopy(tree)))  # 'batch' moves them all
    assert all(not torch.equal(batch[n][0], start[n][0]) for n in batch)


def test_bn_mode_recalibrates_first_under_hard_routing(tree, monkeypatch):
    calls = []
    real = ft.recalibrate_batchnorm
    monkeypatch.setattr(ft, "recalibrate_batchnorm", lambda m, b, n: calls.append(n) or real(m, b, n))
    _finetune(copy.deepcopy(tree), bn_mode="shared", bn_recalibration_batches=1)
    _finetune(copy.deepcopy(tree), bn_mode="shared", bn_recalibration_batches=0)
    _finetune(copy.deepcopy(tree))
    assert calls == [1]


def test_shared_mode_on_a_model_without_a_tree_trains_as_batch():
    a, b = make_model("cifar_resnet_b"), make_model("cifar_resnet_b")
    _finetune(a, bn_mode="shared")
    _finetune(b)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_bn_mode_resumes_to_the_same_weights(tree, tmp_path):
    """The recalibrated statistics travel in the checkpoint; a resumed run does not recalibrate again."""
    cfg = FinetuneConfig(**{**BASE, "epochs": 2, "bn_mode": "shared"})
    full = copy.deepcopy(tree)
    ft.finetune(full, X, Y, normalize, cfg)

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt("simulated interruption")
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(copy.deepcopy(tree), X, Y, normalize, cfg, out_dir=tmp_path, on_epoch=stop)
    resumed = copy.deepcopy(tree)
    assert [r["epoch"] for r in ft.finetune(resumed, X, Y, normalize, cfg, out_dir=tmp_path, resume=True)] == [1, 2]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_bn_options_are_refused():
    with pytest.raises(ValueError, match="bn_mode='batches'"):
        FinetuneConfig(bn_mode="batches")
    with pytest.raises(ValueError, match="bn_weighting=True"):
        FinetuneConfig(bn_mode="frozen", bn_weighting=True)
    with pytest.raises(ValueError, match="bn_recalibration_batches=-1"):
        FinetuneConfig(bn_recalibration_batches=-1)
    FinetuneConfig(bn_mode="shared", bn_weighting=True)  # nodes still train on (weighted) batch statistics


def test_a_failed_recalibration_leaves_the_model_as_it_was(tree):
    model = copy.deepcopy(tree).eval()
    before, settings = _stats(model), sb.tree_state(model).settings()
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [images(8, seed=1), torch.randn(8, 5, 32, 32)])  # the second has 5 channels
    after = _stats(model)
    assert all(torch.equal(after[n][0], before[n][0]) and torch.equal(after[n][1], before[n][1]) for n in after)
    assert not model.training and sb.tree_state(model).settings() == settings
    assert all(m.momentum == 0.1 for m in batchnorms(model))
    assert recalibrate_batchnorm(model, []) == 0 and all(torch.equal(_stats(model)[n][0], before[n][0]) for n in after)
