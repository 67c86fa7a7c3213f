"""benchmarks/tiny_imagenet.sh: every step and environment option reaches the commands it runs (PY=echo prints
them), and a fine-tuning step without the adapted dense model is refused."""
import os
import subprocess
from pathlib import Path

from conftest import option_value as value

ROOT = Path(__file__).resolve().parents[1]


def run(steps, **env):
    return subprocess.run(["bash", "benchmarks/tiny_imagenet.sh", *steps], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PY": "echo", **env})


def commands(steps, **env) -> list:
    out = run(steps, **env)
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


def test_adapt_trains_the_cifar100_network_on_tiny_imagenet(tmp_path):
    (cmd,) = commands(["adapt"], OUT=str(tmp_path), PRE_EPOCHS="3", PRE_LR="0.05")
    assert value(cmd, "--checkpoint") == ["../shared/weights/cifar100_resnet56-f2eff4c8.pt"]
    assert value(cmd, "--pretrain-epochs") == ["3"] and value(cmd, "--epochs") == ["0"]
    assert value(cmd, "--pretrain-lr") == ["0.05"] and "--reset-classifier" in cmd  # CIFAR-100's head, not these classes
    (default,) = commands(["adapt"], OUT=str(tmp_path))
    assert value(default, "--pretrain-lr") == ["0.02"] and value(default, "--pretrain-epochs") == ["2"]
    assert value(cmd, "--data") == ["tiny-imagenet-100-32"] and value(cmd, "--shortcut") == ["B"]
    assert value(cmd, "--methods") == ["dense"] and value(cmd, "--out") == [f"{tmp_path}/adapt"]


def test_every_step_fine_tunes_the_adapted_model(tmp_path):
    ckpt = tmp_path / "adapt" / "pretrain" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    compare, split, dense = commands(["compare", "split", "dense"], OUT=str(tmp_path), EPOCHS="3", FRACTION="0.30",
                                     SEED="1")
    for cmd in (compare, split, dense):
        assert value(cmd, "--checkpoint") == [str(ckpt)] and value(cmd, "--epochs") == ["3"]
        assert value(cmd, "--target-fraction") == ["0.30"] and value(cmd, "--seed") == ["1"]
    (default,) = commands(["compare"], OUT=str(tmp_path))
    assert value(default, "--epochs") == ["1"] and value(default, "--target-fraction") == ["0.40"]
    assert value(compare, "--methods") == ["sigmab", "fpgm", "hrank"] and "--static-shape" not in compare
    assert value(split, "--methods") == ["fpgm"] and value(split, "--static-shape") == ["tree"]
    assert value(dense, "--methods") == ["dense"]
    assert value(compare, "--out") == value(dense, "--out") == [f"{tmp_path}/runs/resnet56_f0.30_s1"]
    assert value(split, "--out") == [f"{tmp_path}/runs/resnet56_f0.30_s1_treealloc"]


def test_fine_tuning_without_the_adapted_model_is_refused(tmp_path):
    out = run(["compare"], OUT=str(tmp_path))
    assert out.returncode == 2 and "run the adapt step first" in out.stderr and not out.stdout


def test_methods_and_an_adapted_model_from_another_run(tmp_path):
    ckpt = tmp_path / "elsewhere.pt"
    ckpt.write_bytes(b"")
    (cmd,) = commands(["compare"], OUT=str(tmp_path / "e3"), DENSE=str(ckpt), METHODS="sigmab fpgm")
    assert value(cmd, "--methods") == ["sigmab", "fpgm"] and value(cmd, "--checkpoint") == [str(ckpt)]
    assert value(cmd, "--out") == [f"{tmp_path}/e3/runs/resnet56_f0.40_s0"]
    out = run(["dense"], OUT=str(tmp_path), DENSE=str(tmp_path / "missing.pt"))
    assert out.returncode == 2 and f"{tmp_path}/missing.pt" in out.stderr and not out.stdout


def test_each_epoch_count_reports_to_its_own_file(tmp_path):
    (one,) = commands(["report"], OUT=str(tmp_path))
    (three,) = commands(["report"], OUT=str(tmp_path), EPOCHS="3")
    assert one[:5] == ["-m", "benchmarks.report_long", f"{tmp_path}/runs", "benchmarks/results", "tiny_imagenet"]
    assert three[4] == "tiny_imagenet_e3" and "benchmarks/results/tiny_imagenet.json" not in three


def test_extra_options_run_in_a_tagged_folder(tmp_path):
    ckpt = tmp_path / "adapt" / "pretrain" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    (cmd,) = commands(["compare"], OUT=str(tmp_path), METHODS="sigmab", EXTRA="--node-lr-scale --top-k 2",
                      TAG="nodelr")
    assert value(cmd, "--methods") == ["sigmab"] and "--node-lr-scale" in cmd and value(cmd, "--top-k") == ["2"]
    assert value(cmd, "--out") == [f"{tmp_path}/runs/resnet56_f0.40_s0_nodelr"]
    out = run(["compare"], OUT=str(tmp_path), EXTRA="--node-lr-scale")  # would mix into the plain run's folder
    assert out.returncode == 2 and "needs a TAG" in out.stderr and not out.stdout
