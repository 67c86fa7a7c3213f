"""How much a router can know at each candidate split point: linear probes on pooled features.

A logistic regression is fitted on the dense model's pooled stage outputs (mean, mean+max, 2x2 grid)
of training images and scored on images held out from the training set (the ablation's split, not
the test set), for the class and for one coarse grouping (vehicles vs animals on CIFAR-10). Writes
``<out>/probe_split_<model>.json`` and ``.md``.

    python -m benchmarks.probe_split_features [--model resnet20] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from benchmarks.common import machine
from sigmab_plugin.baselines.data import load_dataset
from sigmab_plugin.baselines.models import create_model

VEHICLES = [0, 1, 8, 9]  # CIFAR-10 airplane, automobile, ship, truck


def pooled(out: torch.Tensor) -> dict:
    return {"mean": out.mean((2, 3)), "mean+max": torch.cat([out.mean((2, 3)), out.amax((2, 3))], 1),
            "grid2x2": F.adaptive_avg_pool2d(out, 2).flatten(1)}


def main(argv=None) -> dict:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--checkpoint", default="../shared/weights/resnet20-12fca82f.th")
    ap.add_argument("--shortcut", default="A")
    ap.add_argument("--data", default="cifar10-jpeg")
    ap.add_argument("--stages", nargs="+", default=["layer1", "layer2", "layer3"])
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--val", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    data = load_dataset(a.data, seed=a.seed)
    model = create_model(a.model, data.num_classes, a.checkpoint, a.shortcut).eval()
    perm = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(a.seed))
    idx = perm[:a.train + a.val]  # the same split as benchmarks/ablate_recipe.py
    feats = {s: [] for s in a.stages}
    for s in a.stages:
        model.get_submodule(s).register_forward_hook(lambda _m, _i, out, s=s: feats[s].append(pooled(out)))
    with torch.no_grad():
        for i in range(0, len(idx), 500):
            model(data.normalize(data.train.images[idx[i:i + 500]]))
    y = data.train.labels[idx].numpy()
    targets = {"class": y}
    if data.num_classes == 10:
        targets["vehicle_vs_animal"] = np.isin(y, VEHICLES).astype(int)
    rows = []
    for s in a.stages:
        for kind in ("mean", "mean+max", "grid2x2"):
            x = torch.cat([f[kind] for f in feats[s]]).numpy()
            x = (x - x[:a.train].mean(0)) / (x[:a.train].std(0) + 1e-6)
            row = {"stage": s, "pooling": kind, "dims": int(x.shape[1])}
            for name, t in targets.items():
                clf = LogisticRegression(max_iter=500).fit(x[:a.train], t[:a.train])
                row[name] = float(clf.score(x[a.train:], t[a.train:]))
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"command": "python -m benchmarks.probe_split_features " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "args": vars(a), "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe_split_{a.model}.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    lines = [f"# Linear probes of pooled split-point features: {a.model} on {a.data}", "",
             f"Command: `{result['command'].strip()}`; commit {m['commit']}, {m['cpu']} ({m['threads']} threads), "
             f"{m['date']}. Logistic regression on {a.train} training images, accuracy on {a.val} other training "
             "images.", "", "| stage | pooling | dims | " + " | ".join(targets) + " |",
             "|---|---|---|" + "---|" * len(targets)]
    lines += [f"| {r['stage']} | {r['pooling']} | {r['dims']} | " + " | ".join(f"{100 * r[t]:.1f}" for t in targets)
              + " |" for r in rows]
    (out / f"probe_split_{a.model}.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
