"""Routing calibration on a finished harness run (``compare_baselines.py --out RUN``): test top-1, leaf
shares, per-leaf accuracy, best leaf and oracle of the saved SigmaB tree as trained, calibrated to the
training mass (the last epoch's ``train_leaf_share``) and to the soft mass at T=0.1
(``sigmab_plugin.calibrate_routing``, on a seeded subset of training inputs without augmentation).

    python -m benchmarks.calibration_diag RUN [calibration samples, default 2048]
"""
import copy
import json
import sys
import time

import torch

import sigmab_plugin as sb
from sigmab_plugin.finetune import evaluate
from benchmarks.common import load_run_tree


def ev(model, ds, tag):
    t = time.time()
    r = evaluate(model, ds.test.images, ds.test.labels, ds.normalize, diagnostics=True)
    n = sum(r["leaf_histogram"])
    print(f"{tag:28s} top1 {100 * r['top1']:.2f} mean-class {100 * r['mean_class_top1']:.2f} test shares "
          f"{[round(h / n, 3) for h in r['leaf_histogram']]} routed-leaf top1 "
          f"{[round(a, 3) for a in r['leaf_top1_routed']]} best leaf {100 * r['best_leaf_top1']:.2f} "
          f"oracle {100 * r['oracle_top1']:.2f} ({time.time() - t:.0f}s)", flush=True)


def main(run: str, n_cal: int = 2048) -> None:
    tree, ds, _ = load_run_tree(run)
    log = [json.loads(line) for line in open(f"{run}/sigmab/log.jsonl")]
    train_mass = log[-1]["train_leaf_share"]
    idx = torch.randperm(len(ds.train.labels), generator=torch.Generator().manual_seed(123))[:n_cal]
    cal = ds.normalize(ds.train.images[idx])
    print(run, "train mass", [round(a, 3) for a in train_mass], flush=True)
    ev(tree, ds, "as trained")
    for tag, kw in (("calib to train mass", dict(shares=train_mass)), ("calib to soft mass T=0.1", dict(temperature=0.1))):
        m = copy.deepcopy(tree)
        rep = sb.calibrate_routing(m, cal, **kw)
        print(tag, "target", [round(a, 3) for a in rep["leaf_mass"]], "calib shares before",
              [round(a, 3) for a in rep["leaf_share_before"]], "after", [round(a, 3) for a in rep["leaf_share_after"]],
              flush=True)
        ev(m, ds, tag)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
