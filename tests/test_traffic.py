"""The memory-traffic model: with no on-chip buffer, weight bytes per inference are the independently
counted parameters of what runs times bytes per weight; a buffer only ever lowers traffic, and one
that holds everything makes weight traffic zero."""
from __future__ import annotations

import pytest

import sigmab_plugin as sb
from sigmab_plugin.routing import RoutedModule
from sigmab_plugin.traffic import traffic
from conftest import images, make_model, modules_run

X1 = images(1, seed=3)


@pytest.mark.parametrize("b", [1, 2, 4])
def test_zero_buffer_streams_every_weight_that_runs(b):
    dense = make_model("cifar_resnet_b")
    assert traffic(dense, X1, 0, b)["weight_bytes"] == b * sum(p.numel() for p in dense.parameters())
    tree = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64, seed=1), progress=False)
    t = traffic(tree, X1, 0, b)
    for leaf, row in enumerate(t["leaves"]):
        ran = modules_run(tree, lambda: sb.forward_leaf(tree, X1, leaf))
        routers = [r.routers[(leaf >> (2 - r.level)) >> 1] for r in tree.modules()
                   if isinstance(r, RoutedModule) and r.routers is not None]
        count = sum(p.numel() for m in ran | {m for r in routers for m in r.modules()} for p in m.parameters(recurse=False))
        assert row["weight_bytes"] == b * count
    assert t["weight_bytes"] == b * sb.param_report(tree)["active_params_max"]


def test_buffer_only_lowers_traffic_and_a_full_one_removes_it():
    """First-fit residency is a heuristic (a larger buffer may hold other layers), so the test checks the
    bounds, not monotonicity."""
    tree = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64, seed=1), progress=False)
    zero = traffic(tree, X1, 0, 4)
    seen = [traffic(tree, X1, int(f * zero["stored_bytes"]), 4) for f in (0.1, 0.3, 0.6, 1.0)]
    assert all(t["weight_bytes"] <= zero["weight_bytes"] for t in seen)
    assert all(t["resident_bytes"] <= f * zero["stored_bytes"] for t, f in zip(seen, (0.1, 0.3, 0.6, 1.0)))
    assert seen[-1]["weight_bytes"] == 0 and zero["weight_bytes"] > 0
    with pytest.raises(ValueError, match="batch of 1"):
        traffic(tree, images(2), 0, 4)
