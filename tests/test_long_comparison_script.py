"""benchmarks/long_comparison.sh: every environment option reaches the commands it runs (PY=echo prints them)."""
import os
import subprocess
from pathlib import Path

import pytest
from conftest import option_value as value

ROOT = Path(__file__).resolve().parents[1]


def commands(**env) -> list:
    out = subprocess.run(["bash", "benchmarks/long_comparison.sh", "r20"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": "echo", **env})
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


def test_plain_run_covers_every_budget_without_a_refit():
    cmds = commands()
    assert [(value(c, "--target-fraction"), value(c, "--seed")) for c in cmds] == [
        (["0.40"], ["0"]), (["0.40"], ["1"]), (["0.30"], ["0"]), (["0.30"], ["1"]), (["0.55"], ["0"]),
        (["0.45"], ["0"]), (["0.45"], ["1"])]
    assert value(cmds[-1], "--methods") == value(cmds[-2], "--methods") == ["sigmab"]
    assert value(cmds[0], "--methods") == ["dense", "sigmab", "fpgm", "hrank"]
    assert all("--reconstruct" not in c for c in cmds)


def test_default_epochs_are_those_of_the_committed_report():
    """A user rerunning the script must get the rows the report holds (it once defaulted to 5 epochs, the report 4)."""
    import json
    rows = json.loads((ROOT / "benchmarks/results/long_comparison.json").read_text())["rows"]
    for step, model in (("r20", "resnet20"), ("r56", "resnet56")):
        out = subprocess.run(["bash", "benchmarks/long_comparison.sh", step], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PY": "echo"})
        assert out.returncode == 0, out.stderr
        epochs = {value(line.split(), "--epochs")[0] for line in out.stdout.splitlines()}
        assert epochs == {str(r["finetune"]["epochs"]) for r in rows if r["model"] == model}, step


def test_only_methods_epochs_recon_and_ridge_reach_the_command():
    (cmd,) = commands(ONLY="f0.30_s0", METHODS="fpgm sigmab", EPOCHS_R20="4", RECON="1", RIDGE="0.01 fpgm=1")
    assert value(cmd, "--methods") == ["sigmab", "fpgm"] and value(cmd, "--epochs") == ["4"]
    assert "--reconstruct" in cmd and value(cmd, "--reconstruct-ridge") == ["0.01", "fpgm=1"]
    assert value(cmd, "--out") == ["runs/long/resnet20_f0.30_s0_recon_0.01_fpgm=1"]
    (plain,) = commands(ONLY="f0.40_s1", RECON="1")  # the refit's own folder, and no dense model
    assert value(plain, "--out") == ["runs/long/resnet20_f0.40_s1_recon"] and "dense" not in plain


@pytest.mark.parametrize("env", [{"RIDGE": "1"}, {"RECON": "0", "RIDGE": "1"}])
def test_ridge_without_refit_is_refused(env):
    out = subprocess.run(["bash", "benchmarks/long_comparison.sh", "r20"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": "echo", **env})
    assert out.returncode == 2 and "needs RECON=1" in out.stderr and not out.stdout


def test_tag_gives_every_run_its_own_folder_and_no_dense_model():
    cmds = commands(TAG="aw")
    assert [value(c, "--out")[0] for c in cmds] == [f"runs/long/resnet20_{r}_aw" for r in
                                                      ("f0.40_s0", "f0.40_s1", "f0.30_s0", "f0.30_s1", "f0.55_s0",
                                                       "f0.45_s0", "f0.45_s1")]
    assert "dense" not in value(cmds[0], "--methods")  # the untagged run's dense row stands
    (both,) = commands(TAG="aw", ONLY="f0.30_s0", RECON="1")
    assert value(both, "--out") == ["runs/long/resnet20_f0.30_s0_recon_aw"]


def test_modelnet40_stem_names_the_report_and_its_prior(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    out = subprocess.run(["bash", "benchmarks/modelnet40.sh", "report"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": "echo", "STEM": "x", "RESULTS": str(tmp_path), "OUT": "runs/o"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-m", "benchmarks.report_long", "runs/o/runs", str(tmp_path), "x",
                                  "benchmarks/modelnet40.sh", "1.72", "--prior", str(tmp_path / "x.json")]


def test_static_shape_and_keep_shape_reach_the_command_and_their_own_folder():
    (cmd,) = commands(ONLY="f0.40_s0", STATIC_SHAPE="tree", KEEP_SHAPE="1 0.7", TAG="aw")
    assert value(cmd, "--static-shape") == ["tree"] and value(cmd, "--keep-shape") == ["1", "0.7"]
    assert value(cmd, "--out") == ["runs/long/resnet20_f0.40_s0_treealloc_shape1_0.7_aw"]
    assert "dense" not in value(cmd, "--methods")  # the plain run's dense row stands


def test_router_grid_reaches_the_command_and_its_own_folder():
    (cmd,) = commands(ONLY="f0.30_s1", ROUTER_GRID="2", METHODS="sigmab")
    assert value(cmd, "--router-grid") == ["2"] and value(cmd, "--methods") == ["sigmab"]
    assert value(cmd, "--out") == ["runs/long/resnet20_f0.30_s1_grid2"]


def test_node_lr_reaches_the_command_and_its_own_folder():
    (cmd,) = commands(ONLY="f0.40_s1", NODE_LR="1", METHODS="sigmab")
    assert "--node-lr-scale" in cmd and value(cmd, "--out") == ["runs/long/resnet20_f0.40_s1_nodelr"]
    (plain,) = commands(ONLY="f0.40_s1", METHODS="sigmab")
    assert "--node-lr-scale" not in plain and "--no-node-lr-scale" not in plain
    (old,) = commands(ONLY="f0.40_s1", METHODS="sigmab", NODE_LR="0")  # the committed plain rows' recipe
    assert "--no-node-lr-scale" in old and value(old, "--out") == ["runs/long/resnet20_f0.40_s1"]
    bad = subprocess.run(["bash", "benchmarks/long_comparison.sh", "r20"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": "echo", "NODE_LR": "yes"})
    assert bad.returncode == 2 and "NODE_LR=yes" in bad.stderr and not bad.stdout


def modelnet40_commands(tmp_path, **env) -> list:
    ckpt = tmp_path / "pretrain" / "pretrain" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.touch()
    out = subprocess.run(["bash", "benchmarks/modelnet40.sh", "compare"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": "echo", "OUT": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


def test_modelnet40_compare_runs_every_budget_and_method_by_default(tmp_path):
    cmds = modelnet40_commands(tmp_path)
    assert [(value(c, "--target-fraction"), value(c, "--methods"), value(c, "--seed")) for c in cmds] == [
        (["0.40"], ["dense", "sigmab", "fpgm", "hrank"], ["0"]), (["0.30"], ["sigmab", "fpgm", "hrank"], ["0"])]
    assert [value(c, "--out")[0].rsplit("/", 1)[1] for c in cmds] == ["pointnet2_ssg_f0.40_s0", "pointnet2_ssg_f0.30_s0"]


def test_modelnet40_fracs_methods_seed_and_tag_reach_the_command(tmp_path):
    (cmd,) = modelnet40_commands(tmp_path, FRACS="0.40", METHODS="sigmab fpgm", SEED="1", TAG="nodelr")
    assert value(cmd, "--methods") == ["sigmab", "fpgm"] and value(cmd, "--seed") == ["1"]
    assert value(cmd, "--out") == [str(tmp_path / "runs" / "pointnet2_ssg_f0.40_s1_nodelr")]
    assert modelnet40_commands(tmp_path, FRACS="0.30", METHODS="dense") == []  # dense runs at 0.40 only
    bad = subprocess.run(["bash", "benchmarks/modelnet40.sh", "compare"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": "echo", "OUT": str(tmp_path), "METHODS": "sigmb"})
    assert bad.returncode == 2 and "sigmb" in bad.stderr and not bad.stdout


@pytest.mark.parametrize("script", ["long_comparison", "modelnet40", "tiny_imagenet", "ablate_nodelr", "real_results"])
def test_benchmark_scripts_print_their_header_and_refuse_unknown_steps(script):
    run = lambda *args: subprocess.run(["bash", f"benchmarks/{script}.sh", *args], cwd=ROOT, capture_output=True,
                                       text=True, env={**os.environ, "PY": "echo"})
    header = [line[2:] for line in (ROOT / f"benchmarks/{script}.sh").read_text().splitlines()[1:4]]
    out = run("--help")
    assert out.returncode == 0 and out.stdout.splitlines()[:3] == header, out.stderr
    bad = run("report", "reprot")  # refused before the valid step runs
    assert bad.returncode == 2 and "no step 'reprot'" in bad.stderr and not bad.stdout
