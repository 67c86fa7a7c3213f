"""Where batch-1 CPU latency goes: dense ResNet-50 against its routed tree and an exported path.

The latency goals of issue 11 compare the tree's batch-1 time with its MAC fraction. MACs count
only convolutions and the classifier, so this profiles (torch.profiler, self CPU time per operator,
2 threads, interleaved rounds) dense, the hard-routed tree and ``export_path`` for the routed leaf, and sums the time
per kind of operator: convolution, BatchNorm, elementwise (ReLU, add), routing and copies (index,
gather/scatter, cat), pooling and linear, and the rest. Writes
``<out>/latency_profile.{json,md}``.

    python -m benchmarks.latency_profile [--sizes 112 224] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import sigmab_plugin as sb
from benchmarks.common import count_macs, machine
from sigmab_plugin.baselines.data import load_dataset

KINDS = [  # (kind, exact aten names without a trailing "_", name prefixes), tried in this order
    ("conv", (), ("conv", "mkldnn_convolution", "_convolution", "_nnpack")),
    ("batch_norm", (), ("batch_norm", "native_batch_norm", "_native_batch_norm")),
    ("pool/linear", ("addmm", "mm", "linear", "matmul", "mean", "flatten"), ("adaptive_", "avg_pool", "max_pool")),
    ("elementwise", ("relu", "add", "mul", "clamp", "hardtanh", "silu", "sigmoid", "div", "sub"), ()),
    ("routing/copies", ("cat", "copy", "contiguous", "clone", "empty", "empty_like", "empty_strided", "zeros",
                        "zeros_like", "new_zeros", "new_empty", "argmax", "where", "nonzero", "unique", "sort",
                        "stack", "sum", "select", "slice", "_to_copy", "to", "expand", "gather", "scatter",
                        "index_put", "masked_fill", "bincount", "arange", "full", "ones", "eq", "ge", "lt"),
     ("index", "_unique", "masked_", "scatter_", "gather")),
]


def kind(op: str) -> str:
    name = op.split("::")[-1]
    bare = name.rstrip("_")
    for k, names, prefixes in KINDS:
        if bare in names or name.startswith(prefixes):
            return k
    return "other"


def profile_ms(fns: dict, runs: int, rounds: int = 5) -> dict:
    """Self CPU milliseconds per run of each model, summed by kind of operator (aten ops), profiled
    in ``rounds`` interleaved rounds of ``runs / rounds`` calls so drift of the machine hits all alike."""
    sums = {name: defaultdict(float) for name in fns}
    others = {name: defaultdict(float) for name in fns}
    per = max(1, runs // rounds)
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(per):
                        fn()
                for e in prof.key_averages():
                    if e.key.startswith("aten::"):
                        ms = e.self_cpu_time_total / 1000 / (per * rounds)
                        sums[name][kind(e.key)] += ms
                        if kind(e.key) == "other":
                            others[name][e.key] += ms
    return {name: {"total": sum(s.values()), **dict(s),
                   "other_ops": dict(sorted(others[name].items(), key=lambda kv: -kv[1])[:6])}
            for name, s in sums.items()}


def calls(dense, tree, path, x: torch.Tensor) -> dict:
    """What is profiled on batch ``x``: dense and the routed tree, and at batch 1 the exported path
    (it serves the leaf of one input; a batch spans several leaves)."""
    fns = {"dense": lambda: dense(x), "tree": lambda: tree(x)}
    if x.shape[0] == 1:
        fns["path"] = lambda: path(x)
    return fns


def main(argv=None) -> dict:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    ap.add_argument("--images", type=int, default=256, help="calibration images (Imagenette-112)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1, help="batch size (64: the throughput case; no exported path)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_dataset("imagenette-112", limit=a.images)
    calib = data.normalize(data.train.images)
    dense = timm.create_model("resnet50", num_classes=10).eval()
    rows = []
    for residual in (False, True):
        tree = sb.branch(copy.deepcopy(dense), depth=2, calib_data=calib, keep_ratio=0.5, prune_residual=residual,
                         progress=False).eval()
        for size in a.sizes:
            x1 = torch.nn.functional.interpolate(calib[:1], size=size, mode="bilinear")
            leaf = int(sb.route(tree, x1)[0])
            path = sb.export_path(tree, leaf).eval()
            macs = count_macs(path, x1) / count_macs(dense, x1)
            xb = torch.nn.functional.interpolate(calib[:a.batch], size=size, mode="bilinear")
            prof = profile_ms(calls(dense, tree, path, xb), a.runs)
            row = {"prune_residual": residual, "size": size, "batch": a.batch, "mac_fraction": macs, "ms": prof}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"command": "python -m benchmarks.latency_profile " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "latency_profile" + (f"_b{a.batch}" if a.batch > 1 else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(report(result))
    return result


def report(r: dict) -> str:
    m = r["machine"]
    kinds = [k for k, _, _ in KINDS] + ["other"]
    batch = r["rows"][0].get("batch", 1) if r["rows"] else 1
    lines = [f"# Batch-{batch} CPU time by kind of operator: timm ResNet-50, keep 0.5, depth 2", "",
             f"Command: `{r['command'].strip()}`; commit {m['commit']}, {m['cpu']} ({m['threads']} threads), "
             f"{m['date']}.", "",
             "Self CPU time of the leaf aten operators under torch.profiler, ms per batch (the profiler adds "
             "its own overhead, so totals exceed the unprofiled latency). 'ratio' is the model's time for that "
             "kind over dense's; the MAC fraction counts convolutions and the classifier only. The three models "
             "are profiled in 5 interleaved rounds; ratios still move by a few hundredths between runs of the "
             "script (`branch_resnet50.md` has the latency ratios; this table says where the time goes).", "",
             "| residual | px | MAC frac | model | total ms (ratio) | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|" + "---|" * len(kinds)]
    for row in r["rows"]:
        d = row["ms"]["dense"]
        for name, p in row["ms"].items():
            cells = [f"{p.get(k, 0):.2f}" + (f" ({p.get(k, 0) / d[k]:.2f})" if name != "dense" and d.get(k) else "")
                     for k in kinds]
            lines.append(f"| {row['prune_residual']} | {row['size']} | {row['mac_fraction']:.3f} | {name} | "
                         f"{p['total']:.2f}" + (f" ({p['total'] / d['total']:.2f})" if name != "dense" else "")
                         + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
