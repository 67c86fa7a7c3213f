"""The GPU recipe's code path, run on CPU at tiny size (the real run needs a GPU)."""
from __future__ import annotations

import importlib
import json


def test_gpu_recipe_runs_on_cpu_at_tiny_size(tmp_path, shared_dir):
    mod = importlib.import_module("benchmarks.gpu_recipe")
    rows = mod.main(["--data-root", str(shared_dir / "data"), "--tiny", "--device", "cpu", "--model", "resnet18",
                     "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["dense", "sigmab", "fpgm", "hrank"]
    meta = json.loads((tmp_path / "recipe.json").read_text())
    assert meta["machine"]["torch"] and (tmp_path / "results.csv").is_file()
    assert all(0 < r["active_fraction"] <= 1 for r in rows)
