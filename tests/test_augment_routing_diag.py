"""benchmarks.augment_routing_diag: routes a finished run's test clouds as the harness did ("none" gives the
harness's own top-1 and leaf histogram), each condition changes the inputs as it says, and a run on images is
refused."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks import augment_routing_diag as diag
from conftest import write_point_npz
from sigmab_plugin.baselines.points import PointDataset, drop_points

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_baselines", ROOT / "examples" / "compare_baselines.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def test_each_condition_changes_only_what_it_names():
    ds = PointDataset("p", None, None, ["a"], (0.0,), (1.0,))
    x = torch.randn(4, 3, 64)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    c = diag.conditions(ds)
    assert torch.equal(c["none"](x, gen()), x)
    assert torch.equal(c["scale x1.5"](x, gen()), 1.5 * x)
    dropped = c["dropout 0.5"](x, gen())
    moved = (dropped != x).any(1)  # points replaced by the first point
    assert 0.3 < moved.float().mean() < 0.7
    assert torch.equal(torch.where(moved.unsqueeze(1), x[:, :, :1].expand_as(x), x), dropped)
    assert torch.equal(drop_points(x, 0.0, gen()), x)  # ratio 0 drops nothing, 1 every point
    assert torch.equal(drop_points(x, 1.0, gen()), x[:, :, :1].expand_as(x))
    shift = c["shift +-0.2"](x, gen()) - x  # one offset per cloud and axis, nothing else
    assert shift.abs().max() <= 0.2 + 1e-6 and torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-6)
    scaled = c["anisotropic scale 0.67-1.50"](x, gen()) / x  # one factor per cloud and axis
    assert torch.allclose(scaled, scaled[:, :, :1].expand_as(scaled), atol=1e-5)
    assert 2 / 3 - 1e-5 <= scaled.min() <= scaled.max() <= 1.5 + 1e-5
    assert not torch.equal(c["all (training augmentation)"](x, gen()), x)


def test_routes_a_finished_run_as_the_harness_did(tmp_path):
    write_point_npz(tmp_path / "data")
    run = tmp_path / "run"
    row, = cli.main(["--quiet", "--epochs", "1", "--calib-size", "32", "--batch-size", "16", "--data", "modelnet40",
                     "--data-root", str(tmp_path / "data"), "--model", "pointnet2_ssg", "--width", "0.125",
                     "--keep-ratio", "0.5", "--device", "cpu", "--methods", "sigmab", "--out", str(run)])
    diag.main([str(run), "--out", str(tmp_path / "report")])
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert [r["condition"] for r in rows] == list(diag.conditions(PointDataset("p", None, None, [], (0.0,), (1.0,))))
    none = rows[0]
    n = sum(row["leaf_histogram"])
    assert none["top1"] == pytest.approx(row["top1"])
    assert none["leaf_shares"] == pytest.approx([h / n for h in row["leaf_histogram"]])
    assert all(abs(sum(r["leaf_shares"]) - 1) < 1e-9 for r in rows)
    text = (tmp_path / "report.md").read_text()
    assert f"python -m benchmarks.augment_routing_diag {run}" in text and "| dropout 0.75 |" in text

    # --limit routes only the first N clouds; --seed draws other augmentations
    seen = {}

    def spy(tree, x, y):
        seen.setdefault(spy.seed, []).append(x)
        return diag_evaluate(tree, x, y)
    diag_evaluate = diag.evaluate
    for spy.seed in (0, 1):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(diag, "evaluate", spy)
            diag.main([str(run), "--limit", "8", "--seed", str(spy.seed), "--out", str(tmp_path / f"s{spy.seed}")])
    assert all(len(x) == 8 for x in seen[0] + seen[1])
    assert torch.equal(seen[0][0], seen[1][0])  # "none": the same clouds
    assert not torch.equal(seen[0][-1], seen[1][-1])  # "all": another draw of the training augmentation


def test_a_run_on_images_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": {"data": "digits", "data_root": None, "seed": 0}}))
    with pytest.raises(SystemExit, match="not a point-cloud data set"):
        diag.measure(str(run))
