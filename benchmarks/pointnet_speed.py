"""PointNet++ throughput (shapes/s) on this machine: what sampling and grouping cost, and what reusing
them saves, for the dense model and a SigmaB tree (depth 2, keep ratio 0.5).

* training step (forward, backward, SGD) with grouping on the fly, and the grouping's share of it;
* evaluation with grouping on the fly (``model.cache = False``) and from the per-cloud cache (every
  test cloud's indices computed once, as in per-epoch test evaluation and for a distillation teacher).

ModelNet40 clouds from ``--data`` (``../shared/data/modelnet40-1024.npz``) when present, else random
clouds of the same size. Writes ``--out``/pointnet_speed.{json,md}.

    python -m benchmarks.pointnet_speed [--variant ssg] [--width 0.25] [--batch 32] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import sigmab_plugin as sb
from benchmarks.common import machine
from sigmab_plugin.adapters import pointnet2 as pn


def _clouds(path: Path, n: int) -> torch.Tensor:
    if path.is_file():
        from sigmab_plugin.baselines.points import load_points
        data = load_points("modelnet40", str(path.parent))
        return data.test.images[:n].float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 1024, generator=g)
    return x / x.norm(dim=1, keepdim=True).amax(-1, keepdim=True)


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model, x, y, repeat: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def group():
        with torch.no_grad():
            model.train()
            model.grouping(x)

    def evaluate(cache: bool):
        def run():
            model.eval()
            model.cache = cache
            with torch.no_grad():
                model(x)
        return run

    b = len(x)
    train_s, group_s = _time(step, repeat), _time(group, repeat)
    pn.CACHE.store.clear()
    eval_fresh = _time(evaluate(False), repeat)
    eval_cached = _time(evaluate(True), repeat)  # the warm-up call filled the cache
    model.cache = True
    return {"train_shapes_per_s": b / train_s, "grouping_share_of_train_step": group_s / train_s,
            "grouping_ms_per_batch": 1e3 * group_s, "eval_shapes_per_s_on_the_fly": b / eval_fresh,
            "eval_shapes_per_s_cached": b / eval_cached}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="ssg", choices=["ssg", "msg"])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/modelnet40-1024.npz")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    x = _clouds(Path(a.data), a.batch + 128)
    calib, x = x[a.batch:], x[:a.batch]
    y = torch.randint(0, 40, (a.batch,))
    dense = pn.PointNet2(40, a.variant, a.width)
    rows = {"dense": measure(dense, x, y, a.repeat)}
    print("dense", rows["dense"], flush=True)
    tree = sb.branch(pn.PointNet2(40, a.variant, a.width), depth=2, keep_ratio=0.5, calib_data=calib, progress=False)
    sb.set_routing(tree, "soft")
    rows["sigmab_soft_train"] = measure(tree, x, y, a.repeat)
    print("tree", rows["sigmab_soft_train"], flush=True)
    meta = {"machine": machine(), "argv": argv if argv is not None else sys.argv[1:], "variant": a.variant,
            "width": a.width, "batch": a.batch, "points": x.shape[-1], "real_data": Path(a.data).is_file(),
            "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pointnet_speed.json").write_text(json.dumps(meta, indent=1))
    m = meta["machine"]
    lines = [f"# PointNet++ {a.variant.upper()} throughput (width {a.width}, batch {a.batch}, {x.shape[-1]} points)", "",
             f"`python -m benchmarks.pointnet_speed {' '.join(meta['argv'])}` at commit {m['commit']} on {m['cpu']} "
             f"({m['threads']} threads, {m['gpu'] or 'no GPU'}), torch {m['torch']}, {m['date']}; "
             f"{'ModelNet40 test clouds' if meta['real_data'] else 'random clouds'}. Medians of {a.repeat} runs.", "",
             "| model | train shapes/s | grouping share of a train step | eval shapes/s, grouping on the fly | "
             "eval shapes/s, cached grouping |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['train_shapes_per_s']:.1f} | {100 * r['grouping_share_of_train_step']:.0f}% | "
                     f"{r['eval_shapes_per_s_on_the_fly']:.1f} | {r['eval_shapes_per_s_cached']:.1f} |")
    (out / "pointnet_speed.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'pointnet_speed.md'}")
    return meta


if __name__ == "__main__":
    main()
