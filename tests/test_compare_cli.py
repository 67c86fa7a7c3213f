"""examples/compare_baselines.py end to end on a tiny configuration, and its argument errors."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_baselines", ROOT / "examples" / "compare_baselines.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

TINY = ["--quiet", "--epochs", "1", "--pretrain-epochs", "1", "--train-limit", "192", "--test-limit", "96",
        "--calib-size", "64", "--batch-size", "64"]


def test_runs_end_to_end_and_records_one_budget(tmp_path, capsys):
    rows = cli.main(TINY + ["--out", str(tmp_path)])
    table = capsys.readouterr().out
    methods = ["dense", "sigmab", "fpgm", "hrank", "fpgm_nni"]
    assert [r["method"] for r in rows] == methods
    for name in methods:
        assert name in table
    for f in ("results.json", "results.csv", "top1_vs_active.png"):
        assert (tmp_path / f).stat().st_size > 0
    with open(tmp_path / "results.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == methods
    # every method got the same fine-tuning budget, data and seed ...
    for key in ("finetune", "train_images", "test_images", "seed", "data", "model"):
        assert len({json.dumps(r[key], sort_keys=True) for r in rows}) == 1, key
    # ... and every static method the same active-parameter budget: SigmaB's largest path
    sig = next(r for r in rows if r["method"] == "sigmab")
    for r in rows:
        if r["method"] in ("fpgm", "hrank", "fpgm_nni"):
            assert r["budget"] == sig["active_params"] and r["within_budget"]
            assert r["active_params"] >= 0.9 * sig["active_params"]
    assert sum(sig["leaf_histogram"]) == 96
    assert (tmp_path / "sigmab" / "tree" / "sigmab_spec.json").is_file()


def test_sweep_writes_one_plot_over_budgets(tmp_path):
    rows = cli.main(TINY + ["--methods", "sigmab", "fpgm", "--sweep", "0.5", "1.0", "--no-residual",
                            "--out", str(tmp_path)])
    assert len(rows) == 4 and (tmp_path / "top1_vs_active.png").is_file()
    assert (tmp_path / "keep0.5" / "results.json").is_file() and (tmp_path / "keep1.0" / "results.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--methods", "magic"], "unknown method"),
    (["--keep-ratio", "1.5"], "keep ratio 1.5"),
    (["--data", "mnist"], "invalid choice"),
])
def test_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--target-fraction", "0.01", "--methods", "sigmab"], "target active fraction 0.01"),
])
def test_runtime_errors_are_reported(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + args + ["--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
