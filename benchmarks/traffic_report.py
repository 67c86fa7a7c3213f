"""Memory traffic per inference (sigmab_plugin.traffic) for dense, FPGM-pruned and SigmaB-tree models.

ResNet-50 (timm, 1000 classes, 224x224 input; branched on Imagenette images) and the pretrained
CIFAR ResNet-20/56 (32x32; branched on CIFAR-10 images). The tree is SigmaB at 0.40 active (depth
2, the default recipe's branching); FPGM is pruned to the tree's largest path. For on-chip buffers
of 0.5, 2 and 8 MiB and 1, 2, 4 bytes per weight: off-chip weight bytes per inference (the tree's
worst leaf and its calibration-share expectation) and the activation upper bound. Writes
benchmarks/results/traffic.{json,md,png}.

    python -m benchmarks.traffic_report [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sigmab_plugin as sb

from benchmarks.common import machine
from sigmab_plugin.baselines.data import load_dataset
from sigmab_plugin.baselines.models import classifier_name, create_model
from sigmab_plugin.baselines.registry import RunContext, get_method
from sigmab_plugin.traffic import traffic

BUFFERS, BPW = (0.5, 2, 8), (1, 2, 4)


def models(name: str, calib: torch.Tensor, target: float, seed: int = 0) -> dict:
    if name == "resnet50":
        import timm
        dense = timm.create_model("resnet50", num_classes=1000).eval()
    else:
        weights = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}[name]
        dense = create_model(name, 10, str(Path("../shared/weights") / weights), "A").eval()
    run = RunContext(dense, calib, None, dict(depth=2, prune_residual=True, coverage=False), classifier_name(dense),
                     seed, target)
    tree = get_method("sigmab").prepare(run)
    run.budget = sb.param_report(tree)["active_params_max"]
    static = get_method("fpgm").prepare(run)
    return {"dense": dense, "fpgm": static, "sigmab": tree}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--target-fraction", type=float, default=0.4)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name, data_name, size in (("resnet20", "cifar10-jpeg", 32), ("resnet56", "cifar10-jpeg", 32),
                                  ("resnet50", "imagenette-112", 224)):
        data = load_dataset(data_name)
        idx = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(0))[:256]
        calib = data.normalize(data.train.images[idx])
        x1 = calib[:1] if size == calib.shape[-1] else F.interpolate(calib[:1], size=size, mode="bilinear")
        built = models(name, calib, a.target_fraction)
        for method, model in built.items():
            params = sum(p.numel() for p in model.parameters())
            for mib in BUFFERS:
                for b in BPW:
                    t = traffic(model, x1, int(mib * 2 ** 20), b)
                    rows.append({"model": name, "method": method, "buffer_mib": mib, "bytes_per_weight": b,
                                 "stored_params": params, "weight_bytes": t["weight_bytes"],
                                 "weight_bytes_expected": t.get("weight_bytes_expected", t["weight_bytes"]),
                                 "activation_bytes": t["activation_bytes"], "input": size})
        print(f"{name}: done", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    (out / "traffic.json").write_text(json.dumps({"machine": m, "argv": argv or sys.argv[1:], "rows": rows}, indent=1))
    write_report(rows, m, out)


def write_report(rows, m, out: Path) -> None:
    lines = ["# Off-chip memory traffic per inference: dense, FPGM and a SigmaB tree path", "",
             f"Generated {m['date']} by `python -m benchmarks.traffic_report` (commit {m['commit']}).", "",
             "Model (sigmab_plugin/traffic.py): an on-chip buffer keeps weights resident across inferences, chosen "
             "first-fit in execution order (for the tree: the backbone, then the routers, then every node level by "
             "level); every other weight a path uses is read from off-chip memory on every inference. Activations "
             "are an upper bound: each conv/linear reads its input and writes its output off-chip once, at the "
             "weights' bytes per value. The tree is SigmaB at 0.40 active (its worst leaf and the calibration-share "
             "expectation); FPGM is pruned to the tree's largest path. MB = 10^6 bytes.", "",
             "| model | buffer (MiB) | bytes/weight | dense MB | FPGM MB | tree worst leaf MB | tree expected MB | "
             "tree / dense | activations dense / tree MB |", "|---|---|---|---|---|---|---|---|---|"]
    key = {(r["model"], r["method"], r["buffer_mib"], r["bytes_per_weight"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for mib in BUFFERS:
            for b in BPW:
                d, s, t = (key[(model, k, mib, b)] for k in ("dense", "fpgm", "sigmab"))
                ratio = t["weight_bytes"] / d["weight_bytes"] if d["weight_bytes"] else float("nan")
                lines.append(f"| {model} | {mib} | {b} | {d['weight_bytes'] / 1e6:.3f} | {s['weight_bytes'] / 1e6:.3f} | "
                             f"{t['weight_bytes'] / 1e6:.3f} | {t['weight_bytes_expected'] / 1e6:.3f} | {ratio:.2f} | "
                             f"{d['activation_bytes'] / 1e6:.2f} / {t['activation_bytes'] / 1e6:.2f} |")
    lines += ["", "![weight traffic vs buffer](traffic.png)", ""]
    (out / "traffic.md").write_text("\n".join(lines))
    plot(rows, out / "traffic.png")
    print(f"wrote {out / 'traffic.md'}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models_), figsize=(5 * len(models_), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models_):
        for method, style in (("dense", "k-o"), ("fpgm", "b-s"), ("sigmab", "r-^")):
            for b, alpha in ((1, 1.0), (4, 0.45)):
                pts = sorted((r["buffer_mib"], r["weight_bytes"] / 1e6) for r in rows
                             if r["model"] == model and r["method"] == method and r["bytes_per_weight"] == b)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, alpha=alpha, label=f"{method}, {b} B/weight")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("on-chip buffer (MiB)")
        ax.set_ylabel("off-chip weight MB / inference")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
