"""Turn the long comparison (runs/long/*/results.json, from benchmarks/long_comparison.sh) into
benchmarks/results/long_comparison.{md,json,png}: every run, the margins at equal active parameters,
the reduction at matched top-1 (the paper's framing) and the goals of issue 4, met or missed.
The ModelNet40 comparison (benchmarks/modelnet40.sh) uses it with its own stem, script and goal.

    python -m benchmarks.report_long runs/long benchmarks/results [--prior benchmarks/results/long_comparison.json]
    python -m benchmarks.report_long RUNS OUT STEM SCRIPT DENSE_GAP_GOAL_PP [--prior REPORT.json]

``--prior`` adds the rows of an earlier report for (run, method) pairs that RUNS does not hold (run
directories do not survive every machine); the report says which rows came from where. Sections written
by hand under the plot of an earlier report (commands, diagnoses) are kept when it is regenerated.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional

from benchmarks.common import machine
from sigmab_plugin.baselines.harness import HarnessConfig
from sigmab_plugin.finetune import BEFORE_FIELD, FinetuneConfig

STATIC = ("fpgm", "hrank")


# the tree's training recipe: a row that departs from the default is its own variant, named by the change
TREE_RECIPE = ("objective", "balance_weight", "balance_rate", "decisive_weight", "distill_paths", "top_k",
               "bn_weighting", "hard_epochs", "temperature_start", "temperature_end", "bn_mode",
               "bn_recalibration_batches", "route_inputs", "node_lr_scale")
# the part of the recipe that changes every method's training (a static model's BatchNorm freezes under 'frozen')
EVERY_RECIPE = ("bn_mode",)


def variant(r: dict) -> str:
    """The method as the report names it: "+recon" marks a model refit by ``sb.reconstruct`` before fine-tuning
    (harness --reconstruct), so those rows are compared beside the plain ones, never averaged with them; a
    ridge other than the harness's default is named ("+recon@1"). A tree trained with another recipe than
    the default (``--decisive-weight 0.5``...) or with its routing calibrated is named by the change too
    ("sigmab+decisive_weight=0.5"), as is a tree whose nodes rank channels by another score than the default
    (``+channel_score=...``; a row from before the option ranked by activation); a key a row lacks (an older run)
    counts as the default, or as runs trained before the key existed where that differs (``BEFORE_FIELD``: a row
    without ``node_lr_scale`` trained without it)."""
    name = r["method"]
    default, ft = FinetuneConfig(), r.get("finetune") or {}
    keys = TREE_RECIPE if name == "sigmab" else EVERY_RECIPE
    if name != "sigmab" and ft.get("bn_mode") == "shared":  # no shared layers to freeze: trains as 'batch'
        keys = ()
    ft = {**{k: v for k, v in BEFORE_FIELD.items() if k in keys}, **ft}  # a row from before the field existed
    name += "".join(f"+{k}={ft[k]:g}" if isinstance(ft[k], float) else f"+{k}={ft[k]}"
                    for k in keys if k in ft and ft[k] != getattr(default, k))
    score = r.get("channel_score", "activation")
    if r["method"] == "sigmab" and score != HarnessConfig.channel_score:
        name += f"+channel_score={score}"
    if r["method"] == "sigmab" and r.get("router_grid", 1) != HarnessConfig.router_grid:
        name += f"+router_grid={r.get('router_grid', 1)}"
    if r["method"] == "sigmab" and r.get("routing_calibration"):
        name += "+calibrated"
    keep = r.get("keep_ratio")
    if r["method"] == "sigmab" and isinstance(keep, list):  # per-level keep ratios (harness --keep-shape)
        name += "+keep_shape=" + ":".join(f"{k / max(keep):.2g}" for k in keep)
    if r.get("static_shape"):  # a static method pruned with the tree's allocation (harness --static-shape tree)
        ratios = list(dict.fromkeys(r["static_shape"].values()))  # the levels' ratios, in order
        name += "+tree_alloc" + ("" if len(ratios) == 1 else "=" + ":".join(f"{k / max(ratios):.2g}" for k in ratios))
    rec = r.get("reconstruction")
    if not rec:
        return name
    ridge = rec.get("ridge", 0.01)  # rows from before the ridge was recorded ran at 0.01
    return name + "+recon" + ("" if ridge == HarnessConfig.reconstruct_ridge else f"@{ridge:g}")


def command(script: str) -> str:
    """How ``script`` is run: ``bash x.sh`` for a shell script, ``python -m a.b`` for a Python module."""
    return f"python -m {script[:-3].replace('/', '.')}" if script.endswith(".py") else f"bash {script}"


def ran_on_text(m: dict) -> Optional[str]:
    """The machine a run's results.json names (its GPU, else its CPU), or None for runs that name none: a
    report written on one machine over runs made on another (a lent GPU) says where each row was measured."""
    return m.get("gpu") or m.get("cpu")


def load(runs: Path, prior: Optional[Path] = None) -> List[dict]:
    rows = []
    for f in sorted(runs.glob("*/results.json")):
        data = json.loads(f.read_text())
        frac = data["config"]["target_fraction"]
        commit = data.get("machine", {}).get("commit")
        ran_on = ran_on_text(data.get("machine", {}))
        score = data["config"].get("channel_score", "activation")  # runs before the option ranked by activation
        for r in data["rows"]:
            if r["method"] == "sigmab":
                r = {**r, "channel_score": score, "router_grid": data["config"].get("router_grid", 1)}
            if "freed_memory_kept" not in r and r.get("commit", commit) == commit:  # the folder's last run's rows
                r = {**r, "freed_memory_kept": data.get("machine", {}).get("freed_memory_kept")}
            rows.append({**r, "run": f.parent.name, "target": frac, "variant": variant(r),
                         "commit": r.get("commit", commit),  # a row's own (a folder can hold runs of several)
                         **({"ran_on": ran_on} if ran_on else {})})
    if prior is not None:
        have = {(r["run"], r["method"]) for r in rows}
        data = json.loads(prior.read_text())
        m = data.get("machine", {})
        origin = f"{prior}` (written {m.get('date', '?')} at commit {m.get('commit', '?')})"
        rows += [{**r, "from_report": r.get("from_report", origin), "variant": variant(r)}
                 for r in data["rows"] if (r["run"], r["method"]) not in have]
    assign_panels(rows)
    return rows


def _dense_key(r: dict, sha_by_top1: Dict[object, set]):
    """Which dense model a row started from: its fingerprint (``dense_sha256``), else (a row from before the
    fingerprint) the one fingerprinted model of the same reference top-1, else that top-1 itself."""
    if r.get("dense_sha256"):
        return r["dense_sha256"]
    shas = sha_by_top1.get(r.get("dense_reference_top1"), set())
    return next(iter(shas)) if len(shas) == 1 else r.get("dense_reference_top1")


def _epochs(r: dict):
    return (r.get("finetune") or {}).get("epochs")


def assign_panels(rows: List[dict]) -> None:
    """Set each row's ``panel``, the section and plot panel it belongs to: its model; where that model's rows
    started from more than one dense model (a pretraining rerun writes another model to the same path), the dense
    model too; where they were fine-tuned for different numbers of epochs, the epochs too. Margins, "vs dense" and
    the curves then only ever compare rows that started from the same weights and trained as long."""
    for model in {r["model"] for r in rows}:
        same = [r for r in rows if r["model"] == model]
        sha_by_top1 = defaultdict(set)
        for r in same:
            if r.get("dense_sha256"):
                sha_by_top1[r.get("dense_reference_top1")].add(r["dense_sha256"])
        keys = [_dense_key(r, sha_by_top1) for r in same]
        several_dense, several_epochs = len(set(keys)) > 1, len({_epochs(r) for r in same}) > 1
        for r, key in zip(same, keys):
            name, ref, epochs = model, r.get("dense_reference_top1"), _epochs(r)
            if several_dense:
                name += (f" from dense {'?' if ref is None else f'{100 * ref:.2f}%'}"
                         + (f" {key[:8]}" if isinstance(key, str) else ""))
            if several_epochs:
                name += f", {epochs} epoch{'' if epochs == 1 else 's'}"
            r["panel"] = name


def provenance(rows: List[dict]) -> List[str]:
    """One line per source of rows: the runs read from their directories (with the commit each ran at)
    and those taken from an earlier report."""
    by = defaultdict(set)
    for r in rows:
        on = f" on {r['ran_on']}" if r.get("ran_on") else ""
        src = (f"from the earlier report `{r['from_report']}" if r.get("from_report")
               else f"run at commit {r.get('commit') or 'unrecorded'}{on}")
        by[src].add(r["run"])
    return [f"- {', '.join(sorted(runs))}: {src}." for src, runs in sorted(by.items())]


PLOT_LINE = "![top-1 vs active fraction]({stem}.png)"  # the last generated line: what follows it is hand-written


def hand_written(md: Path, stem: str) -> str:
    """The sections a person appended to an earlier ``md`` (everything after the plot line), so that
    regenerating the tables keeps the commands, diagnoses and dated notes written under them."""
    if not md.is_file():
        return ""
    _, sep, tail = md.read_text().partition(PLOT_LINE.format(stem=stem))
    return "\n" + tail.lstrip("\n") if sep and tail.strip() else ""


def _mean(rows: List[dict], name: str, target: float, key: str = "top1", seeds=None) -> Optional[float]:
    """Mean of ``key`` (top-1, or the active fraction) over the rows of one variant at one budget (and, given
    ``seeds``, only those seeds')."""
    vals = [r[key] for r in rows if r["variant"] == name and r["target"] == target
            and (seeds is None or r["seed"] in seeds)]
    return mean(vals) if vals else None


def _seeds(rows: List[dict], name: str, target: float) -> set:
    return {r["seed"] for r in rows if r["variant"] == name and r["target"] == target}


def paired_margin(rows: List[dict], tree: str, static: str, target: float) -> Optional[dict]:
    """The tree against one static variant at one budget, on the seeds both ran (each method's mean over every
    seed it has when they share none), so a seed that favours one method is not compared with another seed."""
    static_seeds = _seeds(rows, static, target)
    if not static_seeds:
        return None
    common = _seeds(rows, tree, target) & static_seeds
    seeds = common or None
    sig, st = _mean(rows, tree, target, seeds=seeds), _mean(rows, static, target, seeds=seeds)
    return {"sigmab": sig, "best_static": static, "best_static_top1": st, "margin_pp": 100 * (sig - st),
            "seeds": sorted(common) if common else None}


def fraction_at(points: Dict[float, float], top1: float) -> Optional[tuple]:
    """Active fraction at which a method (points: fraction -> top-1) reaches ``top1``: linear
    interpolation between the two neighbouring budgets whose top-1 brackets it, else extrapolation
    (flagged) from the two budgets at the end it lies beyond. ``(fraction, extrapolated)`` or None."""
    pts = sorted(points.items())
    if len(pts) < 2:
        return None
    pairs = [(a, b) for a, b in zip(pts, pts[1:]) if min(a[1], b[1]) <= top1 <= max(a[1], b[1]) and a[1] != b[1]]
    if pairs:
        ((f0, t0), (f1, t1)), extrapolated = pairs[0], False
    else:
        ((f0, t0), (f1, t1)), extrapolated = (pts[-2:] if top1 > max(t for _, t in pts) else pts[:2]), True
    if t1 == t0:
        return None
    return f0 + (top1 - t0) * (f1 - f0) / (t1 - t0), extrapolated


def by_panel(rows: List[dict]) -> Dict[str, List[dict]]:
    """Rows grouped by report panel, in panel order. ``load`` names every row's panel; rows made by hand
    (tests, older reports) without one fall in their model's panel."""
    panels: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        panels[r.get("panel", r["model"])].append(r)
    return dict(sorted(panels.items()))


def summarize(rows: List[dict]) -> dict:
    out = {}
    for model, mr in by_panel(rows).items():
        dense = [r["top1"] for r in mr if r["method"] == "dense"]
        before = [r["top1_before_finetune"] for r in mr if r["method"] == "dense" and "top1_before_finetune" in r]
        refs = [r["dense_reference_top1"] for r in mr if r.get("dense_reference_top1") is not None]
        s = {"dense_top1": mean(dense) if dense else None, "margins": {},
             "dense_reference_top1": mean(refs) if refs else None,  # the dense model before any fine-tuning
             "dense_top1_before_finetune": mean(before) if before else None, "epochs": mr[0]["finetune"]["epochs"],
             "train_images": mr[0]["train_images"], "test_images": mr[0]["test_images"]}
        # every tree variant against the best static method of any variant (the fairest reading for the statics)
        statics = sorted({r["variant"] for r in mr if r["method"] in STATIC})
        static55, static55_name = max([(_mean(mr, m, 0.55) or 0.0, m) for m in statics] or [(0.0, None)])
        s["static_top1_at_0.55"] = static55 or None
        # the reduction is read between measured active fractions, not budgets (FPGM at 0.55 keeps ~0.53)
        s["static_active_at_0.55"] = _mean(mr, static55_name, 0.55, "active_fraction") if static55 else None
        s["static_at_0.55"] = static55_name if static55 else None
        s["sigmab_fraction_at_static_0.55"] = {}
        for tree in sorted({r["variant"] for r in mr if r["method"] == "sigmab"}):
            targets = sorted({r["target"] for r in mr if r["variant"] == tree})
            s["margins"][tree] = {}
            for target in targets:
                # the best static method is the one the tree leads by least, each compared on the seeds both ran
                paired = [p for p in (paired_margin(mr, tree, m, target) for m in statics) if p is not None]
                if not paired:  # a budget only the tree ran at (to read the matched top-1): no margin
                    continue
                best = min(paired, key=lambda p: (p["margin_pp"], p["best_static"]))
                s["margins"][tree][str(target)] = {**best, "sigmab_all_seeds": _mean(mr, tree, target)}
            points = {_mean(mr, tree, t, "active_fraction"): _mean(mr, tree, t) for t in targets}
            s["sigmab_fraction_at_static_0.55"][tree] = fraction_at(points, static55) if static55 else None
        trees = [r for r in mr if r["method"] == "sigmab"]
        s["conditional_gain_pp"] = {r["run"]: 100 * r["conditional_gain"] for r in trees if "conditional_gain" in r}
        s["min_leaf_share"] = {r["run"]: min(r["leaf_histogram"]) / sum(r["leaf_histogram"]) for r in trees}
        out[model] = s
    return out


def heading(panel: str, s: dict) -> str:
    """A panel's section heading; the epochs are named once (``assign_panels`` may have put them in the name)."""
    epochs = f"{s['epochs']} epoch{'' if s['epochs'] == 1 else 's'}"
    training = ("fine-tuned" if panel.endswith(f", {epochs}") else f"{epochs} of fine-tuning") + \
        f" on {s['train_images']:,} images"
    return f"## {panel}: {training}, {s['test_images']:,} test images"


KEPT_MARK = "*"  # a row trained with freed memory kept (sb.keep_freed_memory): its img/s is not comparable
KEPT_NOTE = (f"{KEPT_MARK} trained with freed memory kept (`sb.keep_freed_memory`; what it does to training speed: "
             "`benchmarks/results/allocator_speed.md`): compare images/s only between rows that both have it or both "
             "lack it.")


def _row(r: dict, dense: Optional[float]) -> str:
    tree = r["method"] == "sigmab"
    shares = "/".join(f"{100 * h / sum(r['leaf_histogram']):.0f}" for h in r["leaf_histogram"]) if tree else ""
    diag = (f"{100 * r['best_leaf_top1']:.2f} | {100 * r['oracle_top1']:.2f} | {100 * r['conditional_gain']:+.2f}"
            if tree else " | | ")
    delta = "" if dense is None else f"{100 * (r['top1'] - dense):+.2f}"
    ips = r.get("train_images_per_second")
    mc = r.get("mean_class_top1")
    return (f"| {r['variant']} | {r['target']} | {r['seed']} | {r['active_fraction']:.3f} | {100 * r['top1']:.2f} | "
            f"{'' if mc is None else f'{100 * mc:.2f}'} | {delta} | {diag} | {shares} | "
            f"{'' if ips is None else f'{ips:.0f}'}{KEPT_MARK if r.get('freed_memory_kept') else ''} |")


def plot(rows: List[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = by_panel(rows)
    names = sorted({r["variant"] for r in rows if r["method"] != "dense"})
    # one colour per variant in every panel: tab20's ten dark hues first, then their light pairs
    cmap = plt.get_cmap("tab20")
    color = {n: cmap((2 * i + (i // 10) % 2) % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (model, mr) in zip(axes[0], panels.items()):
        for name in sorted({r["variant"] for r in mr if r["method"] != "dense"}):
            pts = defaultdict(list)
            for r in mr:
                if r["variant"] == name:
                    pts[r["active_fraction"]].append(100 * r["top1"])
            xs = sorted(pts)
            if xs:
                ax.errorbar(xs, [mean(pts[x]) for x in xs], yerr=[[mean(pts[x]) - min(pts[x]) for x in xs],
                                                                   [max(pts[x]) - mean(pts[x]) for x in xs]],
                            marker="o", capsize=3, label=name, color=color[name])
        dense = [100 * r["top1"] for r in mr if r["method"] == "dense"]
        if dense:
            ax.axhline(mean(dense), color="grey", ls="--", label="dense")
        ax.set_title(f"{model} on {mr[0].get('data', '?')}", fontsize=9)
        ax.set_xlabel("active parameters / dense")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.26))  # below: never over the data
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def main(runs: str, out: str, stem: str = "long_comparison", script: str = "benchmarks/long_comparison.sh",
         gap_goal: float = 3.0, prior: Optional[str] = None) -> None:
    runs, out, gap_goal = Path(runs), Path(out), float(gap_goal)
    if prior is not None and not Path(prior).is_file():
        raise SystemExit(f"--prior {prior}: no such report JSON (give a benchmarks/results/*.json written by this script)")
    rows = load(runs, None if prior is None else Path(prior))
    if not rows:
        raise SystemExit(f"no finished runs under {runs} (results.json); run {script} first")
    summary = summarize(rows)
    m = machine()
    lines = [f"# SigmaB vs FPGM and HRank: {stem.replace('_', ' ')}", "",
             f"Generated {m['date']} by `{command(script)}` then `python -m benchmarks.report_long` "
             f"(commit {m['commit']}) on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
             f"{m.get('gpu') or 'no GPU'}.", "",
             "Every method starts from the same pretrained dense model and gets the same fine-tuning: the full "
             "training set, the same epochs, SGD schedule, augmentation, seed and distillation from the dense model "
             "(weight 1, T 4); SigmaB uses the recipe chosen on a validation split "
             "(`benchmarks/results/ablate_r20.md`). Top-1 is on the whole test set with hard routing. Budgets are "
             "active parameters (SigmaB: its largest path). Conditional gain = routed top-1 minus the best single "
             "leaf applied to every input; oracle = any leaf right.", "", "Where the rows come from:", "",
             *provenance(rows), ""]
    panels = by_panel(rows)
    for model, s in summary.items():
        mr = panels[model]
        lines += [heading(model, s), "", "| method | target | seed | active | top-1 (%) | mean-class (%) | vs dense (pp) "
                  "| best leaf | oracle | cond. gain (pp) | leaf shares (%) | train img/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(mr, key=lambda r: (r["target"], r["variant"], r["seed"])):
            lines.append(_row(r, s["dense_top1"]))
        lines.append("")
        if any(r.get("freed_memory_kept") for r in mr):
            lines += [KEPT_NOTE, ""]
        for tree, margins in s["margins"].items():
            for target, mg in margins.items():
                need = 100 * mg["best_static_top1"] + 2
                room = ("" if s["dense_top1"] is None else
                        f"; the goal asks for {need:.2f}%, {need - 100 * s['dense_top1']:+.2f} pp from the dense model "
                        "fine-tuned the same way")
                on = ("" if not mg.get("seeds") else
                      f" on seed{'s' if len(mg['seeds']) > 1 else ''} {', '.join(map(str, mg['seeds']))}")
                lines.append(f"- At {target} active: {tree} {100 * mg['sigmab']:.2f}% vs best static "
                             f"({mg['best_static']}) {100 * mg['best_static_top1']:.2f}%{on}: "
                             f"**{mg['margin_pp']:+.2f} pp** (goal >= +2{room}).")
            if s["dense_top1"] is not None and "0.4" in margins:
                at40 = margins["0.4"]["sigmab_all_seeds"]  # every seed of the tree, not only those paired
                gap = 100 * (s["dense_top1"] - at40)
                lines.append(f"- {tree} at 0.40 is {gap:.2f} pp below dense ({100 * s['dense_top1']:.2f}%) "
                             f"(goal <= {gap_goal:g}).")
                pre = s["dense_top1_before_finetune"]
                if pre is not None and abs(pre - s["dense_top1"]) > 5e-5:  # the fine-tuning moved the dense model
                    lines.append(f"- The dense model before that fine-tuning scored {100 * pre:.2f}%: {tree} at 0.40 is "
                                 f"{100 * (at40 - pre):+.2f} pp from it.")
            elif s["dense_reference_top1"] is not None and "0.4" in margins:  # no dense row ran in this panel
                ref, at40 = s["dense_reference_top1"], margins["0.4"]["sigmab_all_seeds"]
                lines.append(f"- {tree} at 0.40 is {100 * (ref - at40):.2f} pp below the dense model it started from "
                             f"({100 * ref:.2f}%, not fine-tuned again: no dense row here) (goal <= {gap_goal:g}).")
            fa = s["sigmab_fraction_at_static_0.55"].get(tree)
            if fa:
                act = s["static_active_at_0.55"]
                lines.append(f"- The best static method at the 0.55 budget ({s['static_at_0.55']}) reaches "
                             f"{100 * s['static_top1_at_0.55']:.2f}% at {act:.3f} active; {tree} needs {fa[0]:.3f}"
                             f"{' (extrapolated)' if fa[1] else ''}: {100 * (act - fa[0]):.1f} pp more reduction "
                             "(goal: <= 0.41 active, >= 14 pp).")
        for run, g in s["conditional_gain_pp"].items():
            lines.append(f"- Tree {run}: conditional gain {g:+.2f} pp (goal >= 2), smallest leaf share "
                         f"{100 * s['min_leaf_share'][run]:.0f}% (goal >= 10%).")
        for r in mr:
            cal = r.get("routing_calibration")
            if cal and cal.get("top1_before") is not None:
                pct = lambda v: "/".join(f"{100 * a / sum(v):.0f}" for a in v)  # noqa: E731
                lines.append(f"- Tree {r['run']}: hard routing calibrated to the training mass {pct(cal['leaf_mass'])}% "
                             f"(`calibrate_routing`): top-1 {100 * cal['top1_before']:.2f}% -> {100 * r['top1']:.2f}%, "
                             f"test leaf shares {pct(cal['leaf_histogram_before'])} -> {pct(r['leaf_histogram'])}%.")
        lines.append("")
    lines += [PLOT_LINE.format(stem=stem), ""]
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    kept = hand_written(md, stem)
    md.write_text("\n".join(lines) + kept)
    if kept:
        print(f"kept the hand-written sections of {md} ({kept.count(chr(10)) + 1} lines)")
    (out / f"{stem}.json").write_text(json.dumps({"machine": m, "summary": summary, "rows": rows}, indent=1))
    plot(rows, out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.md'}")


def cli(argv: List[str]) -> None:
    prior = None
    if "--prior" in argv:
        i = argv.index("--prior")
        if i + 1 >= len(argv):
            raise SystemExit("--prior needs a report JSON, e.g. --prior benchmarks/results/long_comparison.json")
        prior, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    main(*(argv if len(argv) >= 2 else ("runs/long", "benchmarks/results")), prior=prior)


if __name__ == "__main__":
    cli(sys.argv[1:])
