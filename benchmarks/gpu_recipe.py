"""GPU recipe: the paper's setting at reduced scale on one GPU in about 8 minutes.

A timm ResNet-50 (10 or 100 classes) is trained from scratch on Tiny-ImageNet-100 at 32x32 (or the
CIFAR-10 JPEG set), then dense fine-tuning, SigmaB (depth 2), FPGM and HRank run through the same
harness with the same fine-tuning budget. The data archives are read from --data-root (a copy of
../shared/data). The same code runs on CPU at tiny size (--tiny, used by the tests).

    python -m benchmarks.gpu_recipe --data-root /path/to/data --out runs/gpu_recipe
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from sigmab_plugin.baselines.harness import HarnessConfig, format_table, run_comparison
from benchmarks.common import machine
from sigmab_plugin.finetune import FinetuneConfig


def main(argv=None) -> list:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="folder holding the .tar.gz archives")
    ap.add_argument("--data", default="tiny-imagenet-100-32", choices=["tiny-imagenet-100-32", "cifar10-jpeg"])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a few hundred images, 1 epoch: the CPU test size")
    ap.add_argument("--out", default="runs/gpu_recipe")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    tiny = dict(train_limit=256, test_limit=128, calib_size=64, pretrain_epochs=1) if a.tiny else {}
    ft = FinetuneConfig(epochs=1 if a.tiny else a.epochs, batch_size=64 if a.tiny else a.batch_size, lr=0.02,
                        progress=not a.tiny)
    cfg = HarnessConfig(model=a.model, data=a.data, data_root=a.data_root, methods=["dense", "sigmab", "fpgm", "hrank"],
                        depth=2, keep_ratio=0.5, prune_residual=True, pretrain_epochs=tiny.get("pretrain_epochs", a.pretrain_epochs),
                        pretrain_lr=0.1, finetune=ft, calib_size=tiny.get("calib_size", 512),
                        train_limit=tiny.get("train_limit"), test_limit=tiny.get("test_limit"), device=a.device,
                        out_dir=a.out)
    t0 = time.perf_counter()
    rows = run_comparison(cfg)
    meta = {"machine": machine(), "seconds": time.perf_counter() - t0, "argv": argv or sys.argv[1:]}
    (Path(a.out) / "recipe.json").write_text(json.dumps(meta, indent=1))
    print(format_table(rows))
    print(f"total {meta['seconds']:.0f}s on {meta['machine']['gpu'] or meta['machine']['cpu']}")
    return rows


if __name__ == "__main__":
    main()
