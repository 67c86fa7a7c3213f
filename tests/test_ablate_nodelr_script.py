"""benchmarks/ablate_nodelr.sh: each step runs the variants, lr and folder it documents (PY=echo prints them)."""
import os
import subprocess
from pathlib import Path

from conftest import option_value as value

ROOT = Path(__file__).resolve().parents[1]


def test_steps_run_their_variants(tmp_path):
    out = subprocess.run(["bash", "benchmarks/ablate_nodelr.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": "echo", "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    base, lr04, s1, *reports = [line.split() for line in out.stdout.splitlines()]
    assert value(base, "--variants") == ["aw_nodelr", "aw_nocover", "fpgm_kd"] and "--lr" not in base
    assert value(lr04, "--lr") == ["0.04"] and value(lr04, "--variants") == ["fpgm_kd", "aw_nocover"]
    assert value(s1, "--variants") == ["aw_nodelr_s1", "aw_nocover_s1", "fpgm_kd_s1"]
    assert [value(c, "--out") for c in (base, lr04, s1)] == [[f"{tmp_path}/ablate_nodelr{p}"] for p in ("", "_lr04", "_s1")]
    assert [value(c, "--report") for c in reports] == [
        [f"benchmarks/results/ablate_nodelr_r20{p}.md"] for p in ("", "_lr04", "_s1")]
    assert [value(c, "--out") for c in reports] == [[f"{tmp_path}/ablate_nodelr{p}"] for p in ("", "_lr04", "_s1")]
    from benchmarks.ablate_recipe import VARIANTS  # the variants exist and the scaled ones scale
    assert VARIANTS["aw_nodelr"][2]["node_lr_scale"] and VARIANTS["aw_nodelr_s1"][2]["node_lr_scale"]
    assert "node_lr_scale" not in VARIANTS["aw_nocover"][2]


def test_a_variant_trains_with_the_per_level_rate_only_if_it_sets_it():
    from benchmarks.ablate_recipe import VARIANTS, parse, variant_config
    a = parse(["--epochs", "2", "--lr", "0.03"])
    cfg = {name: variant_config(a, VARIANTS[name][2], VARIANTS[name][3])
           for name in ("aw_nocover", "aw_nodelr", "fpgm_kd")}
    assert not cfg["aw_nocover"].node_lr_scale and not cfg["fpgm_kd"].node_lr_scale  # what they measured
    assert cfg["aw_nodelr"].node_lr_scale
    assert all(c.epochs == 2 and c.lr == 0.03 and c.distill_weight == 1.0 for c in cfg.values())
