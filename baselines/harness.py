"""One harness for every method: same model, data, augmentation, fine-tuning budget, seed and metrics.

``run_comparison`` loads the data, builds (or trains from scratch) the dense reference, branches it
with SigmaB to fix the budget (the active parameters of SigmaB's largest path, or a target active
fraction), prunes each static method to that budget, fine-tunes every method with the same
``FinetuneConfig``, evaluates with hard routing, and records what each method received.
"""
from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

import sigmab_plugin as sb
from sigmab_plugin.finetune import CHECKPOINT, FinetuneConfig, evaluate, finetune

from ..adapters.pointnet2 import PointNet2
from .data import load_dataset
from .models import classifier_name, create_model
from .provenance import machine, state_fingerprint
from .registry import RunContext, available_methods, get_method
from .sigmab import level_shape
from .timing import latency_ratios


STATIC_SHAPES = ("uniform", "tree")
CALIBRATE_ROUTING_SAMPLES = 2048  # training inputs that calibrate_routing reads (a seeded subset)


@dataclass
class HarnessConfig:
    model: str = "resnet20"
    data: str = "digits"
    data_root: Optional[str] = None
    checkpoint: Optional[str] = None
    shortcut: str = "B"
    methods: List[str] = field(default_factory=lambda: ["dense", "sigmab", "fpgm", "hrank", "fpgm_nni"])
    depth: int = 2
    keep_ratio: float = 0.5
    prune_residual: bool = True
    coverage: bool = False  # True: SigmaB siblings keep every dense channel (needs keep_ratio >= 0.5)
    channel_score: str = "activation_weight"  # how SigmaB's nodes rank channels (BranchConfig.channel_score)
    router_grid: int = 1  # SigmaB's routers read the split-point map over a grid x grid of cells (BranchConfig)
    target_fraction: Optional[float] = None  # if set: SigmaB's keep ratio is searched to reach it
    keep_shape: Optional[List[float]] = None  # SigmaB: relative keep ratio of each level (the scale is searched)
    # static methods: "uniform" prunes every layer by one ratio (their published form); "tree" gives them the
    # SigmaB tree's allocation (the backbone's layers whole, each level's layers in the tree's keep proportion)
    static_shape: str = "uniform"
    pretrain_epochs: int = 0  # train the dense reference first (from the checkpoint if given, else from scratch)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 0.5} for PointNet++
    pretrain_lr: float = 0.1
    # zero the classifier before pretraining: a checkpoint trained on other classes (transfer, e.g. CIFAR-100 to
    # Tiny-ImageNet-100) otherwise starts with confident wrong-class logits whose gradients wreck its features
    reset_classifier: bool = False
    calib_size: int = 512
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/compare"
    resume: bool = False  # continue each method from its checkpoint in out_dir/<method>
    calibrate_routing: bool = False  # SigmaB: after fine-tuning, hard routing given each leaf its training mass
    reconstruct: bool = False  # every pruned method: before fine-tuning, refit its pruned layers to the dense ones
    reconstruct_ridge: float = 1e-2  # sb.reconstruct's pull towards the pruned weights (1.0: a less exact fit)
    reconstruct_ridges: Dict[str, float] = field(default_factory=dict)  # per method, overriding reconstruct_ridge

    def validate(self) -> None:
        known = available_methods()
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad}; choose from {known}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio={self.keep_ratio} must lie in (0, 1]")
        if not self.reconstruct_ridge > 0:
            raise ValueError(f"reconstruct_ridge={self.reconstruct_ridge} must be > 0 (e.g. 0.01 or 1.0)")
        for m, r in self.reconstruct_ridges.items():
            if m not in known or m == "dense":
                raise ValueError(f"reconstruct_ridges names {m!r}, not a pruned method; choose from "
                                 f"{[x for x in known if x != 'dense']}")
            if not r > 0:
                raise ValueError(f"reconstruct_ridges[{m!r}]={r} must be > 0 (e.g. 0.01 or 1.0)")
        if self.target_fraction is not None and not 0 < self.target_fraction < 1:
            raise ValueError(f"target_fraction={self.target_fraction} must lie in (0, 1)")
        if self.keep_shape is not None:
            level_shape(self.keep_shape, self.depth)
        sb.BranchConfig(router_grid=self.router_grid)  # branch()'s own check, before anything trains
        if self.reset_classifier and not self.pretrain_epochs:
            raise ValueError("reset_classifier=True zeroes the dense model's classifier before its pretraining, but "
                             "pretrain_epochs=0: set pretrain_epochs (a zeroed classifier predicts nothing)")
        if not self.pretrain_lr > 0:
            raise ValueError(f"pretrain_lr={self.pretrain_lr} must be > 0 (e.g. 0.02 from a checkpoint, 0.1 from scratch)")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={self.device!r} is not a torch device ({e}); use e.g. 'cpu' or 'cuda:0'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but this machine has no CUDA device: use device='cpu'")
        if self.static_shape not in STATIC_SHAPES:
            raise ValueError(f"static_shape={self.static_shape!r}: choose from {STATIC_SHAPES}")
        if self.static_shape != "uniform" and "fpgm_nni" in self.methods:  # refused before anything trains
            raise ValueError(f"static_shape={self.static_shape!r} is for fpgm and hrank; fpgm_nni prunes one ratio "
                             "everywhere: drop fpgm_nni from methods or use static_shape='uniform'")

    def ridge(self, method: str) -> float:
        """The ridge of ``method``'s refit: its own entry in ``reconstruct_ridges``, else ``reconstruct_ridge``."""
        return self.reconstruct_ridges.get(method, self.reconstruct_ridge)


def make_teacher(dense: torch.nn.Module) -> torch.nn.Module:
    """A frozen eval-mode copy of ``dense`` for distillation. A PointNet++ teacher does not cache its
    grouping: it reads augmented training clouds, which never come twice, so every entry would be a miss
    that evicts the test clouds' entries (and, on a GPU, holds device memory)."""
    teacher = copy.deepcopy(dense).eval().requires_grad_(False)
    if isinstance(teacher, PointNet2):
        teacher.cache = False
    return teacher


def calibration_set(train, normalize, size: int, seed: int, device="cpu") -> torch.Tensor:
    """The ``size`` normalized training inputs every method of a run is built from (seeded by ``seed``)."""
    g = torch.Generator().manual_seed(seed + 1)
    return normalize(train.images[torch.randperm(len(train.labels), generator=g)[:size]].to(device))


def run_comparison(cfg: HarnessConfig, log=print) -> List[dict]:
    cfg.validate()
    started = machine()  # the commit whose code runs: a long run can end after later commits
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    starts = {name: start_record(out / name, cfg, name) for name in cfg.methods}  # refused before anything runs
    data = load_dataset(cfg.data, cfg.data_root, seed=cfg.seed)
    train, test = data.train, data.test
    if cfg.train_limit:
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(train.labels), generator=g)[:cfg.train_limit]
        train = type(train)(train.images[idx], train.labels[idx])
    if cfg.test_limit:  # a seeded random subset: the splits are stored sorted by class
        g = torch.Generator().manual_seed(cfg.seed + 2)
        idx = torch.randperm(len(test.labels), generator=g)[:cfg.test_limit].sort().values
        test = type(test)(test.images[idx], test.labels[idx])
    ft = cfg.finetune
    dense = create_model(cfg.model, data.num_classes, cfg.checkpoint, cfg.shortcut, **cfg.model_kwargs).to(cfg.device)
    out.mkdir(parents=True, exist_ok=True)  # after the inputs were accepted: a refused run leaves no folder
    augment = getattr(data, "augment", None)  # point clouds: their own augmentation; images: pad-4 crop
    if cfg.pretrain_epochs:
        log(f"training the dense reference first: {cfg.pretrain_epochs} epochs "
            f"({'from ' + str(cfg.checkpoint) if cfg.checkpoint else 'from scratch'}, lr {cfg.pretrain_lr:g}"
            f"{', classifier zeroed' if cfg.reset_classifier else ''})")
        if cfg.reset_classifier:
            head = dense.get_submodule(classifier_name(dense))
            with torch.no_grad():
                head.weight.zero_()
                if head.bias is not None:
                    head.bias.zero_()
        pre = FinetuneConfig(**{**ft.to_dict(), "epochs": cfg.pretrain_epochs, "lr": cfg.pretrain_lr})
        finetune(dense, train.images, train.labels, data.normalize, pre, out_dir=out / "pretrain", augment=augment,
                 resume=cfg.resume)
    dense.eval()
    dense_params = sum(p.numel() for p in dense.parameters())
    reference = evaluate(dense, test.images, test.labels, data.normalize)["top1"]
    dense_sha = state_fingerprint(dense)  # every row names the dense model it started from (report_long groups by it)
    if cfg.resume:  # only a resumed run keeps a checkpoint or the rows of other methods
        check_same_dense(out, dense_sha, starts, cfg.methods)
    calib = calibration_set(train, data.normalize, cfg.calib_size, cfg.seed, cfg.device)
    opts = dict(depth=cfg.depth, prune_residual=cfg.prune_residual, coverage=cfg.coverage, keep_ratio=cfg.keep_ratio,
                channel_score=cfg.channel_score, router_grid=cfg.router_grid)
    if cfg.keep_shape is not None:
        opts["keep_shape"] = list(cfg.keep_shape)
    run = RunContext(dense, calib, None, opts, classifier_name(dense), cfg.seed, cfg.target_fraction)
    prepared = {}  # method -> (model, seconds)
    if cfg.target_fraction is not None:
        run.budget = int(cfg.target_fraction * dense_params)
    elif set(cfg.methods) == {"dense"}:  # nothing to size (a pretraining run): no tree is built for a budget
        run.budget = dense_params
    else:  # the budget is SigmaB's largest path
        t0 = time.perf_counter()
        prepared["sigmab"] = (get_method("sigmab").prepare(run), time.perf_counter() - t0)
        run.budget = sb.param_report(prepared["sigmab"][0])["active_params_max"]
    budget = run.budget
    if cfg.static_shape == "tree" and any(get_method(m).static for m in cfg.methods):
        if "sigmab" not in prepared:  # the tree whose allocation the static methods take (kept if SigmaB runs)
            t0 = time.perf_counter()
            prepared["sigmab"] = (get_method("sigmab").prepare(run), time.perf_counter() - t0)
        run.static_shape = tree_allocation(prepared["sigmab"][0])
        if "sigmab" not in cfg.methods:
            prepared.pop("sigmab")
        log(f"static methods take the tree's allocation: {run.static_shape}")
    log(f"dense {dense_params:,} params, top-1 {reference:.4f}; budget {budget:,} active params "
        f"({budget / dense_params:.3f})")
    teacher = make_teacher(dense) if ft.distill_weight > 0 else None  # every method distils from the same one
    rows, trained = [], {}
    for name in cfg.methods:
        method = get_method(name)
        t0 = time.perf_counter()
        if name not in prepared:
            prepared[name] = (method.prepare(run), time.perf_counter() - t0)
        model, prepare_s = prepared.pop(name)
        done = starts[name]
        reconstruction = done["reconstruction"] if done else None
        if cfg.reconstruct and name != "dense" and not done:  # every pruned model, on the inputs that built the tree
            t0 = time.perf_counter()
            ridge = cfg.ridge(name)
            rep = sb.reconstruct(model, dense, calib, ridge=ridge)
            errs = rep["relative_error_before"], rep["relative_error_after"]
            reconstruction = {"layers": len(errs[0]), "samples": rep["samples"], "ridge": ridge,
                              "mean_relative_error_before": sum(errs[0].values()) / max(1, len(errs[0])),
                              "mean_relative_error_after": sum(errs[1].values()) / max(1, len(errs[1]))}
            prepare_s += time.perf_counter() - t0
        before = {"top1": done["top1_before_finetune"]} if done else \
            evaluate(model, test.images, test.labels, data.normalize)
        if not done:
            write_start_record(out / name, before["top1"], reconstruction, dense_sha)
        torch.manual_seed(cfg.seed)
        history = finetune(model, train.images, train.labels, data.normalize, ft,
                           test=(test.images, test.labels), teacher=teacher, out_dir=out / name,
                           resume=cfg.resume, augment=augment)
        branched = sb.is_branched(model)
        calibration = None
        if branched and cfg.calibrate_routing and history:  # on training inputs, without augmentation
            g = torch.Generator().manual_seed(cfg.seed + 3)
            pick = torch.randperm(len(train.labels), generator=g)[:CALIBRATE_ROUTING_SAMPLES]
            calibration = sb.calibrate_routing(model, data.normalize(train.images[pick].to(cfg.device)),
                                               shares=history[-1]["train_leaf_share"],
                                               temperature=ft.temperature_end)
            calibration["top1_before"] = history[-1].get("test_top1")
            calibration["leaf_histogram_before"] = history[-1].get("test_leaf_histogram")
        after = evaluate(model, test.images, test.labels, data.normalize, diagnostics=branched)
        if branched:
            rep = sb.param_report(model)
            stored, active = rep["total_params"], rep["active_params_max"]
        else:
            stored = active = sum(p.numel() for p in model.parameters())
        row = {"method": name, "stored_params": stored, "active_params": active,
               "active_fraction": active / dense_params, "top1": after["top1"], "top1_before_finetune": before["top1"],
               "mean_class_top1": after["mean_class_top1"],
               "budget": budget if method.static else None, "within_budget": (active <= budget) if method.static else None,
               "leaf_histogram": after.get("leaf_histogram"), "prepare_seconds": prepare_s,
               "train_seconds": sum(h["seconds"] for h in history),
               "train_images_per_second": (sum(len(train.labels) for _ in history)
                                           / max(1e-9, sum(h["seconds"] for h in history))) if history else None,
               "distilled": teacher is not None, "routing_calibration": calibration, "reconstruction": reconstruction,
               **{k: after[k] for k in ("leaf_top1_all", "leaf_top1_routed", "best_leaf_top1", "oracle_top1",
                                        "conditional_gain") if k in after},
               "finetune": ft.to_dict(), "train_images": len(train.labels), "test_images": len(test.labels),
               "data": cfg.data, "model": cfg.model, "seed": cfg.seed, "commit": started.get("commit"),
               "dense_sha256": dense_sha, "freed_memory_kept": started.get("freed_memory_kept"),  # its img/s
               "keep_ratio": sb.tree_state(model).spec["config"]["keep_ratio"] if branched else None,
               "static_shape": run.static_shape if method.static else None}
        if name == "sigmab":
            sb.save_branched(model, out / "sigmab" / "tree")
        rows.append(row)
        trained[name] = model.eval()
        extra = (f"  best leaf {after['best_leaf_top1']:.4f}, oracle {after['oracle_top1']:.4f}, leaves "
                 f"{after['leaf_histogram']}") if branched else ""
        log(f"{name:9s} active {active:>11,} ({row['active_fraction']:.3f})  top-1 {before['top1']:.4f} -> "
            f"{after['top1']:.4f}  ({row['train_seconds']:.0f}s){extra}")
    x1 = data.normalize(test.images[:1].to(cfg.device))
    calls = {name: (lambda m=m: m(x1)) for name, m in trained.items()}
    calls["__dense__"] = lambda: dense(x1)
    timing = latency_ratios(calls, "__dense__")
    for r in rows:  # batch-1 latency as a ratio to the dense reference, interleaved rounds
        t = timing[r["method"]]
        r.update({"latency_ms_b1": t["ms"], "latency_ratio_b1": t["ratio"],
                  "latency_ratio_b1_range": [t["ratio_min"], t["ratio_max"]]})
    if cfg.resume:  # a run of some methods into a folder that holds others keeps their rows
        rows = earlier_rows(out, {r["method"] for r in rows}) + rows
    dense_row = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        r["delta_vs_dense_pp"] = None if dense_row is None else 100 * (r["top1"] - dense_row["top1"])
        r.setdefault("dense_reference_top1", reference)  # an earlier run's row keeps its own
    write_outputs(rows, cfg, out, started)
    return rows


def tree_allocation(tree: torch.nn.Module) -> Dict[str, float]:
    """The relative keep ratio of the modules of each level of a SigmaB tree (module name -> the level's keep
    ratio; the classifier left out), for ``RunContext.static_shape``: a static method given it keeps the tree's
    backbone whole and prunes each level's layers in the tree's proportion, to its own budget. A tree built with
    per-module exceptions (``keep_ratio_dict``, ``ignored_layers``) is refused: the allocation holds one ratio per
    level and would silently drop them."""
    spec = sb.tree_state(tree).spec
    exceptions = {k: spec["config"].get(k) for k in ("keep_ratio_dict", "ignored_layers") if spec["config"].get(k)}
    if exceptions:
        raise ValueError(f"tree_allocation gives one keep ratio per level; this tree was also built with {exceptions}, "
                         "which it cannot pass on: build the tree without them, or give the static method its own "
                         "static_shape (module name -> relative keep)")
    keep = spec["config"]["keep_ratio"]
    keep = keep if isinstance(keep, list) else [keep] * len(spec["levels"])
    return {name: float(k) for names, k in zip(spec["levels"], keep) for name in names
            if name not in spec["classifier"]}


START = "start.json"  # per method: its top-1 before fine-tuning and its refit, for a resumed run


def start_record(folder: Path, cfg: HarnessConfig, method: str) -> Optional[dict]:
    """What a resumed run of ``method`` (in ``folder``) need not recompute: its top-1 before fine-tuning and
    its refit's report, when a checkpoint will replace the weights anyway (the refit, minutes on a deep model,
    and the evaluation are skipped). None when the run starts afresh or has no checkpoint yet; ``ValueError``
    when the checkpoint was refit otherwise than this run asks (resuming would train the other refit's weights
    under this run's name)."""
    f = folder / START
    if not (cfg.resume and f.is_file() and (folder / CHECKPOINT).is_file()):
        return None
    rec = json.loads(f.read_text())
    want = cfg.ridge(method) if cfg.reconstruct and method != "dense" else None
    had = rec["reconstruction"]["ridge"] if rec["reconstruction"] else None
    if want != had:
        def say(r):
            return "without a refit" if r is None else f"refit at ridge {r}"
        raise ValueError(f"{folder} holds a checkpoint {say(had)}; this run asks {say(want)}: resume with the "
                         "same --reconstruct/--reconstruct-ridge, or give another --out")
    return rec


def write_start_record(folder: Path, top1: float, reconstruction: Optional[dict], dense_sha: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (START + ".tmp")
    tmp.write_text(json.dumps({"top1_before_finetune": top1, "reconstruction": reconstruction,
                               "dense_sha256": dense_sha}))
    tmp.replace(folder / START)


def check_same_dense(out: Path, dense_sha: str, starts: Dict[str, Optional[dict]], methods) -> None:
    """Refuse (``ValueError``, before any training) to resume a checkpoint, or to keep the rows of other methods in
    ``out``, that started from another dense model than this run's (``dense_sha``: its ``state_fingerprint``): a
    pretraining rerun writes another model to the same checkpoint path, and the folder would mix two comparisons.
    Records from before the fingerprint existed are not checked."""
    had = {f"{name}'s checkpoint": rec.get("dense_sha256") for name, rec in starts.items() if rec}
    had.update({f"the {r['method']} row of results.json": r.get("dense_sha256")
                for r in earlier_rows(out, set(methods))})
    other = {what: sha for what, sha in had.items() if sha and sha != dense_sha}
    if other:
        raise ValueError(f"{out} holds {', '.join(sorted(other))} started from another dense model "
                         f"({', '.join(sorted(set(other.values())))}; this run's is {dense_sha}): give another --out "
                         "(the benchmark scripts: TAG=...) so the two comparisons stay apart")


def earlier_rows(out: Path, ran: set) -> List[dict]:
    """The rows of ``out/results.json`` whose method is not in ``ran`` (none when there is no such file)."""
    f = out / "results.json"
    if not f.is_file():
        return []
    return [r for r in json.loads(f.read_text()).get("rows", []) if r.get("method") not in ran]


def write_outputs(rows: List[dict], cfg: HarnessConfig, out: Path, started: dict) -> None:
    """results.json (with ``started``, the machine and commit at the start of the run), results.csv and the plot."""
    cfg_dict = asdict(cfg)
    (out / "results.json").write_text(json.dumps({"config": cfg_dict, "machine": started, "rows": rows},
                                                 indent=1))
    cols = ["method", "stored_params", "active_params", "active_fraction", "top1", "delta_vs_dense_pp",
            "top1_before_finetune", "latency_ms_b1", "latency_ratio_b1", "budget", "keep_ratio", "leaf_histogram",
            "train_images_per_second"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "top1_vs_active.png", f"{cfg.model} on {cfg.data}")


def plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["active_fraction"], 100 * r["top1"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("active parameters / dense")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: List[dict]) -> str:
    head = (f"{'method':10s} {'stored':>11s} {'active':>11s} {'frac':>6s} {'top-1':>7s} {'vs dense':>9s} "
            f"{'b1 / dense':>10s} {'train img/s':>11s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        d = r.get("delta_vs_dense_pp")
        lines.append(f"{r['method']:10s} {r['stored_params']:>11,} {r['active_params']:>11,} "
                     f"{r['active_fraction']:>6.3f} {100 * r['top1']:>6.2f}% "
                     f"{'' if d is None else f'{d:+.2f}pp':>9s} {r['latency_ratio_b1']:>10.2f} "
                     f"{r['train_images_per_second'] or 0:>11.0f}")
    return "\n".join(lines)
