"""Soft-routing fine-tuning: determinism, exact resume after an interruption, logs and checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from conftest import make_model

X = (torch.rand(96, 3, 32, 32) * 255).to(torch.uint8)
Y = torch.randint(0, 10, (96,), generator=torch.Generator().manual_seed(0))


def _norm(x):
    return x.float() / 127.5 - 1


def _model(branched: bool):
    m = make_model("cifar_resnet_b")
    if branched:
        sb.branch(m, depth=2, calib_data=_norm(X), progress=False)
    return m


CFG = ft.FinetuneConfig(epochs=3, batch_size=32, lr=0.05, progress=False)


@pytest.mark.parametrize("branched", [False, True])
def test_resume_after_interruption_equals_uninterrupted(branched, tmp_path, monkeypatch):
    full = _model(branched)
    ft.finetune(full, X, Y, _norm, CFG, out_dir=tmp_path / "full")

    real_save = ft._save_checkpoint
    calls = []

    def crash_after_first(*args):
        real_save(*args)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("simulated interruption")
    monkeypatch.setattr(ft, "_save_checkpoint", crash_after_first)
    part = _model(branched)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(part, X, Y, _norm, CFG, out_dir=tmp_path / "part")
    monkeypatch.setattr(ft, "_save_checkpoint", real_save)
    resumed = _model(branched)
    history = ft.finetune(resumed, X, Y, _norm, CFG, out_dir=tmp_path / "part", resume=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "part" / ft.LOG).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "part").iterdir())


def test_soft_training_trains_routers_and_anneals_temperature(tmp_path):
    model = _model(True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "routers" in k and "centroids" in k}
    cfg = ft.FinetuneConfig(epochs=3, batch_size=32, lr=0.05, progress=False, hard_epochs=1, balance_weight=0.5)
    hist = ft.finetune(model, X, Y, _norm, cfg, test=(X[:32], Y[:32]))
    temps = [t for h in hist for t in (h["temperature_first"], h["temperature"])]
    assert temps[0] == cfg.temperature_start and temps[-1] == pytest.approx(cfg.temperature_end)
    assert temps == sorted(temps, reverse=True)
    assert hist[1]["temperature"] == pytest.approx(cfg.temperature_end)  # annealed over the soft epochs only
    assert hist[0]["temperature"] < hist[0]["temperature_first"]  # annealed per batch, within an epoch
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert hist[0]["balance"] >= 0 and "test_leaf_histogram" in hist[-1]
    assert sum(hist[-1]["test_leaf_histogram"]) == 32
    assert model._sigmab_tree.mode == "auto" and not model.training


def test_resume_accepts_a_checkpoint_written_before_a_config_field_existed(tmp_path):
    """A field added to FinetuneConfig since a checkpoint was written is taken at its default."""
    cfg = ft.FinetuneConfig(epochs=2, batch_size=32, lr=0.05, progress=False)
    model = _model(True)
    ft.finetune(model, X, Y, _norm, ft.FinetuneConfig(**{**cfg.to_dict(), "epochs": 2}), out_dir=tmp_path)
    ck = torch.load(tmp_path / ft.CHECKPOINT, weights_only=True)
    old = json.loads(ck["config"])
    del old["decisive_weight"]
    ck["config"] = json.dumps(old)
    torch.save(ck, tmp_path / ft.CHECKPOINT)
    assert len(ft.finetune(_model(True), X, Y, _norm, cfg, out_dir=tmp_path, resume=True)) == 2
    with pytest.raises(ValueError, match="decisive_weight"):  # a changed value is still refused
        ft.finetune(_model(True), X, Y, _norm, ft.FinetuneConfig(**{**cfg.to_dict(), "decisive_weight": 1.0}),
                    out_dir=tmp_path, resume=True)


def test_one_epoch_run_anneals_from_the_start_temperature():
    """A one-epoch run used to train at temperature_end throughout (saturated routers, collapse on ModelNet40)."""
    model = _model(True)
    cfg = ft.FinetuneConfig(epochs=1, batch_size=16, lr=0.05, progress=False, temperature_start=2.0)
    row = ft.finetune(model, X, Y, _norm, cfg)[0]
    assert row["temperature_first"] == 2.0 and row["temperature"] == pytest.approx(cfg.temperature_end)
    shares, argmax = row["train_leaf_share"], row["train_leaf_share_argmax"]
    assert len(argmax) == len(shares) == 4 and sum(argmax) == pytest.approx(1.0)
    assert all(a * len(Y) == pytest.approx(round(a * len(Y))) for a in argmax)  # counts of samples, not mass


def test_batches_without_len_anneal_per_epoch():
    class Stream:  # iterable, no len(): finetune cannot know the steps per epoch
        def __iter__(self):
            return iter([(_norm(X[i:i + 16]), Y[i:i + 16]) for i in range(0, len(Y), 16)])
    cfg = ft.FinetuneConfig(epochs=2, lr=0.05, progress=False)
    rows = ft.finetune(_model(True), Stream(), cfg=cfg)
    assert [(r["temperature_first"], r["temperature"]) for r in rows] == [
        (cfg.temperature_start, cfg.temperature_start), (pytest.approx(cfg.temperature_end),) * 2]


def test_distillation_and_balance_terms():
    probs = torch.full((8, 4), 0.25)
    assert float(sb.leaf_balance(probs)) == pytest.approx(0.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1
    assert float(sb.leaf_balance(collapsed)) == pytest.approx(3.0)
    model, teacher = _model(True), make_model("cifar_resnet_b")
    cfg = ft.FinetuneConfig(epochs=1, batch_size=48, progress=False, distill_weight=1.0)
    hist = ft.finetune(model, X, Y, _norm, cfg, teacher=teacher)
    assert hist[0]["distill"] > 0


def test_augmentation_is_a_padded_crop_and_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1  # no zeros: padding shows
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    crops = {}
    for seed in range(6):
        for flip in (False, True):
            out = ft.augment_batch(x, torch.Generator().manual_seed(seed), flip=flip)
            assert out.shape == x.shape
            for i in range(2):
                windows = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in ((False, True) if flip else (False,))
                           if torch.equal(out[i], (pad[i, :, dy:dy + 8, dx:dx + 8].flip(2) if f
                                                   else pad[i, :, dy:dy + 8, dx:dx + 8]))]
                assert windows, "every output image is a window of the padded input (flipped or not)"
                crops.setdefault(flip, set()).update(windows)
    assert len(crops[False]) > 3  # seeds give different crops
    assert any(f for _, _, f in crops[True])  # flips happen when asked
    with pytest.raises(ValueError, match="hard_epochs"):
        ft.FinetuneConfig(epochs=1, hard_epochs=2)


def test_plain_loop_with_public_pieces_equals_finetune():
    """A ten-line loop over sb.tree_loss / sb.temperature_at / sb.set_routing reaches finetune's weights."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(_norm(X), Y), batch_size=32)
    cfg = ft.FinetuneConfig(epochs=2, lr=0.05, progress=False, balance_weight=0.3)
    ref = _model(True)
    ft.finetune(ref, loader, cfg=cfg)

    model = _model(True)
    opt = torch.optim.SGD(sb.node_param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(loader))
    steps = cfg.epochs * len(loader)
    for epoch in range(cfg.epochs):
        model.train()
        for i, (x, y) in enumerate(loader):
            t = sb.temperature_at(epoch * len(loader) + i, steps, cfg.temperature_start, cfg.temperature_end)
            sb.set_routing(model, "soft", t)
            loss, _ = sb.tree_loss(model, model(x), y, config=cfg.loss())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    a, b = ref.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_augment_callable_replaces_the_image_augmentation():
    """finetune(augment=f) trains on f's batches (point clouds bring their own augmentation)."""
    model = make_model("cifar_resnet_b")
    x = (torch.rand(32, 3, 32, 32) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (32,))
    seen = []

    def augment(batch, gen):
        seen.append(batch.shape[0])
        return torch.zeros_like(batch)  # every training image blank

    cfg = ft.FinetuneConfig(epochs=1, batch_size=16, progress=False, distill_weight=0.0)
    ft.finetune(model, x, y, lambda b: b.float() / 255, cfg, augment=augment)
    assert seen == [16, 16]
    off = ft.FinetuneConfig(epochs=1, batch_size=16, progress=False, distill_weight=0.0, augment=False)
    seen.clear()
    ft.finetune(model, x, y, lambda b: b.float() / 255, off, augment=augment)
    assert seen == []  # cfg.augment=False turns any augmentation off
