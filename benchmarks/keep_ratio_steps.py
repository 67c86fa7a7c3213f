"""The active fraction a tree reaches at each keep ratio: it moves in steps, because one keep ratio sets
every branched layer's width and widths are whole channels. Shows why a target active fraction can be
missed (the search takes the largest keep ratio under the budget, and the next step may be ~2% of dense
above it). Uses the harness's calibration set (512 training images, seed 0).

    python -m benchmarks.keep_ratio_steps --model resnet20 --keeps 0.60 0.61 0.62 0.63 0.64
"""
from __future__ import annotations

import argparse
import copy
import warnings
from typing import List, Tuple

import torch
from torch import nn

import sigmab_plugin as sb


def steps(dense: nn.Module, calib: torch.Tensor, keeps: List[float], **branch_options) -> List[Tuple[float, float]]:
    """``(keep ratio, active fraction of the largest path)`` for each keep ratio, on copies of ``dense``."""
    n = sum(p.numel() for p in dense.parameters())
    out = []
    for k in keeps:
        tree = sb.branch(copy.deepcopy(dense), calib_data=calib, keep_ratio=k, progress=False, **branch_options)
        out.append((k, sb.param_report(tree)["active_params_max"] / n))
    return out


def main(argv=None) -> None:
    from sigmab_plugin.baselines.data import load_dataset
    from sigmab_plugin.baselines.harness import HarnessConfig, calibration_set
    from sigmab_plugin.baselines.models import create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--checkpoint", default="../shared/weights/resnet20-12fca82f.th")
    ap.add_argument("--data", default="cifar10-jpeg")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--keeps", type=float, nargs="+", required=True)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    cfg = HarnessConfig(model=a.model, data=a.data, checkpoint=a.checkpoint, shortcut="A", depth=a.depth)
    data = load_dataset(cfg.data, seed=cfg.seed)
    dense = create_model(cfg.model, data.num_classes, cfg.checkpoint, cfg.shortcut).eval()
    calib = calibration_set(data.train, data.normalize, cfg.calib_size, cfg.seed)
    for k, f in steps(dense, calib, a.keeps, depth=cfg.depth, prune_residual=cfg.prune_residual,
                      coverage=cfg.coverage, seed=cfg.seed):
        print(f"keep {k:.4f}  active fraction {f:.4f}", flush=True)

if __name__ == "__main__":
    main()
