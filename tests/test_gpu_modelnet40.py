"""benchmarks.gpu_modelnet40: the lossless repack of the ModelNet40 npz and the epoch sizing from the probes."""
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import gpu_modelnet40 as g

A = SimpleNamespace(pretrain_share=0.5, max_pretrain_epochs=60, max_epochs=12)


def test_repack_keeps_every_array_and_unpack_gives_a_plain_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train_points": rng.standard_normal((20, 64, 3)).astype(np.float16),
              "train_labels": rng.integers(0, 40, 20), "classes": np.array(["airplane", "bathtub"])}
    np.savez_compressed(tmp_path / "src.npz", **arrays)
    (tmp_path / "packed").mkdir()
    g.main(["--repack", str(tmp_path / "src.npz"), str(tmp_path / "packed" / g.NPZ)])
    root = g.unpack(str(tmp_path / "packed"), tmp_path / "plain")
    for folder in (tmp_path / "packed", tmp_path / root):
        with np.load(folder / g.NPZ) as z:
            assert sorted(z.files) == sorted(arrays)
            for k, v in arrays.items():
                assert z[k].dtype == v.dtype and np.array_equal(z[k], v)


def test_epochs_fit_the_time_left_and_the_slowest_contended_run():
    alone = {"step_seconds": 0.1}
    # 400 s, half for pretraining: (200 - 20) / (1.15 * 77 * 0.1) = 20.3 epochs
    assert g.pretrain_epochs(A, 77, alone, 400) == 20
    assert g.pretrain_epochs(A, 77, {"step_seconds": 100.0}, 400) == 1  # never below one epoch
    assert g.pretrain_epochs(A, 77, {"step_seconds": 1e-6}, 400) == 60  # nor above the cap
    together = [{"kind": "static", "step_seconds": 0.2, "branch_seconds": 0},
                {"kind": "tree", "step_seconds": 0.3, "branch_seconds": 5}]
    # the tree's search builds up to 8 trees (40 s); (300 - 40 - 40) / (1.15 * 77 * 0.3) = 8.3 epochs
    assert g.finetune_epochs(A, 77, together, 300) == 8
    slower = [{**p, "step_seconds": 0.6} for p in together]
    assert g.finetune_epochs(A, 77, slower, 300) == 4  # the slowest run sets everyone's epochs
    # no tree probe came back: twice the static step, and 30 s for the search: (300 - 30 - 40) / (1.15 * 77 * 0.4)
    assert g.finetune_epochs(A, 77, together[:1], 300) == 6


def test_a_later_session_starts_from_saved_weights_with_fixed_epochs_and_extra_options(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / g.NPZ, train_points=rng.standard_normal((8, 1024, 3)).astype(np.float16),
             train_labels=np.arange(8) % 2, test_points=rng.standard_normal((4, 1024, 3)).astype(np.float16),
             test_labels=np.arange(4) % 2, classes=np.array(["a", "b"]))
    weights = tmp_path / "dense.safetensors"
    weights.write_bytes(b"stand-in")
    pools = []
    monkeypatch.setattr(g, "run_pool", lambda jobs, workers, deadline, logs: pools.append(jobs) or [])
    monkeypatch.setattr(g, "report", lambda out: None)  # of runs that did not run
    meta = g.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--pretrained", str(weights),
                   "--epochs", "3", "--methods", "sigmab", "fpgm", "--extra", "--reconstruct --reconstruct-ridge 0.5",
                   "--batch-size", "48", "--width", "0.5", "--calib-size", "96", "--device", "cpu", "--seed", "1"])
    assert len(pools) == 1  # no probe, no pretraining: only the comparison
    jobs = pools[0]
    # the seed reaches every run and names its folder (a second seed's runs stand beside the first's)
    assert sorted(j["name"] for j in jobs) == sorted(f"pointnet2_ssg_f{f}_s1_{m}" for f in ("0.40", "0.30")
                                                     for m in ("sigmab", "fpgm"))
    for j in jobs:
        cmd = j["cmd"]
        assert cmd[cmd.index("--checkpoint") + 1] == str(weights) and cmd[cmd.index("--epochs") + 1] == "3"
        assert cmd[cmd.index("--reconstruct-ridge") + 1] == "0.5" and "--reconstruct" in cmd
        assert [cmd[cmd.index(k) + 1] for k in ("--batch-size", "--width", "--calib-size", "--device", "--seed")] == \
            ["48", "0.5", "96", "cpu", "1"]
        assert cmd[cmd.index("--out") + 1].endswith(f"/runs/{j['name']}")
    assert meta["epochs"] == 3 and (tmp_path / "out" / "results.tar.gz").is_file()


@pytest.mark.parametrize("args, message", [(["--pretrained", "missing.safetensors"], "no such file"),
                                           (["--epochs", "0"], "must be >= 1")])
def test_bad_options_are_refused_before_anything_runs(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        g.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out")] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "out").exists()
