"""branch() reads the data once for clustering and channel statistics, and its router refit reuses
that pass; the two-pass and dense-forward fallbacks give the same tree (issue 11, faster branch())."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import sigmab_plugin as sb
from sigmab_plugin import _calib

from conftest import images, make_model

X = images(96, seed=3)


def _outputs(family: str, data, depth: int = 2, **kw) -> torch.Tensor:
    model = make_model(family).eval()
    sb.branch(model, depth=depth, calib_data=data, keep_ratio=0.5, progress=False, calib_batch_size=32, **kw)
    with torch.no_grad():
        return model(X[:24])


@pytest.mark.parametrize("family,depth", [("resnet", 2), ("mobilenetv3", 2), ("cifar_resnet_a", 3)])
def test_one_pass_statistics_equal_the_second_pass(family, depth, monkeypatch):
    one = _outputs(family, X, depth)
    monkeypatch.setattr(_calib, "PER_SAMPLE_STATS_BYTES", 0)  # forces pass 2 (per-node sums)
    calls = []
    real = _calib.channel_stats
    monkeypatch.setattr(_calib, "channel_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    two = _outputs(family, X, depth)
    assert calls, "the memory bound did not switch pass 2 on"
    torch.testing.assert_close(one, two, rtol=0, atol=1e-6)


def test_shuffled_loader_refits_from_a_dense_forward():
    """A shuffled DataLoader gives other batches on every pass: the refit must not take pass 1's
    paths for them (the fingerprints differ) and must match the tree calibrated on a fixed tensor."""
    fixed = _outputs("resnet", X)
    loader = DataLoader(TensorDataset(X), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    shuffled = _outputs("resnet", loader)
    torch.testing.assert_close(fixed, shuffled, rtol=1e-4, atol=1e-4)


def test_stale_paths_would_change_the_routers(monkeypatch):
    """The fingerprint check matters: refitting shuffled batches with pass 1's paths by position
    gives other routers (so the test above can fail)."""
    fixed = _outputs("resnet", X)
    monkeypatch.setattr(_calib, "fingerprint", lambda x: torch.zeros(x.shape[0], 2, dtype=torch.float64))
    loader = DataLoader(TensorDataset(X), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    stale = _outputs("resnet", loader)
    assert (fixed - stale).abs().max() > 1e-3


def test_branch_runs_the_dense_head_once_per_batch():
    """Pass 1 is the only full forward: no pass 2, no dense refit forward, and the refit's tree
    forward stops at the last router (the head never sees a calibration batch again)."""
    model = make_model("resnet").eval()
    seen = []
    model.fc.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    sb.branch(model, depth=2, calib_data=X, keep_ratio=0.5, progress=False, calib_batch_size=32)
    assert seen.count(32) == len(X) // 32, seen


def test_one_shot_data_is_refused_with_the_model_left_alone():
    model = make_model("resnet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Once:
        def __init__(self):
            self.gen = iter([X[i:i + 32] for i in range(0, 96, 32)])

        def __iter__(self):
            return self.gen
    # prepare() reads the first batch for the example input, so the data pass sees the other two
    with pytest.raises(ValueError, match="64 samples on its first pass and 0 on its second"):
        sb.branch(model, depth=2, calib_data=Once(), progress=False)
    assert not sb.is_branched(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_calibration_batches_reach_the_model_channels_last():
    model = make_model("resnet").eval()
    seen = []
    model.conv1.register_forward_pre_hook(
        lambda m, inp: seen.append((inp[0].shape[0], inp[0].is_contiguous(memory_format=torch.channels_last))))
    sb.branch(model, depth=2, calib_data=X, keep_ratio=0.5, progress=False, calib_batch_size=32)
    calib = [cl for rows, cl in seen if rows == 32]  # pass 1 and the refit (the trace runs 2 rows)
    assert len(calib) >= len(X) // 32 and all(calib), seen
