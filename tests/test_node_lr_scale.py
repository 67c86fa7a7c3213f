"""FinetuneConfig.node_lr_scale: a tree's node layers train at lr x (nodes of their level), weight decay divided by
the same; shared layers and routers keep lr. Checked on the optimizer's groups and on one SGD step's update."""
import copy

import pytest
import torch

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from sigmab_plugin.finetune import FinetuneConfig, param_groups
from conftest import images, make_model, node_levels


@pytest.fixture(scope="module")
def tree():
    tree = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64, seed=1), keep_ratio=0.5,
                     progress=False)  # in place
    return tree, make_model("cifar_resnet_b")


def test_groups_scale_lr_and_decay_by_nodes_per_level(tree):
    model, dense = tree
    cfg = FinetuneConfig(lr=0.02, weight_decay=4e-4, node_lr_scale=True)
    groups = param_groups(model, cfg)
    levels = node_levels(model)
    assert sorted(set(levels.values())) == [1, 2, 4]  # shared + routers, level 1, the leaves
    name = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for g in groups:
        k = {levels[name[id(p)]] for p in g["params"]}
        assert len(k) == 1, "a group mixes levels"
        (k,) = k
        assert g["lr"] == pytest.approx(0.02 * k) and g["weight_decay"] == pytest.approx(4e-4 / k)
        seen += [name[id(p)] for p in g["params"]]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(seen) == len(set(seen))
    plain = param_groups(model, FinetuneConfig(lr=0.02, node_lr_scale=False))
    assert len(plain) == 1 and "lr" not in plain[0]  # the optimizer's own lr
    assert len(param_groups(dense, cfg)) == 1  # no tree: nothing to scale


def test_one_step_moves_each_node_by_its_scale(tree):
    model, _ = tree
    x = (torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    y = torch.arange(16) % 10
    base = dict(epochs=1, batch_size=16, lr=0.05, momentum=0.0, weight_decay=0.0, augment=False, flip=False,
                progress=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = {}
    for scale in (False, True):
        m = copy.deepcopy(model)
        ft.finetune(m, x, y, lambda t: t.float() / 255 - 0.5, FinetuneConfig(**base, node_lr_scale=scale))
        moved[scale] = {n: p.detach() - start[n] for n, p in m.named_parameters()}
    levels = node_levels(model)
    checked = set()
    for n, k in levels.items():
        if moved[False][n].abs().max() > 0:
            torch.testing.assert_close(moved[True][n], k * moved[False][n], rtol=1e-4, atol=1e-6)
            checked.add(k)
    assert checked == {1, 2, 4}


def test_exclude_1d_keeps_timms_decay_split_and_the_per_level_rate(tree):
    from timm.optim import param_groups_weight_decay
    model, dense = tree
    for m in (dense, model):
        timm_no_decay = {id(p) for g in param_groups_weight_decay(m, 5e-4) if g["weight_decay"] == 0
                         for p in g["params"]}
        levels = node_levels(m)
        name = {id(p): n for n, p in m.named_parameters()}
        groups = sb.node_param_groups(m, 0.1, 5e-4, exclude_1d=True)
        assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)
        for g in groups:
            for p in g["params"]:
                k = levels[name[id(p)]]
                assert g["lr"] == pytest.approx(0.1 * k)
                assert g["weight_decay"] == (0.0 if id(p) in timm_no_decay else pytest.approx(5e-4 / k))
    assert {g["weight_decay"] for g in sb.node_param_groups(model, 0.1, 5e-4)} == {5e-4, 2.5e-4, 1.25e-4}


def test_a_checkpoint_from_before_the_option_resumes_only_without_it(tree, tmp_path):
    """A checkpoint written before node_lr_scale existed trained without it: resuming it under the default (on)
    would silently change the run's recipe half-way, so it is refused; with node_lr_scale=False it resumes."""
    import json
    model, _ = tree
    x = (torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    y = torch.arange(16) % 10
    norm = lambda t: t.float() / 255 - 0.5  # noqa: E731
    base = dict(batch_size=16, progress=False, distill_weight=0.0)
    ft.finetune(copy.deepcopy(model), x, y, norm, FinetuneConfig(epochs=1, node_lr_scale=False, **base),
                out_dir=tmp_path)
    path = tmp_path / ft.CHECKPOINT
    ck = torch.load(path, weights_only=True)
    old = json.loads(ck["config"])
    del old["node_lr_scale"]  # as written before the field existed
    torch.save({**ck, "config": json.dumps(old)}, path)
    with pytest.raises(ValueError, match="node_lr_scale: False -> True"):
        ft.finetune(copy.deepcopy(model), x, y, norm, FinetuneConfig(epochs=1, **base), out_dir=tmp_path, resume=True)
    ft.finetune(copy.deepcopy(model), x, y, norm, FinetuneConfig(epochs=1, node_lr_scale=False, **base),
                out_dir=tmp_path, resume=True)
    assert FinetuneConfig().node_lr_scale  # the default, which the refusal above protects old runs from


def test_a_plain_model_resumes_whatever_the_option(tmp_path):
    """node_lr_scale does not reach a model without a tree (one group either way), so an FPGM or dense checkpoint
    from before the option resumes under the default instead of being refused."""
    import json
    model = make_model("cifar_resnet_b")
    x = (torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    y = torch.arange(16) % 10
    norm = lambda t: t.float() / 255 - 0.5  # noqa: E731
    base = dict(epochs=1, batch_size=16, progress=False, distill_weight=0.0)
    ft.finetune(copy.deepcopy(model), x, y, norm, FinetuneConfig(node_lr_scale=False, **base), out_dir=tmp_path)
    path = tmp_path / ft.CHECKPOINT
    ck = torch.load(path, weights_only=True)
    old = json.loads(ck["config"])
    del old["node_lr_scale"]
    torch.save({**ck, "config": json.dumps(old)}, path)
    ft.finetune(copy.deepcopy(model), x, y, norm, FinetuneConfig(**base), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="epochs: 1 -> 2"):  # other settings are still checked
        ft.finetune(copy.deepcopy(model), x, y, norm, FinetuneConfig(**{**base, "epochs": 2}), out_dir=tmp_path,
                    resume=True)
