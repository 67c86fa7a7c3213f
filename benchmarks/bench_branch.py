"""Benchmark of `branch()` on timm ResNet-50 (10 classes) with 1,024 real Imagenette images.

Measures the time and peak memory (RSS growth) of branch() at depth 2 (and 3), the active-parameter
and MAC fractions of the largest path for several keep ratios, and, as ratios to dense timed in the
same interleaved rounds (``baselines/timing.py``): hard-routed batch-1 latency of the tree and of one
exported path (``export_path``) at 32, 112 and 224 px, and batch-64 throughput. Writes
benchmarks/results/branch_resnet50.{json,md}.

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
from benchmarks.common import count_macs, machine
from sigmab_plugin.baselines.timing import latency_ratios

warnings.filterwarnings("ignore")


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _PeakRSS:
    """Peak resident memory (MB) while the block runs, sampled every 50 ms by a thread."""

    def __enter__(self):
        import threading
        self.mb, self._stop = _rss_mb(), threading.Event()

        def watch():
            while not self._stop.wait(0.05):
                self.mb = max(self.mb, _rss_mb())
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, _rss_mb())


def configs(keeps, residual: str, depths) -> list:
    """(keep, prune_residual, depth) of every tree to build: depth 2 at each keep ratio and residual
    setting ("both", "no", "yes"), then each other depth at the smallest keep without residual pruning."""
    residuals = {"both": (False, True), "no": (False,), "yes": (True,)}[residual]
    out = [(keep, r, 2) for keep in keeps for r in residuals]
    return out + [(min(keeps), False, d) for d in depths if d != 2]


def path_macs(tree, x1: torch.Tensor) -> int:
    return count_macs(tree, x1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 112, 224])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--residual", choices=["both", "no", "yes"], default="both", help="prune_residual settings")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from the saved JSON")
    args = ap.parse_args(argv)
    stem = "branch_resnet50"
    if args.report_only:
        results = json.loads((Path(args.out) / f"{stem}.json").read_text())
        (Path(args.out) / f"{stem}.md").write_text(report(results))
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
    for keep, residual, depth in configs(args.keep, args.residual, args.depths):
            model = copy.deepcopy(dense)
            rss0 = _rss_mb()
            peak = _PeakRSS()
            t = time.perf_counter()
            with peak:
                sb.branch(model, depth=depth, calib_data=calib, keep_ratio=keep, prune_residual=residual,
                          progress=False)
            seconds = time.perf_counter() - t
            rep = sb.param_report(model)
            x1 = calib[:1]
            leaf_macs = []
            leaves = sb.route(model, calib[:256])
            for leaf in leaves.unique().tolist():
                i = int(torch.nonzero(leaves == leaf)[0])
                leaf_macs.append(path_macs(model, calib[i:i + 1]))
            mac_fraction = max(leaf_macs) / count_macs(dense, x1)
            row = {"keep_ratio": keep, "prune_residual": residual, "depth": depth,
                   "branch_seconds": round(seconds, 2), "branch_peak_rss_growth_mb": round(peak.mb - rss0, 1),
                   "dense_params": dense_params, "total_params": rep["total_params"],
                   "active_params_max": rep["active_params_max"], "active_fraction_max": rep["active_fraction_max"],
                   "mac_fraction_max": mac_fraction, "leaf_share_calibration": rep["leaf_share_calibration"]}
            print(json.dumps(row), flush=True)
            results["trees"].append(row)
            trees[(keep, residual, depth)] = (model, row)
    timing = []
    for (keep, residual, depth), (model, row) in trees.items():
        if keep != min(args.keep) or depth != 2:
            continue
        for size in args.sizes:
            x1 = torch.nn.functional.interpolate(calib[:1], size=size, mode="bilinear")
            x64 = torch.nn.functional.interpolate(calib[:64], size=size, mode="bilinear")
            mac_fraction = count_macs(model, x1) / count_macs(dense, x1)
            leaf = int(sb.route(model, x1)[0])
            path = sb.export_path(model, leaf).eval()
            with torch.no_grad():
                b1 = latency_ratios({"dense": lambda: dense(x1), "tree": lambda: model(x1),
                                     "path": lambda: path(x1)}, "dense", rounds=5, repeat=args.repeat)
                b64 = latency_ratios({"dense": lambda: dense(x64), "tree": lambda: model(x64)}, "dense", rounds=3,
                                     repeat=max(2, args.repeat // 5), warmup=1)
            entry = {"keep_ratio": keep, "prune_residual": residual, "size": size,
                     "active_fraction": row["active_fraction_max"], "mac_fraction_sample": mac_fraction,
                     "latency_dense_ms": b1["dense"]["ms"], "latency_tree_ms": b1["tree"]["ms"],
                     "latency_ratio": b1["tree"]["ratio"], "latency_ratio_range": [b1["tree"]["ratio_min"],
                                                                                   b1["tree"]["ratio_max"]],
                     "latency_path_ms": b1["path"]["ms"], "latency_path_ratio": b1["path"]["ratio"],
                     "throughput_dense": 64e3 / b64["dense"]["ms"], "throughput_tree": 64e3 / b64["tree"]["ms"],
                     "throughput_ratio": 1 / b64["tree"]["ratio"]}
            entry["goal_latency"] = entry["latency_ratio"] <= mac_fraction + 0.05
            entry["goal_latency_path"] = entry["latency_path_ratio"] <= mac_fraction + 0.02
            entry["goal_throughput"] = entry["throughput_ratio"] >= 0.9 / mac_fraction
            print(json.dumps(entry), flush=True)
            timing.append(entry)
    results["timing"] = timing
    results["goal_branch_under_30s"] = all(r["branch_seconds"] <= 30 for r in results["trees"] if r["depth"] == 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(report(results))
    return results


def report(r: dict) -> str:
    m = r["machine"]
    lines = [f"# branch() on ResNet-50: {m['date']}", "",
             f"Command: `{r['command']}` (commit {m['commit']})", "",
             f"Machine: {m['cpu']}, {m['threads']} torch threads, GPU: {m['gpu']}, torch {m['torch']}", "",
             f"Model: {r['model']}; calibration: {r['calibration']}.", "",
             "| keep | residual | depth | branch s | peak RSS growth MB | stored/dense | active fraction | MAC fraction |",
             "|---|---|---|---|---|---|---|---|"]
    for t in r["trees"]:
        lines.append(f"| {t['keep_ratio']} | {t['prune_residual']} | {t.get('depth', 2)} | {t['branch_seconds']} | "
                     f"{t.get('branch_peak_rss_growth_mb', '')} | {t['total_params'] / t['dense_params']:.2f} | "
                     f"{t['active_fraction_max']:.3f} | {t['mac_fraction_max']:.3f} |")
    lines += ["", "Peak RSS growth: resident memory above the process's before the call, sampled every 50 ms; "
              "later rows reuse memory freed by earlier trees, so they understate.", "",
              "Batch 1: latency as a ratio to dense timed in the same interleaved rounds (median, range); "
              "'path' is `export_path` for the leaf the input is routed to. Batch 64: throughput ratio.", "",
              "| keep | residual | px | MAC frac | b1 dense ms | tree ratio (range) | goal <= MAC+0.05 | path ratio | "
              "goal <= MAC+0.02 | b64 dense img/s | b64 tree ratio | goal >= 0.9/MAC |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in r["timing"]:
        lo, hi = t["latency_ratio_range"]
        lines.append(f"| {t['keep_ratio']} | {t['prune_residual']} | {t['size']} | {t['mac_fraction_sample']:.3f} | "
                     f"{t['latency_dense_ms']:.1f} | {t['latency_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {t['goal_latency']} | "
                     f"{t['latency_path_ratio']:.2f} | {t['goal_latency_path']} | {t['throughput_dense']:.1f} | "
                     f"{t['throughput_ratio']:.2f} | {t['goal_throughput']} |")
    lines += ["", f"branch() at depth 2 within 30 s: {r['goal_branch_under_30s']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
