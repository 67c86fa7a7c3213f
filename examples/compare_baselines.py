"""Compare SigmaB with dense fine-tuning, FPGM (Torch-Pruning and NNI) and HRank in one fair harness.

With no arguments: the embedded digits comparison (a CIFAR ResNet-20 trained from scratch on
scikit-learn's digits, then every method fine-tuned with the same budget), a few minutes on 2 cores.

    python examples/compare_baselines.py
    python examples/compare_baselines.py --model resnet56 --data cifar10-jpeg \
        --checkpoint ../shared/weights/resnet56-4bfd9763.th --shortcut A --epochs 2 --train-limit 10000
    python examples/compare_baselines.py --sweep 0.5 0.75 1.0     # each method over several budgets

Writes results.{json,csv} and top1_vs_active.png to --out and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from sigmab_plugin.allocator import keep_freed_memory
from sigmab_plugin.baselines.data import DATASETS
from sigmab_plugin.baselines.harness import STATIC_SHAPES, HarnessConfig, format_table, plot, run_comparison
from sigmab_plugin.baselines.registry import available_methods
from sigmab_plugin.config import CHANNEL_SCORES
from sigmab_plugin.finetune import BN_MODES, ROUTE_INPUTS, FinetuneConfig


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="SigmaB vs static pruning, same data/budget/fine-tuning.")
    ap.add_argument("--model", default="resnet20", help="resnet20/32/44/56 (CIFAR) or a timm model name")
    ap.add_argument("--data", default="digits", choices=DATASETS)
    ap.add_argument("--data-root", default=None, help="folder of the data (default ../shared/data for archives)")
    ap.add_argument("--checkpoint", default=None, help="pretrained dense weights (local file)")
    ap.add_argument("--width", type=float, default=None, help="channel multiplier (PointNet++ models)")
    ap.add_argument("--shortcut", default="B", choices=["A", "B"], help="CIFAR ResNet shortcut option")
    ap.add_argument("--methods", nargs="+", default=["dense", "sigmab", "fpgm", "hrank", "fpgm_nni"])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--no-residual", action="store_true", help="do not prune residual-stream channels")
    ap.add_argument("--coverage", action=argparse.BooleanOptionalAction, default=False,
                    help="SigmaB siblings together keep every dense channel (needs keep >= 0.5; off: each child keeps "
                         "its own most active channels, measured +1 pp at equal active parameters)")
    ap.add_argument("--channel-score", default=HarnessConfig.channel_score, choices=CHANNEL_SCORES,
                    help="how each SigmaB node ranks its channels: mean |activation| on its samples, or that times "
                         "the norm of the weights each channel feeds (activation_weight)")
    ap.add_argument("--router-grid", type=int, default=HarnessConfig.router_grid, metavar="G",
                    help="SigmaB's routers read each split-point feature map averaged over a G x G grid of cells "
                         "(1: the global average; 2: four quadrants, 4x the features; image models only)")
    ap.add_argument("--target-fraction", type=float, default=None, help="active fraction to reach (overrides keep)")
    ap.add_argument("--keep-shape", type=float, nargs="+", default=None, metavar="RATIO",
                    help="SigmaB: relative keep ratio of each level, e.g. '1 0.7' (the leaves keep 0.7 of the share "
                         "the level above keeps; the common scale is searched to --target-fraction)")
    ap.add_argument("--static-shape", default=HarnessConfig.static_shape, choices=STATIC_SHAPES,
                    help="FPGM/HRank: one pruning ratio everywhere (uniform, their published form), or the SigmaB "
                         "tree's allocation (tree: the backbone whole, each level in the tree's keep proportion)")
    ap.add_argument("--sweep", type=float, nargs="+", default=None, help="keep ratios: one comparison per budget")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 4; digits 6)")
    ap.add_argument("--pretrain-epochs", type=int, default=None,
                    help="train the dense model first: from --checkpoint when given, else from scratch (digits: 12)")
    ap.add_argument("--pretrain-lr", type=float, default=None,
                    help="learning rate of that training (default 0.1; digits 0.05); from a checkpoint, e.g. 0.02")
    ap.add_argument("--reset-classifier", action="store_true",
                    help="zero the checkpoint's classifier before --pretrain-epochs (transfer to other classes)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64)
    d = FinetuneConfig()
    ap.add_argument("--distill", type=float, default=d.distill_weight,
                    help="weight of distillation from the dense model, for every method (0: off)")
    ap.add_argument("--distill-paths", default=d.distill_paths, choices=["all", "weighted"],
                    help="SigmaB: distil every path unweighted, or weighted by P(path)")
    ap.add_argument("--objective", default=d.objective, choices=["expected", "mixture"],
                    help="SigmaB: expected per-path loss, or cross-entropy of the path mixture")
    ap.add_argument("--balance-weight", type=float, default=d.balance_weight, help="SigmaB: load-balance loss weight")
    ap.add_argument("--balance-rate", type=float, default=d.balance_rate,
                    help="SigmaB: step of the routers' load-balancing offsets per batch (0: off)")
    ap.add_argument("--decisive-weight", type=float, default=d.decisive_weight,
                    help="SigmaB: weight of the per-sample leaf entropy, so routers commit instead of hedging")
    ap.add_argument("--top-k", type=int, default=d.top_k, help="SigmaB: soft routing keeps k paths per sample")
    ap.add_argument("--bn-weighting", action=argparse.BooleanOptionalAction, default=d.bn_weighting,
                    help="SigmaB: node BatchNorm statistics weighted by path probability in soft training")
    ap.add_argument("--bn-mode", default=d.bn_mode, choices=BN_MODES,
                    help="BatchNorm statistics in fine-tuning: batch statistics; 'shared': SigmaB's shared backbone "
                         "uses running statistics, as deployed, so the root router trains on the features it routes "
                         "(static methods train as with 'batch'); 'frozen': every method's layers all do")
    ap.add_argument("--bn-recalibration-batches", type=int, default=d.bn_recalibration_batches,
                    help="with --bn-mode shared/frozen: training batches that first re-estimate the statistics")
    ap.add_argument("--route-inputs", default=d.route_inputs, choices=ROUTE_INPUTS,
                    help="SigmaB: what the routers decide on in training: each sample's augmented input, or its "
                         "'clean' (unaugmented) one, as in deployment, while the leaves train on the augmented one")
    ap.add_argument("--node-lr-scale", action=argparse.BooleanOptionalAction, default=d.node_lr_scale,
                    help="SigmaB: each node's layers train at lr times the nodes of its level (weight decay divided "
                         "by it), so a leaf, which gets about 1/leaves of a static layer's gradient, moves as far "
                         "per step (default on; --no-node-lr-scale: one lr, as runs before 2026-12-07)")
    ap.add_argument("--hard-epochs", type=int, default=d.hard_epochs, help="last epochs trained with hard routing (SigmaB)")
    ap.add_argument("--calibrate-routing", action=argparse.BooleanOptionalAction, default=False,
                    help="SigmaB: after fine-tuning, shift the routers' thresholds so hard routing gives each leaf "
                         "the share of training it received (sigmab_plugin.calibrate_routing)")
    ap.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=False,
                    help="every pruned method: before fine-tuning, refit its pruned layers to the dense layers by "
                         "least squares on the calibration inputs (sigmab_plugin.reconstruct; per node for SigmaB)")
    ap.add_argument("--reconstruct-ridge", nargs="+", default=[], metavar="RIDGE|METHOD=RIDGE",
                    help="with --reconstruct: the ridge's pull towards the pruned weights, relative to the input "
                         "energy (0.01: close fit; 1.0: looser). A number sets every method's; METHOD=RIDGE one "
                         "method's, e.g. '0.01 fpgm=1 hrank=1' (each method's best on a validation split, "
                         "benchmarks/results/ablate_recon.md)")
    ap.add_argument("--resume", action="store_true", help="continue each method from its checkpoint in --out")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the memory each training step frees in the process (glibc; sigmab_plugin."
                         "keep_freed_memory): faster CPU training of large tensors (benchmarks/results/allocator_speed.md), "
                         "at the cost of holding the peak memory. No effect on other C libraries")
    return ap


def parse(argv=None) -> tuple:
    ap = parser()
    a = ap.parse_args(argv)
    bad = [m for m in a.methods if m not in available_methods()]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {available_methods()}")
    ridge, ridges = _ridges(a.reconstruct_ridge, ap.error)
    if a.reconstruct_ridge and not a.reconstruct:
        ap.error("--reconstruct-ridge sets the ridge of --reconstruct's refit: add --reconstruct (or drop the ridge)")
    for k in [a.keep_ratio] + (a.sweep or []):
        if not 0 < k <= 1:
            ap.error(f"keep ratio {k} must lie in (0, 1]")
    digits = a.data == "digits"
    points = a.data.startswith("modelnet40")
    epochs = a.epochs if a.epochs is not None else (6 if digits else 4)
    pre = a.pretrain_epochs if a.pretrain_epochs is not None else (12 if digits and not a.checkpoint else 0)
    ft = FinetuneConfig(epochs=epochs, lr=a.lr, batch_size=a.batch_size, flip=not (digits or points), seed=a.seed,
                        distill_weight=a.distill, distill_paths=a.distill_paths, objective=a.objective,
                        balance_weight=a.balance_weight, balance_rate=a.balance_rate, top_k=a.top_k,
                        decisive_weight=a.decisive_weight,
                        bn_weighting=a.bn_weighting, bn_mode=a.bn_mode,
                        bn_recalibration_batches=a.bn_recalibration_batches, route_inputs=a.route_inputs,
                        node_lr_scale=a.node_lr_scale,
                        hard_epochs=min(a.hard_epochs, epochs),
                        progress=not a.quiet)
    cfg = HarnessConfig(model=a.model, data=a.data, data_root=a.data_root, checkpoint=a.checkpoint,
                        shortcut=a.shortcut, methods=a.methods, depth=a.depth, keep_ratio=a.keep_ratio,
                        prune_residual=not a.no_residual, coverage=a.coverage, channel_score=a.channel_score,
                        router_grid=a.router_grid,
                        target_fraction=a.target_fraction, keep_shape=a.keep_shape, static_shape=a.static_shape,
                        pretrain_epochs=pre,
                        finetune=ft, pretrain_lr=a.pretrain_lr if a.pretrain_lr is not None else (0.05 if digits else 0.1),
                        reset_classifier=a.reset_classifier, calib_size=a.calib_size,
                        train_limit=a.train_limit, test_limit=a.test_limit, seed=a.seed, out_dir=a.out,
                        resume=a.resume, calibrate_routing=a.calibrate_routing, reconstruct=a.reconstruct,
                        reconstruct_ridge=ridge, reconstruct_ridges=ridges, device=a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                        model_kwargs={} if a.width is None else {"width": a.width})
    return cfg, a.sweep


def _ridges(values, error):
    """``['0.01', 'fpgm=1']`` -> (0.01, {'fpgm': 1.0}): one number for every method, METHOD=RIDGE overrides."""
    ridge, ridges = HarnessConfig.reconstruct_ridge, {}
    for v in values:
        name, _, number = v.rpartition("=")
        try:
            r = float(number)
        except ValueError:
            error(f"--reconstruct-ridge {v!r}: give a number (0.01) or METHOD=NUMBER (fpgm=1)")
        if name:
            ridges[name] = r
        else:
            ridge = r
    return ridge, ridges


def main(argv=None) -> list:
    warnings.filterwarnings("ignore")
    cfg, sweep = parse(argv)
    if parser().parse_known_args(argv)[0].keep_freed_memory:
        keep_freed_memory()
    try:
        cfg.validate()
        if not sweep:
            rows = run_comparison(cfg)
        else:
            rows = []
            for keep in sweep:
                sub = HarnessConfig(**{**asdict(cfg), "finetune": cfg.finetune, "keep_ratio": keep,
                                       "out_dir": str(Path(cfg.out_dir) / f"keep{keep}")})
                rows += run_comparison(sub)
            out = Path(cfg.out_dir)
            (out / "sweep.json").write_text(json.dumps(rows, indent=1))
            plot(rows, out / "top1_vs_active.png", f"{cfg.model} on {cfg.data}: sweep {sweep}")
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(format_table(rows))
    print(f"\nwrote {cfg.out_dir}/results.json, results.csv, top1_vs_active.png")
    return rows


if __name__ == "__main__":
    main()
