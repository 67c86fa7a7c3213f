"""What keeping rows in input order after every routed unit costs (issue: a branched model behaves like
the model it replaces).

A hard-routed tree runs each node on its rows and then scatters the outputs back to the input's order
(``routing.put_rows``) after every routed unit. This times the eval forward as it is against the same
forward with that scatter replaced by a no-op (rows left grouped by node: wrong order, same work
otherwise), interleaved in shuffled rounds (``baselines/timing.py``), at batch 1 and 64.
Writes ``--out``/reorder_cost.{json,md}.

    python -m benchmarks.reorder_cost [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch

import sigmab_plugin as sb
from benchmarks.common import machine
from sigmab_plugin import routing
from sigmab_plugin.baselines.timing import latency_ratios

MODELS = [("cifar_resnet20", 32), ("resnet18", 64)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    real = routing.put_rows
    for name, size in MODELS:
        calib = torch.randn(128, 3, size, size)
        tree = sb.branch(timm.create_model(name, num_classes=10), depth=2, keep_ratio=0.5, calib_data=calib,
                         progress=False).eval()
        for batch in (1, 64):
            x = torch.randn(batch, 3, size, size)

            def ordered():
                routing.put_rows = real
                return tree(x)

            def grouped():
                routing.put_rows = lambda y, order: y
                try:
                    return tree(x)
                finally:
                    routing.put_rows = real

            with torch.no_grad():
                leaves = sb.route(tree, x)
                spent = [0.0]

                def timed_put(y, order):
                    t0 = time.perf_counter()
                    out = real(y, order)
                    spent[0] += time.perf_counter() - t0
                    return out

                routing.put_rows = timed_put
                t0 = time.perf_counter()
                for _ in range(10):
                    tree(x)
                share = spent[0] / (time.perf_counter() - t0)
                routing.put_rows = real
            t = latency_ratios({"ordered": ordered, "grouped": grouped}, "grouped", rounds=a.rounds,
                               repeat=20 if batch == 1 else 5)
            rows.append({"model": name, "input": size, "batch": batch, "leaves_in_batch": len(leaves.unique()),
                         "ms_ordered": t["ordered"]["ms"], "ms_grouped": t["grouped"]["ms"],
                         "ratio": t["ordered"]["ratio"], "share_of_forward_in_reordering": share,
                         "ratio_range": [t["ordered"]["ratio_min"], t["ordered"]["ratio_max"]]})
            print(rows[-1], flush=True)
    meta = {"machine": machine(), "argv": argv if argv is not None else sys.argv[1:], "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reorder_cost.json").write_text(json.dumps(meta, indent=1))
    m = meta["machine"]
    lines = ["# Cost of input-order rows after every routed unit", "",
             f"`python -m benchmarks.reorder_cost {' '.join(meta['argv'])}` at commit {m['commit']} on {m['cpu']} "
             f"({m['threads']} threads, {m['gpu'] or 'no GPU'}), torch {m['torch']}, {m['date']}. Depth-2 trees "
             "(keep 0.5) of untrained models on random inputs, eval (hard routing); ratio = forward with the "
             "reordering / the same forward without it, median and range over interleaved rounds.", "",
             "| model | input | batch | leaves used | ms (ordered) | ms (grouped) | ratio (range) | time in the scatter |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {r['leaves_in_batch']} | {r['ms_ordered']:.2f} | "
                     f"{r['ms_grouped']:.2f} | {r['ratio']:.3f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | "
                     f"{100 * r['share_of_forward_in_reordering']:.2f}% |")
    lines += ["", "At batch 1 every unit has one node, so nothing is gathered or scattered. 'time in the scatter' is "
              "the wall time inside the reordering itself over 10 forwards (a direct measure, steadier than the "
              "ratio of two noisy timings on a shared machine)."]
    (out / "reorder_cost.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'reorder_cost.md'}")
    return meta


if __name__ == "__main__":
    main()
