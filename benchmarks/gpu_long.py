"""The long comparison (benchmarks/long_comparison.sh) on one GPU inside a deadline.

Every (model, active fraction, seed, method) of the comparison runs as its own
``examples/compare_baselines.py`` process with the same settings as the CPU script (CIFAR-10 JPEG set,
pretrained CIFAR ResNet-20/56 option A, full 50,000-image training set, batch 64, lr 0.01, the same
epochs and distillation for every method, all 10,000 test images), a few processes at once: these
small networks leave a large GPU idle between kernel launches, so one process per run fills it (but
16 at once contended for the CPU and ran 3-8x slower per epoch; 4 is the default). Runs are started longest first; any still going at the deadline is stopped and listed as
unfinished (its per-epoch log stays). Then ``benchmarks.report_long`` writes the report.

    python -m benchmarks.gpu_long --data-root DIR --weights DIR --out runs/long_gpu [--epochs 4]
    python -m benchmarks.gpu_long ... --tiny --device cpu    # the code path at test size (CI)

On a machine where the project is not installed (a lent GPU machine starts bare), link its two
mapped packages first: ``ln -sfn ../adapters sigmab_plugin/adapters; ln -sfn ../baselines
sigmab_plugin/baselines`` (pyproject.toml maps them; an uninstalled checkout has no mapping), carry
torch-pruning as a wheel, and set ``SIGMAB_COMMIT`` (a copy without .git names no commit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine

CKPT = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
# (fraction, seed, methods) in the order of long_comparison.sh: dense once, two seeds at 0.40
PLAN = [(0.40, 0, ("dense", "sigmab", "fpgm", "hrank")), (0.40, 1, ("sigmab", "fpgm", "hrank")),
        (0.30, 0, ("sigmab", "fpgm", "hrank")), (0.55, 0, ("fpgm", "hrank"))]
COST = {"sigmab": 4, "hrank": 1.2, "fpgm": 1, "dense": 1}  # rough relative run time, to start the longest first


def jobs(models, epochs: dict, a) -> list:
    out = []
    for model in models:
        for frac, seed, methods in PLAN:
            for method in methods:
                name = f"{model}_f{frac:.2f}_s{seed}_{method}"
                cmd = [sys.executable, "examples/compare_baselines.py", "--quiet", "--data", "cifar10-jpeg",
                       "--data-root", a.data_root, "--shortcut", "A", "--batch-size", "64", "--lr", "0.01",
                       "--calib-size", "64" if a.tiny else "512", "--model", model,
                       "--checkpoint", str(Path(a.weights) / CKPT[model]), "--epochs", str(epochs[model]),
                       "--target-fraction", f"{frac:.2f}", "--seed", str(seed), "--methods", method,
                       "--device", a.device, "--out", str(Path(a.out) / "runs" / name)]
                if a.tiny:
                    cmd += ["--train-limit", "256", "--test-limit", "128"]
                out.append({"name": name, "cmd": cmd, "cost": COST[method] * (3 if model == "resnet56" else 1)})
    return sorted(out, key=lambda j: -j["cost"])


def select(todo: list, only) -> list:
    """The jobs whose name contains one of ``only`` (all when ``only`` is empty or None)."""
    return [j for j in todo if not only or any(s in j["name"] for s in only)]


def run_pool(todo: list, workers: int, deadline: float, logs: Path) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    logs.mkdir(parents=True, exist_ok=True)
    waiting, running = list(todo), []
    t0 = time.time()

    def finish(j, rc):
        j.update(rc=rc, seconds=time.time() - j["start"])
        j["log"].close()
        print(f"[{time.time() - t0:5.0f}s] {j['name']}: {'ok' if rc == 0 else rc} in {j['seconds']:.0f}s", flush=True)

    while waiting or running:
        while waiting and len(running) < workers:
            j = waiting.pop(0)
            j["log"] = open(logs / f"{j['name']}.log", "w")
            j["proc"] = subprocess.Popen(j["cmd"], stdout=j["log"], stderr=subprocess.STDOUT, env=env)
            j["start"] = time.time()
            running.append(j)
        for j in list(running):
            if j["proc"].poll() is not None:
                finish(j, j["proc"].returncode)
                running.remove(j)
        ended = [j for j in todo if "rc" in j]
        if len(ended) >= 4 and all(j["rc"] != 0 for j in ended):  # a broken setup: stop, do not wait
            for j in running:
                j["proc"].kill()
            raise SystemExit(f"the first runs all failed; see {logs}")
        if running and time.time() > deadline:
            for j in running:
                j["proc"].terminate()
            for j in running:
                try:
                    j["proc"].wait(20)
                except subprocess.TimeoutExpired:
                    j["proc"].kill()
                finish(j, "stopped at the deadline")
            for j in waiting:
                j["rc"] = "not started"
            break
        time.sleep(1)
    return [{k: j.get(k) for k in ("name", "rc", "seconds")} for j in todo]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="folder holding cifar10-jpeg.tar.gz")
    ap.add_argument("--weights", required=True, help="folder holding the CIFAR ResNet checkpoints")
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"], choices=sorted(CKPT))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4,
                    help="processes at once (on an H200, 16 ran 3-8x slower per epoch than one; 4 ran well)")
    ap.add_argument("--deadline", type=float, default=420, help="seconds after which unfinished runs are stopped")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="256 training and 128 test images: the code path only")
    ap.add_argument("--only", nargs="+", default=None, help="run only jobs whose name contains one of these")
    ap.add_argument("--out", default="runs/long_gpu")
    a = ap.parse_args(argv)
    t0 = time.time()
    from sigmab_plugin.baselines.data import load_dataset
    load_dataset("cifar10-jpeg", a.data_root)  # decode once into the cache before the processes start
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)
    todo = select(jobs(a.models, {m: a.epochs for m in a.models}, a), a.only)
    status = run_pool(todo, a.workers, t0 + a.deadline, Path(a.out) / "logs")
    meta = {"machine": machine(), "seconds": time.time() - t0, "argv": argv or sys.argv[1:], "runs": status}
    Path(a.out, "gpu_long.json").write_text(json.dumps(meta, indent=1))
    subprocess.run([sys.executable, "-m", "benchmarks.report_long", str(Path(a.out) / "runs"),
                    str(Path(a.out) / "report")], check=False)
    return meta


if __name__ == "__main__":
    main()
