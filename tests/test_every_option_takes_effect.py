"""Every field of FinetuneConfig takes effect: a run with the field changed ends with other weights (or, for
the run-only settings, other evaluation batches / progress output) than the same run with the default. The
list of fields is read from the dataclass, so an option added without such a check fails here: a flag that
silently does nothing (the old `--distill`) cannot come back unnoticed."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from sigmab_plugin.finetune import FinetuneConfig
from conftest import images, make_model

N = 32
X = (torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
Y = torch.arange(N) % 10
BASE = dict(epochs=1, batch_size=16, lr=0.05, progress=False, distill_weight=1.0)
# field -> a value other than the default that must change the trained weights (two batches of 16, one epoch)
CHANGES = {
    "epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.1, "augment": False,
    "flip": False, "temperature_start": 5.0, "temperature_end": 1.0, "hard_epochs": 1, "objective": "mixture",
    "balance_weight": 0.0, "balance_rate": 0.5, "decisive_weight": 1.0, "distill_weight": 0.0,
    "distill_temperature": 1.0, "distill_paths": "weighted", "top_k": 1, "bn_weighting": True, "amp": "bf16",
    "seed": 1, "bn_mode": "shared", "bn_recalibration_batches": 0, "route_inputs": "clean", "node_lr_scale": False,
}
# options that act only next to another one: compared with and without the change, both with this context
CONTEXT = {"bn_recalibration_batches": {"bn_mode": "shared"}}
RUN_ONLY = ("eval_batch_size", "progress")  # checked below by what they do: evaluation batches, progress output


def normalize(x):
    return x.float() / 255 - 0.5


@pytest.fixture(scope="module")
def pair():
    dense = make_model("cifar_resnet_b")
    teacher = copy.deepcopy(dense).requires_grad_(False)
    tree = sb.branch(dense, depth=2, calib_data=images(64, seed=1), keep_ratio=0.5, progress=False)
    return tree, teacher


def _train(pair, **overrides):
    tree, teacher = pair
    model = copy.deepcopy(tree)
    ft.finetune(model, X, Y, normalize, FinetuneConfig(**{**BASE, **overrides}), teacher=teacher)
    return model.state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_field_is_checked():
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert names == set(CHANGES) | set(RUN_ONLY), f"fields without an effect check: {names - set(CHANGES) - set(RUN_ONLY)}"
    defaults = FinetuneConfig()
    for name, value in CHANGES.items():
        assert getattr(defaults, name) != value and BASE.get(name) != value, name


@pytest.fixture(scope="module")
def base_run(pair):
    first = _train(pair)
    assert _same(first, _train(pair))  # deterministic, so a difference below is the option's
    return first


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_option_changes_training(pair, base_run, name):
    context = CONTEXT.get(name, {})
    base = _train(pair, **context) if context else base_run
    assert not _same(base, _train(pair, **context, **{name: CHANGES[name]})), f"FinetuneConfig.{name} had no effect"


def test_run_only_settings_take_effect(pair, monkeypatch):
    tree, teacher = pair
    sizes = []
    model = copy.deepcopy(tree)
    hook = model.register_forward_pre_hook(lambda m, args: None if m.training else sizes.append(args[0].shape[0]))
    ft.finetune(model, X, Y, normalize, FinetuneConfig(**BASE), test=(X, Y))
    default_sizes, sizes[:] = list(sizes), []
    ft.finetune(model, X, Y, normalize, FinetuneConfig(**{**BASE, "eval_batch_size": 8}), test=(X, Y))
    hook.remove()
    assert default_sizes and max(default_sizes) == N and sizes and max(sizes) == 8
    shown = []
    real = ft.progress
    monkeypatch.setattr(ft, "progress", lambda it, enabled, *a, **k: (shown.append(enabled), real(it, False, *a, **k))[1])
    for flag in (False, True):
        ft.finetune(copy.deepcopy(tree), X, Y, normalize, FinetuneConfig(**{**BASE, "progress": flag}))
    assert shown == [False, True]


# BranchConfig: field -> a value other than the default that must change the built tree (its weights or its plan)
# or be refused for this model and calibration set (min_leaf_samples: 64 samples cannot give 4 leaves 40 each)
TREE_CHANGES = {
    "depth": 1, "keep_ratio": 0.75, "split_points": ["layer2", "layer3.1"], "seed": 1, "coverage": True,
    "prune_residual": True, "round_to": 3, "ignored_layers": ["layer2.0.conv1"],
    "keep_ratio_dict": {"layer2.0.conv1": 0.25}, "router_tau": 5.0, "kmeans_restarts": 1, "kmeans_iters": 1,
    "min_cluster_share": 0.45, "min_leaf_samples": 40, "channel_score": "activation", "router_grid": 2,
}
TREE_RUN_ONLY = ("calib_batch_size", "progress", "version")  # batches, output; version is the format's, not an option
CALIB = images(64, seed=1)
# min_cluster_share acts only on an unbalanced split: 56 near-copies of one image and 8 others
SKEWED = torch.cat([images(1, seed=3) + 0.01 * images(56, seed=4), images(8, seed=5)])
DATA = {"min_cluster_share": SKEWED}


def _tree(calib=CALIB, **overrides):
    model = sb.branch(make_model("cifar_resnet_b"), calib_data=calib, **{"progress": False, **overrides})
    spec = {k: v for k, v in sb.tree_state(model).spec.items() if k not in ("config", "calibration")}
    return model.state_dict(), spec


def test_every_branch_field_is_checked():
    names = {f.name for f in dataclasses.fields(sb.BranchConfig)}
    assert names == set(TREE_CHANGES) | set(TREE_RUN_ONLY), \
        f"fields without an effect check: {names - set(TREE_CHANGES) - set(TREE_RUN_ONLY)}"
    defaults = sb.BranchConfig()
    assert all(getattr(defaults, n) != v for n, v in TREE_CHANGES.items())


@pytest.fixture(scope="module")
def base_tree():
    first, again = _tree(), _tree()
    assert _same(first[0], again[0]) and first[1] == again[1]  # deterministic, so a difference is the option's
    return first


@pytest.mark.parametrize("name", sorted(TREE_CHANGES))
def test_branch_option_changes_the_tree(base_tree, name):
    try:
        state, spec = _tree(DATA.get(name, CALIB), **{name: TREE_CHANGES[name]})
    except ValueError as e:  # refused: the option was read
        assert name == "min_leaf_samples" and "at least 160" in str(e), (name, e)
        return
    assert name != "min_leaf_samples", "64 calibration samples cannot give four leaves 40 each"
    base = _tree(DATA[name]) if name in DATA else base_tree
    assert not (_same(state, base[0]) and spec == base[1]), f"BranchConfig.{name} had no effect"


def test_branch_run_only_settings_take_effect(monkeypatch):
    import sigmab_plugin._calib as br
    sizes = []
    model = make_model("cifar_resnet_b")
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    sb.branch(model, calib_data=CALIB, calib_batch_size=16, progress=False)
    hook.remove()
    assert sizes and max(sizes) == 16
    shown = []
    real = br.progress
    monkeypatch.setattr(br, "progress", lambda it, enabled, *a, **k: (shown.append(enabled), real(it, False, *a, **k))[1])
    for flag in (False, True):
        sb.branch(make_model("cifar_resnet_b"), calib_data=CALIB, progress=flag)
    assert shown and set(shown) == {False, True}
