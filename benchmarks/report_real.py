"""Turn the real-data runs (runs/real/*/results.json) into benchmarks/results/real_results.{md,json}.

    python -m benchmarks.report_real runs/real benchmarks/results
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks.common import machine

GOAL_REDUCTION, GOAL_PP, GOAL_MARGIN_PP = 0.55, 1.5, 15.0


def _row(r: dict, dense_top1) -> str:
    delta = "" if dense_top1 is None else f"{100 * (r['top1'] - dense_top1):+.2f}"
    hist = r.get("leaf_histogram") or ""
    ratio = r.get("latency_ratio_b1")  # interleaved with dense (older runs: a single median in ms)
    lat = f"{ratio:.2f}x" if ratio is not None else f"{r['latency_ms_b1']:.2f} ms"
    tree = ("" if "conditional_gain" not in r else
            f"{100 * r['best_leaf_top1']:.2f} / {100 * r['oracle_top1']:.2f} / {100 * r['conditional_gain']:+.2f}")
    ips = r.get("train_images_per_second")
    return (f"| {r['method']} | {r['stored_params']:,} | {r['active_params']:,} | {r['active_fraction']:.3f} | "
            f"{100 * r['top1_before_finetune']:.2f} | {100 * r['top1']:.2f} | {delta} | {lat} | "
            f"{'' if ips is None else f'{ips:.0f}'} | {hist} | {tree} |")


def fpgm_overlap(checkpoint: Path) -> dict:
    """Share of filters kept by both FPGM variants at 50% per block-internal conv of the pretrained net."""
    import torch
    import torch_pruning as tp

    from sigmab_plugin.adapters.cifar_resnet import cifar_resnet
    from sigmab_plugin.baselines.fpgm_nni import internal_convs, nni_masks

    model = cifar_resnet(56, 10, "A", checkpoint).eval()
    x = torch.zeros(1, 3, 32, 32)
    layers = internal_convs(model, x, "linear")
    removed = nni_masks(model, layers, 0.5)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    shares = []
    for name in layers:
        conv = model.get_submodule(name)
        n = conv.out_channels
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(n)))
        tp_keep = set(torch.topk(tp.importance.FPGMImportance(p=2)(group), n - n // 2).indices.tolist())
        nni_keep = set(range(n)) - set(removed[name].tolist())
        shares.append(len(tp_keep & nni_keep) / len(nni_keep))
    return {"layers": len(layers), "mean_overlap": sum(shares) / len(shares), "min_overlap": min(shares)}


def main(runs: str, out: str) -> None:
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    lines = ["# SigmaB vs static pruning on real data", "",
             f"Generated {m['date']} by `bash benchmarks/real_results.sh` (commit {m['commit']}) on {m['cpu']}, "
             f"{m['threads']} threads, torch {m['torch']}, no GPU.", "",
             "Every method starts from the same dense reference and gets the same fine-tuning (epochs, batch, "
             "optimiser, schedule, augmentation, seed, data). Static methods are pruned to the active parameters "
             "of SigmaB's largest path. Top-1 is on the held-out split with hard routing (deployed behaviour); "
             "`before` is top-1 right after pruning/branching, before fine-tuning.", ""]
    summary = {}
    dense_by_data = {}
    for res in sorted(runs.glob("*/results.json")):
        data = json.loads(res.read_text())
        rows, cfg = data["rows"], data["config"]
        dense = next((r for r in rows if r["method"] == "dense"), None)
        if dense is not None:
            dense_by_data[(cfg["data"], cfg["model"])] = dense["top1"]
        dense_top1 = dense_by_data.get((cfg["data"], cfg["model"]))
        ft = cfg["finetune"]
        lines += [f"## {res.parent.name}: {cfg['model']} on {cfg['data']}, depth {cfg['depth']}", "",
                  f"Fine-tuning: {ft['epochs']} epochs on {rows[0]['train_images']:,} training images, batch "
                  f"{ft['batch_size']}, SGD lr {ft['lr']} cosine, router temperature {ft['temperature_start']} -> "
                  f"{ft['temperature_end']}, last {ft['hard_epochs']} epoch(s) hard-routed, objective "
                  f"{ft.get('objective', 'mixture')}, balance weight {ft.get('balance_weight', 0.1)}, distillation "
                  f"weight {ft.get('distill_weight', 0) if any(r.get('distilled') for r in rows) else 0} for every "
                  f"method; evaluated on "
                  f"{rows[0]['test_images']:,} images. Dense reference before fine-tuning: "
                  f"{100 * rows[0]['dense_reference_top1']:.2f}%"
                  + (f"; pretrained from scratch for {cfg['pretrain_epochs']} epochs here." if cfg["pretrain_epochs"] else "."),
                  "", "| method | stored | active | active frac | top-1 before (%) | top-1 (%) | vs dense (pp) "
                  "| b1 latency (vs dense) | train img/s | leaf histogram | best leaf / oracle / cond. gain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row(r, dense_top1) for r in rows]
        sig = next((r for r in rows if r["method"] == "sigmab"), None)
        if sig is not None and dense_top1 is not None:
            reduction = 1 - sig["active_fraction"]
            gap = 100 * (dense_top1 - sig["top1"])
            statics = {r["method"]: 100 * (r["top1"] - sig["top1"]) for r in rows if r.get("budget")}
            verdict = reduction >= GOAL_REDUCTION and gap <= GOAL_PP
            lines += ["", f"Goal (>= {GOAL_REDUCTION:.0%} fewer active params within {GOAL_PP} pp of dense): "
                          f"reduction {reduction:.1%}, gap {gap:.2f} pp -> **{'met' if verdict else 'not met'}**.",
                      "At the same active budget, static methods minus SigmaB (pp): "
                      + ", ".join(f"{k} {v:+.2f}" for k, v in statics.items()) + "."]
            summary[res.parent.name] = {"reduction": reduction, "gap_pp": gap, "goal_met": verdict,
                                        "static_minus_sigmab_pp": statics}
        plot = res.parent / "top1_vs_active.png"
        if plot.is_file():
            shutil.copy(plot, out / f"real_{res.parent.name}.png")
            lines += ["", f"![top-1 vs active fraction](real_{res.parent.name}.png)"]
        lines.append("")
    ckpt = Path(__file__).resolve().parents[2] / "shared" / "weights" / "resnet56-4bfd9763.th"
    overlap = fpgm_overlap(ckpt) if ckpt.is_file() else None
    if overlap:
        lines += ["## The two FPGM baselines", "",
                  f"On the {overlap['layers']} block-internal convs of the pretrained ResNet-56, at 50% per layer, "
                  f"Torch-Pruning's FPGMImportance and NNI's FPGMPruner keep the same filter for "
                  f"{overlap['mean_overlap']:.1%} of kept filters on average (worst layer {overlap['min_overlap']:.1%}). "
                  "They differ by design: TP measures distances between |w|^2 vectors and averages in the next "
                  "layer's input columns; NNI (like the paper) uses each layer's raw filters. Both formulas are "
                  "checked in tests/test_baselines.py.", ""]
    (out / "real_results.json").write_text(json.dumps({"machine": m, "summary": summary, "fpgm_overlap": overlap},
                                                      indent=1))
    (out / "real_results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) >= 3 else ("runs/real", "benchmarks/results")))
