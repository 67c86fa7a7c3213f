"""Every field of HarnessConfig reaches the run: a run with the field changed differs, where that field acts,
from the same run with the default. The fields are read from the dataclass, so a field added without a check
fails here (the harness's `--distill` once never reached training). The run is real (digits, a few images, no
training epochs unless a field needs them); spies record what the harness hands to the data loader, the
model builder, each method, the calibration set and fine-tuning, and what it writes."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from sigmab_plugin.adapters.cifar_resnet import cifar_resnet
from sigmab_plugin.baselines import harness
from sigmab_plugin.baselines.harness import HarnessConfig
from sigmab_plugin.baselines.models import create_model
from sigmab_plugin.finetune import FinetuneConfig

BASE = dict(model="resnet20", data="digits", methods=["sigmab"], train_limit=96, test_limit=48, calib_size=32,
            finetune=FinetuneConfig(epochs=0, batch_size=32, progress=False))
CKPT = "<checkpoint>"  # replaced by a saved resnet20 state dict
# field -> (a value other than BASE's/the default, other fields both runs share, where the change must show)
CHANGES = {
    "model": ("resnet32", {}, "create_model"),
    "data": ("cifar10", {}, "load_dataset"),  # the spy records the name and loads digits
    "data_root": ("/some/where", {}, "load_dataset"),
    "checkpoint": (CKPT, {}, "create_model"),
    "shortcut": ("A", {}, "create_model"),
    "methods": (["sigmab", "fpgm"], {}, "rows"),
    "depth": (1, {}, "prepare"),
    "keep_ratio": (0.7, {}, "prepare"),
    "prune_residual": (False, {}, "prepare"),
    "coverage": (True, {}, "prepare"),
    "channel_score": ("activation", {}, "prepare"),
    "router_grid": (2, {}, "prepare"),
    "target_fraction": (0.3, {}, "prepare"),
    "keep_shape": ([1.0, 0.5], {}, "prepare"),
    "static_shape": ("tree", {"methods": ["fpgm"]}, "prepare"),
    "pretrain_epochs": (1, {}, "finetune"),
    "finetune": (FinetuneConfig(epochs=0, batch_size=32, progress=False, lr=0.5), {}, "finetune"),
    "pretrain_lr": (0.5, {"pretrain_epochs": 1}, "finetune"),
    "reset_classifier": (True, {"pretrain_epochs": 1}, "finetune"),
    "calib_size": (40, {}, "calibration_set"),
    "train_limit": (64, {}, "finetune"),
    "test_limit": (32, {}, "rows"),
    "seed": (1, {}, "load_dataset"),
    "device": ("cpu:0", {}, "calibration_set"),
    "out_dir": ("elsewhere", {}, "written"),
    "resume": (True, {}, "finetune"),
    "calibrate_routing": (True, {"finetune": FinetuneConfig(epochs=1, batch_size=32, progress=False)}, "rows"),
    "reconstruct": (True, {}, "finetune"),
    "reconstruct_ridge": (1.0, {"reconstruct": True}, "finetune"),
    "reconstruct_ridges": ({"sigmab": 1.0}, {"reconstruct": True}, "finetune"),
}
# model options apply to timm/PointNet++ models; a CIFAR ResNet refuses them instead of ignoring them
REFUSED = {"model_kwargs": ({"width": 0.5}, "width")}
ROW_KEYS = ("method", "stored_params", "active_params", "top1", "top1_before_finetune", "leaf_histogram",
            "routing_calibration", "reconstruction", "keep_ratio", "train_images", "test_images", "seed")


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def traced_run(tmp: Path, **fields) -> dict:
    """The trace of one harness run with BASE and ``fields`` (``out_dir`` relative to ``tmp``)."""
    trace = {k: [] for k in ("load_dataset", "create_model", "prepare", "calibration_set", "finetune")}
    real = {k: getattr(harness, k) for k in ("load_dataset", "create_model", "get_method", "calibration_set",
                                              "finetune")}

    def load_dataset(name, root=None, seed=0):
        trace["load_dataset"].append((name, root, seed))
        return real["load_dataset"]("digits", None, seed=seed)

    def create(name, classes, checkpoint=None, shortcut="A", **kwargs):
        trace["create_model"].append((name, classes, checkpoint, shortcut, kwargs))
        return real["create_model"](name, classes, checkpoint, shortcut, **kwargs)

    def get_method(name):
        method = real["get_method"](name)
        prepare = method.prepare

        def spied(run):
            model = prepare(run)
            trace["prepare"].append((name, run.budget, fingerprint(model)))
            return model
        method.prepare = spied
        return method

    def calibration_set(train, normalize, size, seed, device="cpu"):
        trace["calibration_set"].append((size, seed, str(device)))
        return real["calibration_set"](train, normalize, size, seed, device)

    def finetune(model, images, labels, normalize, cfg, **kw):
        trace["finetune"].append((fingerprint(model), len(labels), json.dumps(cfg.to_dict(), sort_keys=True),
                                  kw.get("resume"), kw.get("teacher") is None))
        return real["finetune"](model, images, labels, normalize, cfg, **kw)

    cfg = HarnessConfig(**{**BASE, "out_dir": str(tmp / fields.pop("out_dir", "run")), **fields})
    with pytest.MonkeyPatch.context() as mp:
        for name, fn in (("load_dataset", load_dataset), ("create_model", create), ("get_method", get_method),
                         ("calibration_set", calibration_set), ("finetune", finetune)):
            mp.setattr(harness, name, fn)
        mp.setattr(harness, "latency_ratios", lambda calls, ref: {  # timing is not a field's effect
            k: {"ms": 1.0, "ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0} for k in calls})
        rows = harness.run_comparison(cfg, log=lambda *a: None)
    trace["rows"] = [{k: r.get(k) for k in ROW_KEYS} for r in rows]
    trace["written"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return trace


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The trace of the run without the change, one per context (shared by the fields that use it)."""
    traces = {}

    def get(context: dict) -> dict:
        key = repr(sorted(context.items()))
        if key not in traces:
            traces[key] = traced_run(tmp_path_factory.mktemp("base"), **context)
        return traces[key]
    return get


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    torch.save(cifar_resnet(20, 10, "B").state_dict(), path)
    return str(path)


def test_every_field_is_checked():
    names = {f.name for f in dataclasses.fields(HarnessConfig)}
    assert names == set(CHANGES) | set(REFUSED), \
        f"HarnessConfig fields without a check: {names - set(CHANGES) - set(REFUSED)}"


def test_the_base_run_is_deterministic(tmp_path, base):
    assert traced_run(tmp_path) == base({})  # so a difference below is the field's doing


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_field_reaches_the_run(name, tmp_path, base, checkpoint):
    value, context, where = CHANGES[name]
    value = checkpoint if value == CKPT else value
    changed = traced_run(tmp_path, **{**context, name: value})
    assert changed[where] != base(context)[where], f"{name}={value!r} did not change {where}"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_model_options_a_cifar_resnet_cannot_take_are_refused(name, tmp_path):
    value, word = REFUSED[name]
    with pytest.raises(ValueError, match=word):
        harness.run_comparison(HarnessConfig(**{**BASE, "out_dir": str(tmp_path / "run"), name: value}),
                               log=lambda *a: None)
    assert not any(tmp_path.iterdir())  # refused before anything was written, its folder included
    with pytest.raises(ValueError, match="resnet20 takes no model options"):
        create_model("resnet20", 10, width=0.5)
