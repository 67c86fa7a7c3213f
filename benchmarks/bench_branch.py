"""Benchmark of `branch()` on timm ResNet-50 (10 classes) with 1,024 real Imagenette images.

Measures the time of branch() at depth 2, the active-parameter and MAC fractions of the largest path
for several keep ratios, and hard-routed latency (batch 1) and throughput (batch 64) against dense at
32, 112 and 224 px. Writes benchmarks/results/branch_resnet50.{json,md}.

    .venv/bin/python -m benchmarks.bench_branch [--images 1024] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

import sigmab_plugin as sb
from sigmab_plugin.baselines.data import load_dataset
from benchmarks.common import count_macs, machine, time_call

warnings.filterwarnings("ignore")


def path_macs(tree, x1: torch.Tensor) -> int:
    return count_macs(tree, x1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 112, 224])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from the saved JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        results = json.loads((Path(args.out) / "branch_resnet50.json").read_text())
        (Path(args.out) / "branch_resnet50.md").write_text(report(results))
        return results
    torch.manual_seed(0)
    data = load_dataset("imagenette-112", limit=args.images)
    calib = data.normalize(data.train.images)
    dense = timm.create_model("resnet50", num_classes=10).eval()
    dense_params = sum(p.numel() for p in dense.parameters())
    results = {"command": "python -m " + " ".join(["benchmarks.bench_branch"] + (argv or sys.argv[1:])),
               "machine": machine(), "model": "timm resnet50, num_classes=10, default init",
               "calibration": f"{len(calib)} Imagenette-112 train images", "trees": []}
    trees = {}
    for keep in args.keep:
        for residual in (False, True):
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            sb.branch(model, depth=2, calib_data=calib, keep_ratio=keep, prune_residual=residual, progress=False)
            seconds = time.perf_counter() - t
            rep = sb.param_report(model)
            x1 = calib[:1]
            leaf_macs = []
            leaves = sb.route(model, calib[:256])
            for leaf in leaves.unique().tolist():
                i = int(torch.nonzero(leaves == leaf)[0])
                leaf_macs.append(path_macs(model, calib[i:i + 1]))
            mac_fraction = max(leaf_macs) / count_macs(dense, x1)
            row = {"keep_ratio": keep, "prune_residual": residual, "branch_seconds": round(seconds, 2),
                   "dense_params": dense_params, "total_params": rep["total_params"],
                   "active_params_max": rep["active_params_max"], "active_fraction_max": rep["active_fraction_max"],
                   "mac_fraction_max": mac_fraction, "leaf_share_calibration": rep["leaf_share_calibration"]}
            print(json.dumps(row), flush=True)
            results["trees"].append(row)
            trees[(keep, residual)] = (model, row)
    timing = []
    for (keep, residual), (model, row) in trees.items():
        if keep != min(args.keep):
            continue
        for size in args.sizes:
            x1 = torch.nn.functional.interpolate(calib[:1], size=size, mode="bilinear")
            x64 = torch.nn.functional.interpolate(calib[:64], size=size, mode="bilinear")
            mac_fraction = count_macs(model, x1) / count_macs(dense, x1)
            with torch.no_grad():
                lat_d = time_call(lambda: dense(x1), args.repeat)
                lat_t = time_call(lambda: model(x1), args.repeat)
                rep64 = max(3, args.repeat // 3)
                thr_d = 64 / time_call(lambda: dense(x64), rep64, warmup=1)
                thr_t = 64 / time_call(lambda: model(x64), rep64, warmup=1)
            entry = {"keep_ratio": keep, "prune_residual": residual, "size": size,
                     "active_fraction": row["active_fraction_max"], "mac_fraction_sample": mac_fraction,
                     "latency_dense_ms": lat_d * 1e3, "latency_tree_ms": lat_t * 1e3, "latency_ratio": lat_t / lat_d,
                     "throughput_dense": thr_d, "throughput_tree": thr_t, "throughput_ratio": thr_t / thr_d}
            entry["goal_latency"] = (entry["latency_ratio"] <= row["active_fraction_max"] + 0.10 if size == 32 else
                                     entry["latency_ratio"] <= mac_fraction + 0.10 if size == 224 else None)
            entry["goal_throughput"] = entry["throughput_ratio"] >= 0.8 / mac_fraction
            print(json.dumps(entry), flush=True)
            timing.append(entry)
    results["timing"] = timing
    results["goal_branch_under_60s"] = all(r["branch_seconds"] < 60 for r in results["trees"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "branch_resnet50.json").write_text(json.dumps(results, indent=1))
    (out / "branch_resnet50.md").write_text(report(results))
    return results


def report(r: dict) -> str:
    m = r["machine"]
    lines = [f"# branch() on ResNet-50: {m['date']}", "",
             f"Command: `{r['command']}` (commit {m['commit']})", "",
             f"Machine: {m['cpu']}, {m['threads']} torch threads, GPU: {m['gpu']}, torch {m['torch']}", "",
             f"Model: {r['model']}; calibration: {r['calibration']}.", "",
             "| keep | residual | branch s | stored/dense | active fraction | MAC fraction |", "|---|---|---|---|---|---|"]
    for t in r["trees"]:
        lines.append(f"| {t['keep_ratio']} | {t['prune_residual']} | {t['branch_seconds']} | "
                     f"{t['total_params'] / t['dense_params']:.2f} | {t['active_fraction_max']:.3f} | "
                     f"{t['mac_fraction_max']:.3f} |")
    lines += ["", "| keep | residual | px | active frac | MAC frac | b1 dense ms | b1 tree ms | ratio | latency goal "
              "| b64 dense img/s | b64 tree img/s | ratio | throughput goal (>= 0.8/MAC) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in r["timing"]:
        lines.append(f"| {t['keep_ratio']} | {t['prune_residual']} | {t['size']} | {t['active_fraction']:.3f} | "
                     f"{t['mac_fraction_sample']:.3f} | {t['latency_dense_ms']:.1f} | {t['latency_tree_ms']:.1f} | "
                     f"{t['latency_ratio']:.2f} | {t['goal_latency']} | {t['throughput_dense']:.1f} | "
                     f"{t['throughput_tree']:.1f} | {t['throughput_ratio']:.2f} | {t['goal_throughput']} |")
    lines += ["", f"branch() under 60 s: {r['goal_branch_under_60s']}", "",
              "Goals: batch-1 latency ratio <= active fraction + 0.10 at 32 px and <= MAC fraction + 0.10 at "
              "224 px; batch-64 throughput ratio >= 0.8 / MAC fraction.", "",
              "Reading (why goals are missed on this machine): the tree runs the same number of layers as "
              "the dense model, only thinner, so the fixed cost per layer call does not shrink with the "
              "weights; on this CPU at 32 px the batch-1 latency follows the MAC fraction more than the "
              "active-parameter fraction (the weights are not the only bottleneck of a 2-core CPU with a "
              "large L3). At batch 64 hard routing splits the batch over the leaves, so each variant runs "
              "a quarter-size batch (smaller, less efficient GEMMs) plus gather/scatter copies; throughput "
              "then rises less than 1/MAC fraction. Routing itself (pool, cosine router, argsort, index "
              "copies) is a small fixed cost per routed unit.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
