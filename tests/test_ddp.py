"""Distributed fine-tuning under torchrun (2 CPU processes, gloo): hard-routed epochs leave leaves and
routers unused on a rank without hanging, both ranks end with identical weights, rank 0 alone writes
the checkpoint, and a resumed run continues from it. nn.DataParallel is refused with a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sigmab_plugin as sb
from conftest import images, make_model

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(out: Path, epochs: int, stop: int = 0) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), str(epochs), str(stop)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_process_ddp_run_agrees_and_resumes(tmp_path):
    ranks = _torchrun(tmp_path, 3, stop=2)  # interrupted after epoch 2; epochs 2-3 hard (unused leaves)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["epochs"] == [1, 2]
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]  # one writer
    assert (tmp_path / "checkpoint.pt").is_file() and not list(tmp_path.glob("*.tmp"))
    resumed = _torchrun(tmp_path, 3)
    assert resumed[0]["epochs"] == [1, 2, 3] and resumed[0]["digest"] == resumed[1]["digest"]
    assert resumed[0]["digest"] != ranks[0]["digest"]


def test_data_parallel_is_refused():
    """nn.DataParallel replicates each module per GPU (``_replicate_for_data_parallel``); without GPUs here,
    the replication of the routed units is done by hand."""
    model = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(64, seed=1), progress=False)
    model.layer2 = model.layer2._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        with torch.no_grad():
            model(images(4))
