"""What keeping freed memory (``sb.keep_freed_memory``) does to CPU training speed: training steps of the dense
PointNet++ SSG, its SigmaB tree and the CIFAR ResNet-20, each in a fresh process with glibc's default allocator
and with freed memory kept. Reports shapes (images)/s (median step after warm-up), the process's user and system
CPU time and its peak resident memory. Writes ``--out``/allocator_speed.{json,md}.

    python -m benchmarks.allocator_speed [--steps 12] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine

CASES = {  # name -> (model builder source, batch, input shape, classes)
    "pointnet2_ssg w0.25": ("timm.create_model('pointnet2_ssg', num_classes=40, width=0.25)", 32, (3, 1024), 40),
    "pointnet2_ssg w0.25, SigmaB tree": ("tree()", 32, (3, 1024), 40),
    "resnet20 (CIFAR)": ("create_model('resnet20', 10, None, 'B')", 128, (3, 32, 32), 10),
}

STEP = """
import json, statistics, sys, time, timm, torch
import sigmab_plugin as sb
from sigmab_plugin.baselines.models import create_model
if sys.argv[1] == "keep":
    assert sb.keep_freed_memory()
torch.manual_seed(0)
def tree():
    m = timm.create_model('pointnet2_ssg', num_classes=40, width=0.25)
    return sb.branch(m, depth=2, calib_data=torch.randn(64, 3, 1024), keep_ratio=0.5)
model = {build}
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn({batch}, *{shape}), torch.randint(0, {classes}, ({batch},))
rates = []
for i in range({steps}):
    t = time.perf_counter()
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    opt.zero_grad(); loss.backward(); opt.step()
    rates.append({batch} / (time.perf_counter() - t))
import resource
print(json.dumps({{"rate": statistics.median(rates[3:]), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def run_case(build: str, batch: int, shape: tuple, classes: int, mode: str, steps: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = STEP.format(build=build, batch=batch, shape=shape, classes=classes, steps=steps)
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"per_second": got["rate"], "wall_s": time.perf_counter() - t0, "user_s": after.ru_utime - before.ru_utime,
            "system_s": after.ru_stime - before.ru_stime, "peak_rss_mib": got["rss"] / 1024}  # Linux: KiB


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="training steps per case (the first 3 are warm-up)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.steps < 4:
        ap.error(f"--steps {a.steps}: give at least 4 (3 warm-up steps, then the measured ones)")
    rows = []
    for name, (build, batch, shape, classes) in CASES.items():
        for mode in ("default", "keep"):
            r = {"case": name, "batch": batch, "allocator": mode, **run_case(build, batch, shape, classes, mode,
                                                                             a.steps)}
            rows.append(r)
            print(f"{name:34s} {mode:8s} {r['per_second']:7.1f}/s  user {r['user_s']:5.1f}s  "
                  f"system {r['system_s']:5.1f}s", flush=True)
    m = machine()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocator_speed.json").write_text(json.dumps({"machine": m, "steps": a.steps, "rows": rows}, indent=1))
    lines = ["# Training speed with glibc's default allocator and with freed memory kept", "",
             f"Generated {m['date']} by `python -m benchmarks.allocator_speed --steps {a.steps}` (commit {m['commit']}) "
             f"on {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Each case in a fresh process: forward, "
             "backward and SGD step on random inputs; median over the steps after 3 warm-up steps. User and system "
             "time are the whole process's (model building included).",
             "", "| case | batch | allocator | per second | user (s) | system (s) | wall (s) | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['batch']} | {r['allocator']} | {r['per_second']:.1f} | {r['user_s']:.1f} | "
                     f"{r['system_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    lines.append("")
    for name in CASES:
        d, k = (next(r for r in rows if r["case"] == name and r["allocator"] == m_) for m_ in ("default", "keep"))
        lines.append(f"- {name}: x{k['per_second'] / d['per_second']:.2f} with freed memory kept.")
    (out / "allocator_speed.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'allocator_speed.md'}")
    return {"machine": m, "rows": rows}


if __name__ == "__main__":
    main()
