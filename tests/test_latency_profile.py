"""benchmarks.latency_profile: operator kinds, interleaved profiling and the report table."""
import torch
from torch import nn

from benchmarks import latency_profile as lp


def test_operator_kinds():
    assert lp.kind("aten::mkldnn_convolution") == "conv"
    assert lp.kind("aten::native_batch_norm") == "batch_norm"
    assert lp.kind("aten::relu_") == "elementwise" and lp.kind("aten::add_") == "elementwise"
    assert lp.kind("aten::index_select") == "routing/copies"
    assert lp.kind("aten::adaptive_avg_pool2d") == "pool/linear" and lp.kind("aten::addmm") == "pool/linear"
    assert lp.kind("aten::frobnicate") == "other"


def test_profile_and_report():
    big = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU()).eval()
    small = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(1, 3, 32, 32)
    prof = lp.profile_ms({"dense": lambda: big(x), "tree": lambda: small(x)}, runs=4, rounds=2)
    assert set(prof) == {"dense", "tree"}
    for p in prof.values():
        assert p["conv"] > 0 and p["batch_norm"] > 0
        assert abs(p["total"] - sum(v for k, v in p.items() if k not in ("total", "other_ops"))) < 1e-9
    r = {"command": "python -m benchmarks.latency_profile", "rows": [
        {"prune_residual": False, "size": 32, "batch": 1, "mac_fraction": 0.25, "ms": prof}],
        "machine": {"commit": "abc", "cpu": "cpu", "threads": 2, "date": "today"}}
    text = lp.report(r)
    assert "| False | 32 | 0.250 | tree |" in text and "Batch-1" in text


def test_batch_chooses_what_is_profiled():
    seen = []
    dense, tree, path = (lambda x, n=n: seen.append((n, x.shape[0])) for n in ("dense", "tree", "path"))
    for batch in (1, 64):
        fns = lp.calls(dense, tree, path, torch.zeros(batch, 3, 8, 8))
        for fn in fns.values():
            fn()
    assert seen == [("dense", 1), ("tree", 1), ("path", 1), ("dense", 64), ("tree", 64)]
