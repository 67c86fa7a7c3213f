"""The ModelNet40 comparison (benchmarks/modelnet40.sh) at full width on one GPU inside a deadline (issue 9).

A lent GPU gives about 10 minutes for a command, and how fast PointNet++ trains there (its sampling
is a loop of small kernels) and how seven runs share the GPU is not known ahead. So the driver
measures first and sizes the schedules from the measurement:

1. probe: one process times dense training steps from scratch (the pretraining's step); then one
   process per comparison run (SigmaB trees and static models, each with the distillation teacher)
   times its training steps while all of them run at once, started together, so the time includes
   their contention. The probes use random weights: only time is read from them.
2. pretrain: the dense PointNet++ trained from scratch (``compare_baselines.py --pretrain-epochs``)
   for as many epochs as fit its share of the time left.
3. compare: from that dense model, every run of modelnet40.sh as its own ``compare_baselines.py``
   process, all at once (dense fine-tuned, SigmaB/FPGM/HRank at active 0.40 and 0.30), with the same
   epochs for every run, as many as fit; a run still going at the deadline is stopped and listed.
4. report: ``benchmarks.report_long`` over the runs, then one archive of every results.json, per-epoch
   log and process log, and the dense weights (safetensors), so they survive the machine.

    python -m benchmarks.gpu_modelnet40 --data-root DIR --out runs/modelnet40_gpu [--budget 520]
    python -m benchmarks.gpu_modelnet40 --data-root DIR --out OUT --tiny --device cpu --width 0.125  # smoke test

A later session can spend its whole lease on the comparison: ``--pretrained`` starts from the dense
weights an earlier run saved (no pretraining), ``--epochs`` fixes the fine-tuning epochs (no probes),
``--methods`` picks runs, ``--seed`` sets the runs' seed (and their folders' ``_s<seed>_``) and ``--extra``
passes more options (``--reconstruct``...) to every run.

On a machine where the project is not installed (a lent GPU machine starts bare), link its two
mapped packages first: ``ln -sfn ../adapters sigmab_plugin/adapters; ln -sfn ../baselines
sigmab_plugin/baselines`` (pyproject.toml maps them; an uninstalled checkout has no mapping), carry
torch-pruning as a wheel, and set ``SIGMAB_COMMIT`` (a copy without .git names no commit).

``--repack SRC DST`` rewrites ModelNet40's npz with LZMA members (same arrays, np.load reads it): 62 MB
instead of 67, so the data fits under the GPU machine's 64 MiB transfer limit beside the checkout.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from benchmarks.common import machine
from benchmarks.gpu_long import run_pool

NPZ = "modelnet40-1024.npz"
RUNS = [(0.40, "dense"), (0.40, "sigmab"), (0.40, "fpgm"), (0.40, "hrank"),
        (0.30, "sigmab"), (0.30, "fpgm"), (0.30, "hrank")]


def repack(src: str, dst: str) -> None:
    """Copy an npz with every member LZMA-compressed (lossless; ``np.load`` reads it as before)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_LZMA) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))


def unpack(root: str, dest: Path) -> str:
    """An uncompressed copy of the npz under ``dest`` (every process then loads it in a second)."""
    import numpy as np
    dest.mkdir(parents=True, exist_ok=True)
    with np.load(Path(root) / NPZ) as z:
        np.savez(dest / NPZ, **{k: z[k] for k in z.files})
    return str(dest)


def probe(a) -> dict:
    """Seconds per training step of one run's kind (``pretrain``, ``tree`` or ``static``), measured for
    ``a.probe_seconds`` after every probe of the group has written its ready file (a shared start)."""
    import copy

    import torch

    import sigmab_plugin as sb
    from sigmab_plugin.baselines.data import load_dataset
    from sigmab_plugin.baselines.harness import make_teacher
    from sigmab_plugin.baselines.models import create_model
    from sigmab_plugin.finetune import FinetuneConfig, finetune
    t0 = time.time()
    data = load_dataset("modelnet40", a.data_root)
    torch.manual_seed(0)
    model = create_model(a.model, data.num_classes, None, width=a.width).to(a.device)
    teacher = None if a.probe == "pretrain" else make_teacher(model)
    prepare = 0.0
    if a.probe == "tree":
        calib = data.normalize(data.train.images[:a.calib_size].to(a.device))
        t = time.time()
        model = sb.branch(copy.deepcopy(model), depth=2, keep_ratio=0.5, calib_data=calib, progress=False)
        prepare = time.time() - t
    n = a.batch_size * 2
    x, y = data.train.images[:n], data.train.labels[:n]
    ft = FinetuneConfig(epochs=1, batch_size=a.batch_size, lr=0.01, flip=False, progress=False,
                        distill_weight=0.0 if teacher is None else 1.0)

    def chunk():
        finetune(model, x, y, data.normalize, ft, teacher=teacher, augment=data.augment)
    chunk()  # warm-up: allocator, cuDNN algorithm choice
    ready = Path(a.out) / "probe_ready"
    ready.mkdir(parents=True, exist_ok=True)
    (ready / f"{a.probe}_{a.probe_index}").touch()
    wait_until = time.time() + 120
    while len(list(ready.iterdir())) < a.probe_group and time.time() < wait_until:
        time.sleep(0.2)
    steps, start = 0, time.time()
    while time.time() - start < a.probe_seconds:
        chunk()
        steps += 2
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        mem = None
    res = {"kind": a.probe, "index": a.probe_index, "step_seconds": (time.time() - start) / steps, "steps": steps,
           "branch_seconds": prepare, "setup_seconds": time.time() - t0, "max_memory_gib": mem}
    print("PROBE " + json.dumps(res), flush=True)
    return res


def _probes(a, kinds, out: Path, deadline: float) -> list:
    """Run one probe process per kind at once; their measurements (failed ones left out)."""
    common = [sys.executable, "-m", "benchmarks.gpu_modelnet40", "--data-root", a.data_root, "--model", a.model,
              "--width", str(a.width), "--batch-size", str(a.batch_size), "--calib-size", str(a.calib_size),
              "--device", a.device, "--out", str(out), "--probe-seconds", str(a.probe_seconds),
              "--probe-group", str(len(kinds))]
    jobs = [{"name": f"probe_{k}_{i}", "cmd": common + ["--probe", k, "--probe-index", str(i)]}
            for i, k in enumerate(kinds)]
    run_pool(jobs, len(jobs), deadline, out / "logs")
    found = []
    for j in jobs:
        for line in (out / "logs" / f"{j['name']}.log").read_text().splitlines():
            if line.startswith("PROBE "):
                found.append(json.loads(line[6:]))
    return found


def pretrain(a, meta: dict, out: Path, deadline: float, alone: dict, t0: float) -> Path:
    """Train the dense model from scratch for the epochs that fit; its checkpoint (also kept as safetensors)."""
    steps = meta["steps_per_epoch"]
    meta["pretrain_epochs"] = pretrain_epochs(a, steps, alone, deadline - time.time())
    print(f"[{time.time() - t0:4.0f}s] pretraining {meta['pretrain_epochs']} epochs", flush=True)
    pre_out = out / "pretrain"
    pre = [{"name": "pretrain", "cmd": _cli(a, "--methods", "dense", "--epochs", "0", "--pretrain-epochs",
                                              str(meta["pretrain_epochs"]), "--out", str(pre_out))}]
    # a pretraining slower than measured is stopped early: its last epoch's checkpoint is still a dense model
    expected = 20 + 1.15 * meta["pretrain_epochs"] * steps * alone["step_seconds"]
    meta["pretrain"] = run_pool(pre, 1, min(deadline - 90, time.time() + 1.4 * expected), out / "logs")
    ckpt = pre_out / "pretrain" / "checkpoint.pt"
    if ckpt.is_file():
        import torch
        from safetensors.torch import save_file
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        meta["pretrain_epochs_done"] = int(ck["epoch"]) + 1  # the checkpoint counts from 0
        save_file({k: v.contiguous() for k, v in ck["model"].items()},
                  str(out / f"{a.model}_w{a.width:g}_dense.safetensors"))
    return ckpt


def _out_of_memory(logs: Path) -> bool:
    return any("out of memory" in f.read_text(errors="replace").lower() for f in logs.glob("*.log"))


def pretrain_epochs(a, steps: int, alone: dict, t_left: float) -> int:
    """Pretraining epochs that fit ``a.pretrain_share`` of ``t_left`` seconds (with 15% to spare)."""
    fit = (a.pretrain_share * t_left - 20) / (1.15 * steps * alone["step_seconds"])
    return max(1, min(a.max_pretrain_epochs, int(fit)))


def finetune_epochs(a, steps: int, together: list, t_left: float) -> int:
    """Epochs of every comparison run that fit ``t_left`` seconds at the slowest run's contended step (15%
    to spare), after the tree's target search (up to 8 trees built) and the runs' start and evaluation."""
    prepare = max([8 * p["branch_seconds"] for p in together if p["kind"] == "tree"] + [30])
    slowest = max(p["step_seconds"] for p in together)
    if not any(p["kind"] == "tree" for p in together):  # the tree probes did not finish: assume twice a static step
        slowest *= 2
    return max(1, min(a.max_epochs, int((t_left - prepare - 40) / (1.15 * steps * slowest))))


def report(out: Path) -> None:
    """``benchmarks.report_long`` over the finished runs (in its own process: a failure leaves the archive)."""
    subprocess.run([sys.executable, "-m", "benchmarks.report_long", str(out / "runs"), str(out / "report"),
                    "modelnet40_gpu", "benchmarks/gpu_modelnet40.py", "1.72"], check=False)


def _cli(a, *extra) -> list:
    return [sys.executable, "examples/compare_baselines.py", "--quiet", "--resume", "--data", "modelnet40",
            "--data-root", a.data_root, "--model", a.model, "--width", str(a.width), "--batch-size",
            str(a.batch_size), "--calib-size", str(a.calib_size), "--device", a.device, *extra,
            *(["--train-limit", "256", "--test-limit", "64"] if a.tiny else [])]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", help=f"folder holding {NPZ}")
    ap.add_argument("--out", default="runs/modelnet40_gpu")
    ap.add_argument("--model", default="pointnet2_ssg")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=520, help="seconds for everything, report included")
    ap.add_argument("--pretrain-share", type=float, default=0.5, help="share of the time after the probes")
    ap.add_argument("--max-pretrain-epochs", type=int, default=60)
    ap.add_argument("--max-epochs", type=int, default=12)
    ap.add_argument("--probe-seconds", type=float, default=10)
    ap.add_argument("--pretrained", help="dense weights to start from (e.g. the safetensors of an earlier run): "
                    "no pretraining")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs of every run (default: what fits)")
    ap.add_argument("--methods", nargs="+", choices=sorted({m for _, m in RUNS}), help="only these runs")
    ap.add_argument("--seed", type=int, default=0, help="seed of every comparison run (named in its folder: _s<seed>_)")
    ap.add_argument("--extra", default="", help="more compare_baselines options for every run, e.g. '--reconstruct'")
    ap.add_argument("--tiny", action="store_true", help="256 training and 64 test clouds: the code path only")
    ap.add_argument("--repack", nargs=2, metavar=("SRC", "DST"), help="rewrite an npz with LZMA members, then exit")
    ap.add_argument("--probe", choices=["pretrain", "tree", "static"], help=argparse.SUPPRESS)
    ap.add_argument("--probe-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--probe-group", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.repack:
        repack(*a.repack)
        return {}
    if not a.data_root:
        ap.error("--data-root is required")
    if a.pretrained and not Path(a.pretrained).is_file():
        ap.error(f"--pretrained {a.pretrained}: no such file (give the dense weights an earlier run saved)")
    if a.epochs is not None and a.epochs < 1:
        ap.error(f"--epochs {a.epochs} must be >= 1 (leave it out to fit the epochs to the time)")
    if a.probe:
        return probe(a)
    t0 = time.time()
    out = Path(a.out)
    deadline = t0 + a.budget - 25  # the report and the archive
    a.data_root = unpack(a.data_root, out / "data")
    from sigmab_plugin.baselines.data import load_dataset
    train_size = 256 if a.tiny else len(load_dataset("modelnet40", a.data_root).train.labels)
    print(f"[{time.time() - t0:4.0f}s] data ready", flush=True)
    meta = {"machine": machine(), "argv": argv or sys.argv[1:]}
    kinds = ["tree" if m == "sigmab" else "static" for _, m in RUNS]
    alone = [] if a.pretrained else _probes(a, ["pretrain"], out / "probe_alone", time.time() + 90)
    together = [] if a.epochs else _probes(a, kinds, out / "probe_together", time.time() + 150)
    if not a.epochs and len(together) < len(kinds) and _out_of_memory(out / "probe_together" / "logs") \
            and a.batch_size > 16:
        a.batch_size //= 2  # seven runs at once did not fit on the device: every run (and the pretraining) halves
        print(f"[{time.time() - t0:4.0f}s] out of memory: batch size {a.batch_size}", flush=True)
        alone = [] if a.pretrained else _probes(a, ["pretrain"], out / "probe_alone_b", time.time() + 90)
        together = _probes(a, kinds, out / "probe_together_b", time.time() + 150)
    if (not a.pretrained and not alone) or (not a.epochs and not together):
        raise SystemExit(f"the probes failed: see {out}/probe_*/logs")
    steps = math.ceil(train_size / a.batch_size)
    meta.update(probe_alone=alone, probe_together=together, batch_size=a.batch_size, steps_per_epoch=steps)
    ckpt = Path(a.pretrained) if a.pretrained else pretrain(a, meta, out, deadline, alone[0], t0)
    if ckpt.is_file():
        meta["epochs"] = a.epochs or finetune_epochs(a, steps, together, deadline - time.time())
        print(f"[{time.time() - t0:4.0f}s] comparing with {meta['epochs']} epochs", flush=True)
        extra = a.extra.split()
        names = {(frac, m): f"{a.model}_f{frac:.2f}_s{a.seed}_{m}" for frac, m in RUNS
                 if not a.methods or m in a.methods}
        jobs = [{"name": name,
                 "cmd": _cli(a, "--checkpoint", str(ckpt), "--epochs", str(meta["epochs"]), "--lr", "0.01",
                             "--target-fraction", f"{frac:.2f}", "--methods", m, "--seed", str(a.seed), *extra,
                             "--out", str(out / "runs" / name))}
                for (frac, m), name in names.items()]
        meta["compare"] = run_pool(jobs, len(jobs), deadline, out / "logs")
        report(out)
    meta["seconds"] = time.time() - t0
    (out / "gpu_modelnet40.json").write_text(json.dumps(meta, indent=1))
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for pattern in ("gpu_modelnet40.json", "logs/*.log", "probe_*/logs/*.log", "pretrain/*/log.jsonl",
                        "runs/*/results.json", "runs/*/*/log.jsonl", "report/*"):
            for f in sorted(out.glob(pattern)):
                tar.add(f, arcname=str(f.relative_to(out)))
    print(f"[{meta['seconds']:4.0f}s] wrote {out}/results.tar.gz", flush=True)
    return meta


if __name__ == "__main__":
    main()
