"""Which part of the point-cloud training augmentation moves a tree's routing: the test clouds of a finished
ModelNet40 harness run (``compare_baselines.py --data modelnet40 --out RUN``) routed hard by the saved SigmaB tree,
as they are and with one augmentation component at a fixed strength (point dropout at a fixed ratio, isotropic
scale, the training's random anisotropic scale, shift or jitter) or the whole training augmentation. For each:
top-1 and the leaf shares. Nothing is trained.

On ModelNet40 the test routing skews (two leaves get 2-8% of the test clouds) while training balances the leaves;
a component whose strength moves the shares is a nuisance the routers split on.

    python -m benchmarks.augment_routing_diag RUN [RUN ...] --out benchmarks/results/augment_routing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

from sigmab_plugin.baselines.points import PointDataset, drop_points
from sigmab_plugin.finetune import evaluate
from benchmarks.common import load_run_tree, machine


def _dropout(ratio: float) -> Callable:
    return lambda x, gen: drop_points(x, ratio, gen)


def _scale(s: float) -> Callable:
    return lambda x, gen: x * s


def _only(ds: PointDataset, **keep) -> Callable:
    """The training augmentation with every component but those in ``keep`` switched off."""
    off = {"scale": (1.0, 1.0), "shift": 0.0, "jitter": 0.0, "max_dropout": 0.0}
    part = dataclasses.replace(ds, **{**off, **keep})
    return part.augment


def conditions(ds: PointDataset) -> Dict[str, Callable]:
    c = {"none": lambda x, gen: x}
    for r in (0.25, 0.5, 0.75):
        c[f"dropout {r:g}"] = _dropout(r)
    for s in (0.67, 0.8, 1.25, 1.5):
        c[f"scale x{s:g}"] = _scale(s)
    c[f"anisotropic scale {ds.scale[0]:.2f}-{ds.scale[1]:.2f}"] = _only(ds, scale=ds.scale)
    c[f"shift +-{ds.shift:g}"] = _only(ds, shift=ds.shift)
    c[f"jitter {ds.jitter:g}"] = _only(ds, jitter=ds.jitter)
    c[f"random dropout 0-{ds.max_dropout:g}"] = _only(ds, max_dropout=ds.max_dropout)
    c["all (training augmentation)"] = lambda x, gen: ds.augment(x, gen)
    return c


def measure(run: str, seed: int = 0, limit: int = 0) -> List[dict]:
    cfg = json.load(open(f"{run}/results.json"))["config"]
    if not cfg["data"].startswith("modelnet40"):  # the point-cloud data sets (baselines.data.load_dataset)
        raise SystemExit(f"{run}: trained on {cfg['data']!r}, not a point-cloud data set (modelnet40*)")
    tree, ds, _ = load_run_tree(run)
    x, y = ds.normalize(ds.test.images), ds.test.labels
    if limit:
        x, y = x[:limit], y[:limit]
    rows = []
    for name, f in conditions(ds).items():
        t = time.time()
        xa = f(x, torch.Generator().manual_seed(seed))
        r = evaluate(tree, xa, y)
        n = sum(r["leaf_histogram"])
        rows.append({"run": run, "condition": name, "top1": r["top1"],
                     "leaf_shares": [h / n for h in r["leaf_histogram"]]})
        print(f"{Path(run).name:32s} {name:34s} top-1 {100 * r['top1']:6.2f}  leaf shares "
              f"{'/'.join(f'{100 * h / n:.0f}' for h in r['leaf_histogram'])}  ({time.time() - t:.0f}s)", flush=True)
    return rows


def report(rows: List[dict], out: Path, cmd: str) -> None:
    m = machine()
    runs = sorted({r["run"] for r in rows})
    lines = ["# Which augmentation component moves the ModelNet40 tree's routing", "",
             f"Generated {m['date']} by `{cmd}` "
             f"(commit {m['commit']}) on {m['cpu']}, {m['threads']} threads, no training.", "",
             "The test clouds routed hard by each run's saved tree, as they are and with one component of the "
             "training augmentation at a fixed strength (or all of it, as in training). Leaf shares in %; the root "
             "sends leaves 0-1 left and 2-3 right.", ""]
    for run in runs:
        lines += [f"## `{run}`", "", "| inputs | top-1 (%) | leaf shares (%) | root: left (%) |", "|---|---|---|---|"]
        for r in (r for r in rows if r["run"] == run):
            sh = r["leaf_shares"]
            lines.append(f"| {r['condition']} | {100 * r['top1']:.2f} | {'/'.join(f'{100 * s:.0f}' for s in sh)} | "
                         f"{100 * sum(sh[:len(sh) // 2]):.0f} |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    print(f"wrote {out.with_suffix('.md')}, .json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="harness run folders with a saved SigmaB tree (sigmab/tree)")
    ap.add_argument("--out", default="benchmarks/results/augment_routing", help="report stem (.md and .json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws")
    ap.add_argument("--limit", type=int, default=0, help="route only the first N test clouds (0: all)")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = [row for run in a.runs for row in measure(run, a.seed, a.limit)]
    argv = sys.argv[1:] if argv is None else argv
    report(rows, Path(a.out), " ".join(["python -m benchmarks.augment_routing_diag", *argv]))


if __name__ == "__main__":
    main()
