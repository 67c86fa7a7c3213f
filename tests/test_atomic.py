"""Nothing half-done: every public entry point either completes or leaves the model (weights, buffers,
every module's train/eval flag, routing settings) and the user's files exactly as they were, and every
accepted input is valid. One table per entry point; each case names the error it expects."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from torch import nn

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from sigmab_plugin.io import SPEC_FILE, WEIGHTS_FILE
from conftest import images, make_model

CALIB = images(64, seed=1)
X = images(8, seed=2)
IMGS = (torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
LABELS = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))


def _norm(x):
    return x.float() / 127.5 - 1


class State:
    """Everything a failed call must leave as it was."""

    def __init__(self, model: nn.Module):
        self.sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.flags = {n: m.training for n, m in model.named_modules()}
        self.grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.routing = sb.tree_state(model).settings() if sb.is_branched(model) else None
        self.types = {n: type(m) for n, m in model.named_modules()}

    def check(self, model: nn.Module) -> None:
        sd = model.state_dict()
        assert sd.keys() == self.sd.keys()
        assert all(torch.equal(sd[k], self.sd[k]) for k in sd), [k for k in sd if not torch.equal(sd[k], self.sd[k])]
        assert {n: m.training for n, m in model.named_modules()} == self.flags
        assert {n: p.requires_grad for n, p in model.named_parameters()} == self.grad
        assert {n: type(m) for n, m in model.named_modules()} == self.types
        assert (sb.tree_state(model).settings() if sb.is_branched(model) else None) == self.routing


def _frozen_bn(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


class OnceIterable:
    """Iterable whose every iterator shares one generator: the second pass is empty."""

    def __init__(self, batches):
        self.gen = iter(batches)

    def __iter__(self):
        return self.gen


BRANCH_CASES = [
    ("compiled", lambda m: (torch.compile(m), {}), TypeError, "torch.compile wrapper"),
    ("keep_bool", lambda m: (m, dict(keep_ratio=True)), TypeError, "keep_ratio=True must be a real number"),
    ("keep_tensor", lambda m: (m, dict(keep_ratio=torch.tensor(0.5))), TypeError, "must be a real number"),
    ("keep_str", lambda m: (m, dict(keep_ratio="abc")), TypeError, "keep_ratio='abc'"),
    ("coverage_str", lambda m: (m, dict(coverage="no")), TypeError, "coverage='no' must be True or False"),
    ("seed_str", lambda m: (m, dict(seed="a")), TypeError, "seed='a' must be an integer"),
    ("wrong_channels", lambda m: (m, dict(calib_data=CALIB[:, :1])), ValueError, "cannot run calib_data"),
    ("wrong_rank", lambda m: (m, dict(calib_data=CALIB[:, 0])), ValueError, "cannot run calib_data"),
    ("int_data", lambda m: (m, dict(calib_data=(CALIB * 10).long())), TypeError, "floating-point"),
    ("fp16_model", lambda m: (m.half(), {}), TypeError, "model's parameters are torch.float16"),
    ("all_zero", lambda m: (m, dict(calib_data=torch.zeros_like(CALIB))), ValueError, "identical features"),
    ("repeated", lambda m: (m, dict(calib_data=CALIB[:1].repeat(64, 1, 1, 1))), ValueError, "identical features"),
    ("once_iterable", lambda m: (m, dict(calib_data=OnceIterable([CALIB[i:i + 16] for i in range(0, 64, 16)]))),
     ValueError, "first pass and 0 on its second"),
    ("meta_model", lambda m: (m.to("meta"), {}), ValueError, "meta device"),
    ("nothing_to_prune", lambda m: (nn.Sequential(nn.Flatten(), nn.Linear(3072, 32), nn.ReLU(), nn.Linear(32, 32),
                                                  nn.ReLU(), nn.Linear(32, 10)), dict(depth=1)),
     ValueError, "prunes nothing"),
]


@pytest.mark.parametrize("name,make,exc,match", BRANCH_CASES, ids=[c[0] for c in BRANCH_CASES])
def test_branch_refuses_and_leaves_the_model(name, make, exc, match):
    model, kwargs = make(_frozen_bn(make_model("cifar_resnet_b")))
    target = getattr(model, "_orig_mod", model)
    before = State(target) if name != "meta_model" else None
    with pytest.raises(exc, match=match):
        sb.branch(model, **{"depth": 2, "calib_data": CALIB, "progress": False, **kwargs})
    if before is not None:
        before.check(target)
    assert not sb.is_branched(target)


def test_branch_keeps_each_modules_flag_and_frozen_parameters():
    model = _frozen_bn(make_model("resnet"))
    for p in model.parameters():
        p.requires_grad_(False)
    sb.branch(model, depth=2, calib_data=CALIB, progress=False)
    assert sb.param_report(model)["active_fraction_max"] < 0.8  # frozen weights still prune
    assert model.training  # node copies keep their frozen flags; the routers are new, trainable parameters
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".routers." not in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".routers." in n)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert bns and not any(m.training for m in bns) and all(m.training for m in convs)


def _saved(tmp_path, family="cifar_resnet_b"):
    tree = sb.branch(make_model(family), depth=2, calib_data=CALIB, progress=False)
    sb.save_branched(tree, tmp_path / "tree")
    return tree, tmp_path / "tree"


def _redigest(folder):
    spec = json.loads((folder / SPEC_FILE).read_text())
    spec["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    (folder / SPEC_FILE).write_text(json.dumps(spec))


def _edit_weights(folder, edit, redigest=True):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    if redigest:
        _redigest(folder)


def _edit_spec(folder, edit):
    spec = json.loads((folder / SPEC_FILE).read_text())
    edit(spec)
    (folder / SPEC_FILE).write_text(json.dumps(spec))


def _first_key(t, suffix):
    return next(k for k in t if k.endswith(suffix))


LOAD_CASES = [
    ("tampered_no_redigest", lambda f, o: _edit_weights(f, lambda t: t.__setitem__(
        _first_key(t, "conv1.weight"), t[_first_key(t, "conv1.weight")] * 2), redigest=False), "SHA-256 differs"),
    ("wrong_shape", lambda f, o: _edit_weights(f, lambda t: t.__setitem__(
        _first_key(t, "fc.variants.0.module.weight"), torch.zeros(3, 3))), "wrong shapes"),
    ("missing_tensor", lambda f, o: _edit_weights(f, lambda t: t.pop(_first_key(t, "fc.variants.3.module.bias"))),
     "missing"),
    ("extra_tensor", lambda f, o: _edit_weights(f, lambda t: t.__setitem__("extra.weight", torch.zeros(1))),
     "unexpected"),
    ("bad_keep_index", lambda f, o: _edit_spec(f, lambda s: s["plan"]["2/0"].__setitem__(
        next(iter(s["plan"]["2/0"])), [9999])), "does not fit|does not match"),
    ("other_trees_weights", lambda f, o: (f / WEIGHTS_FILE).write_bytes((o / WEIGHTS_FILE).read_bytes()),
     "SHA-256 differs"),
    ("version_99", lambda f, o: _edit_spec(f, lambda s: s.__setitem__("version", 99)), "spec version 99"),
    ("missing_key", lambda f, o: _edit_spec(f, lambda s: s.pop("levels")), r"misses \['levels'\]"),
    ("not_json", lambda f, o: (f / SPEC_FILE).write_text("{not json"), "not valid JSON"),
    ("truncated", lambda f, o: (_edit_spec(f, lambda s: s.pop("weights_sha256")),
                                (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:500])),
     "damaged or truncated"),
]


@pytest.mark.parametrize("name,tamper,match", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_refuses_and_leaves_the_model(name, tamper, match, tmp_path):
    _, folder = _saved(tmp_path)
    other = tmp_path / "other"
    sb.save_branched(sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64, seed=7), seed=3,
                               progress=False), other)
    tamper(folder, other)
    base = _frozen_bn(make_model("cifar_resnet_b"))
    before = State(base)
    with pytest.raises(ValueError, match=match):
        sb.load_branched(base, folder)
    before.check(base)
    assert not sb.is_branched(base)


def test_load_restores_routing_settings_and_flags(tmp_path):
    tree = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=CALIB, progress=False)
    sb.set_routing(tree, "soft", temperature=0.25, top_k=2, balance_rate=0.1, bn_weighting=True)
    sb.save_branched(tree, tmp_path)
    loaded = sb.load_branched(_frozen_bn(make_model("cifar_resnet_b")), tmp_path)
    assert sb.tree_state(loaded).settings() == sb.tree_state(tree).settings()
    assert loaded.training and not any(m.training for m in loaded.modules() if isinstance(m, nn.BatchNorm2d))


def test_save_refuses_foreign_files(tmp_path):
    tree = sb.branch(make_model("cifar_resnet_b"), depth=1, calib_data=CALIB, progress=False)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"the user's own weights")
    with pytest.raises(FileExistsError, match="not a SigmaB save"):
        sb.save_branched(tree, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == b"the user's own weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        sb.save_branched(tree, tmp_path / "file")
    sb.save_branched(tree, tmp_path / "ok")
    sb.save_branched(tree, tmp_path / "ok")  # a SigmaB save may be overwritten by the next one
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [WEIGHTS_FILE, SPEC_FILE]


def _tree_for_training():
    tree = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=CALIB, progress=False)
    sb.set_routing(tree, "hard", temperature=0.5)
    return _frozen_bn(tree)


CFG = ft.FinetuneConfig(epochs=2, batch_size=16, progress=False, distill_weight=0.0)
FINETUNE_CASES = [
    ("label_out_of_range", dict(train_labels=LABELS + 10), ValueError, "labels span"),
    ("label_negative", dict(train_labels=LABELS - 1), ValueError, "labels span -1"),
    ("label_float", dict(train_labels=LABELS.float()), ValueError, "1-D integer tensor"),
    ("length_mismatch", dict(train_labels=LABELS[:31]), ValueError, "32 images but 31 labels"),
    ("nan_images", dict(train_images=torch.full((32, 3, 32, 32), float("nan"))), ValueError, "NaN or inf"),
    ("bad_cfg", dict(cfg="fast"), TypeError, "cfg must be a FinetuneConfig"),
]


@pytest.mark.parametrize("name,override,exc,match", FINETUNE_CASES, ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_refuses_and_leaves_the_model(name, override, exc, match):
    model = _tree_for_training()
    before = State(model)
    kwargs = {"train_images": IMGS, "train_labels": LABELS, "normalize": _norm, "cfg": CFG, **override}
    with pytest.raises(exc, match=match):
        ft.finetune(model, **kwargs)
    before.check(model)


def test_failure_during_training_restores_everything(monkeypatch):
    model = _tree_for_training()
    before = State(model)
    real, calls = ft.training_loss, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("synthetic failure in the third step")
        return real(*args, **kwargs)
    monkeypatch.setattr(ft, "training_loss", fail_on_third)
    with pytest.raises(RuntimeError, match="synthetic"):
        ft.finetune(model, IMGS, LABELS, _norm, CFG)
    before.check(model)


def test_resume_refusals_leave_the_model(tmp_path):
    model = _tree_for_training()
    ft.finetune(copy.deepcopy(model), IMGS, LABELS, _norm, CFG, out_dir=tmp_path)
    cases = [(make_model("cifar_resnet_b"), CFG, "another model"),
             (model, ft.FinetuneConfig(epochs=1, batch_size=16, progress=False, distill_weight=0.0),
              "other training settings .*epochs: 2 -> 1")]
    for target, cfg, match in cases:
        before = State(target)
        with pytest.raises(ValueError, match=match):
            ft.finetune(target, IMGS, LABELS, _norm, cfg, out_dir=tmp_path, resume=True)
        before.check(target)
    (tmp_path / ft.CHECKPOINT).write_bytes(b"\x80\x04garbage")
    before = State(model)
    with pytest.raises(ValueError, match="cannot be read as a finetune checkpoint") as info:
        ft.finetune(model, IMGS, LABELS, _norm, CFG, out_dir=tmp_path, resume=True)
    assert "weights_only" not in str(info.value)
    before.check(model)


@pytest.mark.parametrize("kwargs,match", [(dict(epochs=1.5), "epochs=1.5"), (dict(temperature_end=float("inf")), "inf"),
                                          (dict(balance_weight=-1), "balance_weight=-1"), (dict(top_k=0), "top_k=0"),
                                          (dict(objective="tree"), "objective='tree'"), (dict(augment="yes"), "augment")])
def test_finetune_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ft.FinetuneConfig(**kwargs)


@pytest.mark.parametrize("args,kwargs,match", [
    (("argmax",), {}, "routing mode 'argmax'"), (("soft",), dict(temperature=float("inf")), "temperature=inf"),
    (("soft",), dict(top_k=0), "top_k=0"), (("soft",), dict(balance_rate=-1.0), "balance_rate=-1.0"),
    (("soft",), dict(bn_weighting="yes"), "bn_weighting='yes'")])
def test_set_routing_refuses_and_leaves_settings(args, kwargs, match):
    model = _tree_for_training()
    before = State(model)
    with pytest.raises((ValueError, TypeError), match=match):
        sb.set_routing(model, *args, **kwargs)
    before.check(model)


def test_half_precision_and_meta_round_trip():
    tree = sb.branch(make_model("resnet"), depth=2, calib_data=CALIB, progress=False)
    with torch.no_grad():
        ref = tree(X)
        for dtype in (torch.float16, torch.bfloat16):
            out = copy.deepcopy(tree).to(dtype)(X.to(dtype))
            assert out.dtype == dtype and float((out.float() - ref).abs().max()) < 0.05 * float(ref.abs().max())
        meta = copy.deepcopy(tree).to("meta")
        assert meta(X.to("meta")).shape == ref.shape
        back = meta.to_empty(device="cpu")
        back.load_state_dict(tree.state_dict())
        assert torch.equal(back(X), ref)
