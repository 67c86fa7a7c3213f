"""calibrate_routing: hard routing after calibration gives each leaf its soft mass; margins match routing."""
from __future__ import annotations

import pytest
import torch

import sigmab_plugin as sb
from sigmab_plugin.calibrate import _hard_leaves, router_margins
from conftest import images, make_model

CALIB = images(64, seed=1)
DATA = images(96, seed=5)


def _tree(depth=2, family="cifar_resnet_b"):
    return sb.branch(make_model(family), depth=depth, calib_data=CALIB, progress=False).eval()


def _hedge(model, shift):
    """Push every router's margin by ``shift``: routers that hedge (soft mass far from hard shares)."""
    for m in model.modules():
        if isinstance(m, sb.routing.CosineRouter):
            with torch.no_grad():
                m.balance.add_(torch.tensor([shift / 2, -shift / 2]))


def _shares(model, x):
    leaves = sb.route(model, x)
    return (torch.bincount(leaves, minlength=2 ** sb.tree_state(model).depth).double() / len(x)).tolist()


@pytest.mark.parametrize("depth,family", [(2, "cifar_resnet_b"), (3, "resnet")])
def test_margins_reproduce_hard_routing(depth, family):
    model = _tree(depth, family)
    margins = router_margins(model, DATA, batch_size=40)  # several batches per forced pass
    assert len(margins) == 2 ** depth - 1 and all(len(m) == len(DATA) for m in margins.values())
    assert torch.equal(_hard_leaves(margins, depth), sb.route(model, DATA))


@pytest.mark.parametrize("depth", [2, 3])
def test_calibrated_hard_shares_follow_the_soft_mass(depth):
    model = _tree(depth, "resnet")
    _hedge(model, -2.0)  # most samples to child 1 everywhere; the soft mass at T=4 stays spread
    leaves_before = sb.route(model, DATA)
    rep = sb.calibrate_routing(model, DATA, temperature=4.0, batch_size=32)
    after = _shares(model, DATA)
    assert after == pytest.approx(rep["leaf_share_after"])  # the report says what routing now does
    assert rep["leaf_share_before"] == pytest.approx(
        (torch.bincount(leaves_before, minlength=2 ** depth).double() / len(DATA)).tolist())
    gap_before = max(abs(a - b) for a, b in zip(rep["leaf_share_before"], rep["leaf_mass"]))
    gap_after = max(abs(a - b) for a, b in zip(after, rep["leaf_mass"]))
    assert gap_before > 0.15 and gap_after <= depth / len(DATA) + 1e-9  # one sample of rounding per level
    again = sb.calibrate_routing(model, DATA, shares=rep["leaf_mass"])  # the same target: nothing moves
    assert _shares(model, DATA) == after and again["leaf_share_before"] == pytest.approx(after)
    uniform = sb.calibrate_routing(model, DATA, shares=[1] * 2 ** depth)
    assert uniform["leaf_mass"] == pytest.approx([2 ** -depth] * 2 ** depth)
    assert max(abs(a - 2 ** -depth) for a in _shares(model, DATA)) <= depth / len(DATA) + 1e-9


def test_calibration_only_moves_thresholds_and_survives_save_load(tmp_path):
    model = _tree(2, "resnet")
    margins = router_margins(model, DATA)
    _hedge(model, 1.5)
    sb.calibrate_routing(model, DATA, temperature=1.0)
    shifted = router_margins(model, DATA)
    for key, m in margins.items():  # the order of samples along each router is unchanged
        d = shifted[key] - m
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-4)
    sb.save_branched(model, tmp_path / "tree")
    loaded = sb.load_branched(make_model("resnet"), tmp_path / "tree").eval()
    assert torch.equal(sb.route(loaded, DATA), sb.route(model, DATA))


def test_bad_input_is_refused_and_the_model_untouched():
    model = _tree()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="temperature"):
            sb.calibrate_routing(model, DATA, temperature=t)
    for shares in ([0.5, 0.5], [1, 1, -1, 1], [0, 0, 0, 0], "abc", [1, 1, float("nan"), 1]):
        with pytest.raises(ValueError, match="shares="):
            sb.calibrate_routing(model, DATA, shares=shares)
    with pytest.raises(ValueError, match="at least one"):
        sb.calibrate_routing(model, DATA[:0])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_forward_fn_and_loaders_are_honoured():
    from torch.utils.data import DataLoader, TensorDataset
    from test_forward_fn import dict_model, fwd

    plain, wrapped = _tree(2, "resnet"), sb.branch(dict_model(), depth=2, calib_data=CALIB, progress=False,
                                                    forward_fn=fwd).eval()
    _hedge(plain, -1.0)
    _hedge(wrapped, -1.0)
    a = sb.calibrate_routing(plain, DataLoader(TensorDataset(DATA, torch.zeros(len(DATA))), batch_size=30))
    b = sb.calibrate_routing(wrapped, DATA, forward_fn=fwd)
    assert a["offsets"] == pytest.approx(b["offsets"], abs=1e-5)
    with pytest.raises(TypeError):
        sb.calibrate_routing(wrapped, DATA)  # the model needs its forward_fn
