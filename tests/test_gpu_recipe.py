"""The GPU recipe's code path, run on CPU at tiny size (the real run needs a GPU)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_recipe_runs_on_cpu_at_tiny_size(tmp_path, shared_dir):
    spec = importlib.util.spec_from_file_location("gpu_recipe", ROOT / "benchmarks" / "gpu_recipe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--data-root", str(shared_dir / "data"), "--tiny", "--device", "cpu", "--model", "resnet18",
                     "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["dense", "sigmab", "fpgm", "hrank"]
    meta = json.loads((tmp_path / "recipe.json").read_text())
    assert meta["machine"]["torch"] and (tmp_path / "results.csv").is_file()
    assert all(0 < r["active_fraction"] <= 1 for r in rows)
