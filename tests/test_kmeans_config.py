"""Spherical k-means and BranchConfig."""
from __future__ import annotations

import json

import pytest
import torch

from sigmab_plugin import BranchConfig, spherical_kmeans


def _two_cones(n=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(d), torch.zeros(d)
    a[0], b[1] = 1.0, 1.0
    x = torch.cat([a + 0.2 * torch.randn(n, d, generator=g), b + 0.2 * torch.randn(n, d, generator=g)])
    return x * (torch.rand(2 * n, 1, generator=g) * 5 + 0.1), torch.cat([torch.zeros(n), torch.ones(n)]).long()


def test_recovers_separated_directions_regardless_of_scale():
    x, truth = _two_cones()
    res = spherical_kmeans(x, 2, seed=0)
    agree = float((res.labels == truth).float().mean())
    assert max(agree, 1 - agree) == 1.0
    assert torch.allclose(res.centroids.norm(dim=1), torch.ones(2), atol=1e-5)


def test_deterministic_and_order_invariant():
    x, _ = _two_cones(seed=1)
    a = spherical_kmeans(x, 2, seed=3)
    b = spherical_kmeans(x, 2, seed=3)
    assert torch.equal(a.labels, b.labels)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    c = spherical_kmeans(x[perm], 2, seed=3)
    assert torch.equal(c.labels, a.labels[perm])


def test_min_share_and_no_empty_cluster():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g) * 0.01 + torch.ones(8)  # one tight cone: a natural split starves
    x[:3] = -x[:3]
    res = spherical_kmeans(x, 2, seed=0, min_share=0.2)
    counts = torch.bincount(res.labels, minlength=2)
    assert counts.min() >= 20
    res = spherical_kmeans(torch.ones(10, 4), 2, seed=0)  # identical points: both clusters non-empty
    assert torch.bincount(res.labels, minlength=2).min() >= 1


def test_kmeans_errors():
    with pytest.raises(ValueError, match="at least k=2"):
        spherical_kmeans(torch.randn(1, 4), 2)
    with pytest.raises(ValueError, match="non-finite"):
        spherical_kmeans(torch.full((4, 4), float("nan")), 2)


@pytest.mark.parametrize("cfg", [BranchConfig(), BranchConfig(depth=3, keep_ratio=[1.0, 0.75, 0.5]),
                                 BranchConfig(split_points=["layer1"], depth=1, coverage=False, keep_ratio=0.25)])
def test_config_round_trip(cfg):
    again = BranchConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.version == cfg.version


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=0), "depth=0"), (dict(keep_ratio=[0.5]), "keep_ratio has 1 entries for depth=2"),
    (dict(keep_ratio=float("nan")), "keep_ratio=nan"), (dict(router_tau=0), "router_tau=0"),
    (dict(split_points=["a"]), "needs exactly 2"), (dict(router_grid=0), "router_grid=0"), (dict(min_cluster_share=0.5), "min_cluster_share=0.5"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BranchConfig(**kwargs)


def test_config_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown BranchConfig field"):
        BranchConfig.from_dict({"depht": 2})
    with pytest.raises(TypeError, match="split_points must be a list"):
        BranchConfig(split_points="layer1")
