"""The training objective and routing options of issue 4: each option is shown to take effect."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from sigmab_plugin.routing import PathBatchNorm, tree_state
from conftest import images, make_model

CALIB = images(64, seed=1)
X = images(16, seed=2)
Y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
NO_TERMS = sb.LossConfig(balance_weight=0.0, distill_weight=0.0)


def _tree(family="cifar_resnet_b", **kw):
    return sb.branch(make_model(family), depth=2, calib_data=CALIB, progress=False, **kw)


def _forced(model, x, leaf):
    state = tree_state(model)
    state.forced_leaves = torch.full((x.shape[0],), leaf)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        state.forced_leaves = None


def test_expected_objective_is_the_path_probability_weighted_leaf_loss():
    model = _tree().eval()  # eval: BatchNorm uses running statistics, so a path's output is its leaf's
    sb.set_routing(model, "soft", temperature=0.7)
    out = model(X)
    probs = tree_state(model).last_leaf_probs.detach()
    loss, parts = sb.tree_loss(model, out, Y, config=NO_TERMS)
    sb.set_routing(model, "hard")
    per_leaf = torch.stack([F.cross_entropy(_forced(model, X, leaf), Y, reduction="none") for leaf in range(4)], 1)
    assert float(loss) == pytest.approx(float((probs * per_leaf).sum(1).mean()), rel=1e-5)
    assert parts["ce"] == pytest.approx(float(loss))
    mixture, _ = sb.tree_loss(model, out, Y, config=sb.LossConfig(objective="mixture", balance_weight=0.0))
    assert float(mixture) == pytest.approx(float(F.cross_entropy(out, Y)), rel=1e-6)
    assert float(mixture) < float(loss)  # a mixture hides what single leaves get wrong


@pytest.mark.parametrize("paths", ["all", "weighted"])
def test_distillation_reaches_every_path(paths):
    model = _tree().eval()
    sb.set_routing(model, "soft")
    teacher = torch.randn(16, 10)
    out = model(X)
    cfg = sb.LossConfig(balance_weight=0.0, distill_weight=1.0, distill_paths=paths)
    loss, parts = sb.tree_loss(model, out, Y, teacher_logits=teacher, config=cfg)
    probs = tree_state(model).last_leaf_probs.detach()
    sb.set_routing(model, "hard")
    kd = torch.stack([F.kl_div(F.log_softmax(_forced(model, X, leaf) / 4, 1), F.softmax(teacher / 4, 1),
                               reduction="none").sum(1) * 16 for leaf in range(4)], 1)
    want = kd.mean() if paths == "all" else (probs * kd).sum(1).mean()
    assert parts["distill"] == pytest.approx(float(want), rel=1e-4)
    no_teacher, parts0 = sb.tree_loss(model, out, Y, config=cfg)
    assert "distill" not in parts0 and float(loss) > float(no_teacher)


def test_balance_term_and_hard_mode_loss():
    model = _tree().train()
    out = model(X)  # auto: soft while training
    loss, parts = sb.tree_loss(model, out, Y, config=sb.LossConfig(balance_weight=3.0, distill_weight=0.0))
    assert parts["balance"] == pytest.approx(float(sb.leaf_balance(tree_state(model).last_leaf_probs)))
    assert float(loss) == pytest.approx(parts["ce"] + 3.0 * parts["balance"], rel=1e-5)
    sb.set_routing(model, "hard")
    out = model(X)
    loss, parts = sb.tree_loss(model, out, Y)
    assert "balance" not in parts and float(loss) == pytest.approx(float(F.cross_entropy(out, Y)), rel=1e-6)


def test_decisive_term_is_the_leaf_entropy_and_sharpens_routers():
    uniform, onehot = torch.full((4, 4), 0.25), torch.eye(4)
    assert float(sb.leaf_entropy(uniform)) == pytest.approx(float(torch.log(torch.tensor(4.0))))
    assert float(sb.leaf_entropy(onehot)) == pytest.approx(0.0, abs=1e-9)
    model = _tree().train()
    sb.set_routing(model, "soft", temperature=2.0)  # hedging routers: every path has some mass
    out = model(X)
    off, parts_off = sb.tree_loss(model, out, Y, config=NO_TERMS)
    on, parts_on = sb.tree_loss(model, out, Y, config=sb.LossConfig(balance_weight=0.0, distill_weight=0.0,
                                                                     decisive_weight=2.0))
    ent = float(sb.leaf_entropy(tree_state(model).last_leaf_probs))
    assert parts_off["leaf_entropy"] == pytest.approx(ent) and ent > 0.1  # logged even when not used
    assert float(on) == pytest.approx(float(off) + 2.0 * ent, rel=1e-5)
    routers = [p for n, p in model.named_parameters() if "routers" in n]
    opt = torch.optim.SGD(routers, lr=0.5)  # only the routers move: the entropy term alone makes them commit
    before = ent
    for _ in range(10):
        model(X)
        loss = sb.leaf_entropy(tree_state(model).last_leaf_probs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < before - 0.05
    with pytest.raises(ValueError, match="decisive_weight"):
        sb.LossConfig(decisive_weight=-1.0)
    assert ft.FinetuneConfig(decisive_weight=0.5).loss().decisive_weight == 0.5


def test_tree_loss_errors_name_the_problem():
    model = _tree().train()
    out = model(X)
    with pytest.raises(ValueError, match="target must be a long tensor"):
        sb.tree_loss(model, out, Y.float())
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        sb.tree_loss(model, out, Y, teacher_logits=torch.zeros(3, 10))
    with pytest.raises(ValueError, match="not branched"):
        sb.tree_loss(make_model("cifar_resnet_b"), out, Y)
    with pytest.raises(ValueError, match="objective='tree'"):
        sb.LossConfig(objective="tree")
    with pytest.raises(ValueError, match="balance_weight=nan"):
        sb.LossConfig(balance_weight=float("nan"))


def test_temperature_schedule():
    sched = sb.TemperatureSchedule(1.0, 0.1, 5)
    temps = [sched(i) for i in range(5)]
    assert temps[0] == 1.0 and temps[-1] == pytest.approx(0.1) and temps == sorted(temps, reverse=True)
    assert sb.temperature_at(2, 5) == pytest.approx(temps[2]) and sched(99) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="temperature end"):
        sb.TemperatureSchedule(1.0, 0.0, 3)


def test_top_k_keeps_the_most_probable_paths():
    model = _tree().train()
    sb.set_routing(model, "soft", top_k=2)
    model(X)
    paths = tree_state(model).last_paths
    assert len(paths.sample) == 2 * len(X)
    assert torch.allclose(torch.zeros(16).index_add(0, paths.sample, paths.weight.detach()), torch.ones(16))
    sb.set_routing(model, "soft", top_k=None)
    model(X)
    full = tree_state(model).last_paths
    assert len(full.sample) == 4 * len(X)
    for i in range(len(X)):  # the kept leaves are each sample's two most probable
        w = torch.zeros(4).index_put((full.leaf[full.sample == i],), full.weight[full.sample == i].detach())
        assert set(paths.leaf[paths.sample == i].tolist()) == set(w.topk(2).indices.tolist())


def test_balance_rate_pulls_hard_shares_to_half_and_zero_rate_does_nothing():
    model = _tree().train()
    for m in model.modules():  # frozen BatchNorm: training-mode features equal eval-mode ones
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    root = model.layer2.routers[0]  # the root router sits in the first routed unit (layer2 at depth 2)
    with torch.no_grad():
        root.balance.copy_(torch.tensor([5.0, -5.0]))  # everything to child 0
    sb.set_routing(model, "soft", balance_rate=0.0)
    model(X)
    assert torch.equal(root.balance, torch.tensor([5.0, -5.0]))
    sb.set_routing(model, "soft", balance_rate=0.5)
    for _ in range(60):
        model(X)
    with torch.no_grad():
        shares = torch.bincount(sb.route(model, X) >> 1, minlength=2).float() / len(X)
    assert float(root.balance[0]) < 5.0 - 1.0
    assert 0.2 <= float(shares[0]) <= 0.8, shares


def test_path_batchnorm_weights_select_the_node_statistics():
    bn = torch.nn.BatchNorm2d(4).train()
    pbn = copy.deepcopy(bn)
    pbn.__class__ = sb.routing.PathBatchNorm2d
    x = torch.randn(8, 4, 5, 5)
    assert torch.allclose(pbn(x), bn(x), atol=1e-6)  # no weights: plain BatchNorm
    pbn.row_weight = torch.ones(8)
    ref = torch.nn.BatchNorm2d(4).train()
    assert torch.allclose(pbn(x), ref(x), atol=1e-5)  # uniform weights: plain batch statistics
    fresh = torch.nn.BatchNorm2d(4).train()
    fresh.__class__ = sb.routing.PathBatchNorm2d
    fresh.row_weight = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])
    sub = torch.nn.BatchNorm2d(4).train()
    assert torch.allclose(fresh(x)[:4], sub(x[:4]), atol=1e-5)  # statistics of the weighted rows only
    assert torch.allclose(fresh.running_mean, sub.running_mean, atol=1e-6)


def test_bn_weighting_changes_training_statistics_only_when_on():
    runs = {}
    for on in (False, True):
        model = _tree().train()
        sb.set_routing(model, "soft", bn_weighting=on)
        model(X)
        bns = [m for m in model.modules() if isinstance(m, PathBatchNorm)]
        assert bns
        runs[on] = torch.cat([m.running_mean for m in bns])
    assert not torch.allclose(runs[False], runs[True])


def test_finetune_options_reach_training(monkeypatch):
    """Every routing option of FinetuneConfig is applied during the epoch (and restored after)."""
    seen = []
    real = ft._epoch

    def spy(model, *args, **kw):
        out = real(model, *args, **kw)
        seen.append(tree_state(model).settings())
        return out
    monkeypatch.setattr(ft, "_epoch", spy)
    model = _tree()
    xs = (torch.rand(32, 3, 32, 32) * 255).to(torch.uint8)
    cfg = ft.FinetuneConfig(epochs=1, batch_size=16, progress=False, top_k=2, balance_rate=0.25, bn_weighting=True)
    ft.finetune(model, xs, Y.repeat(2), lambda t: t.float() / 255, cfg)
    assert seen[0]["top_k"] == 2 and seen[0]["balance_rate"] == 0.25 and seen[0]["bn_weighting"] is True
    assert seen[0]["mode"] == "soft" and seen[0]["temperature"] == pytest.approx(0.1)  # the last batch's
    assert tree_state(model).settings()["mode"] == "auto" and tree_state(model).top_k is None
