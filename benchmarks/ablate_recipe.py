"""Ablations of the SigmaB fine-tuning recipe, on a validation split (never the test set).

The dense reference (a pretrained CIFAR ResNet by default) is branched once to the target active
fraction; every variant fine-tunes a copy of that tree (or of a tree branched with its own options)
with the same data, epochs and seed, and is scored on images held out from the *training* set, so
choosing the recipe does not look at the test set. Static FPGM/HRank at the same budget (with and
without distillation) are the references. Each finished variant is appended to ``results.json``;
a rerun skips what is done (resume after an interruption), and ``--report`` writes the table.

    python -m benchmarks.ablate_recipe --out runs/ablate_r20 --variants expected_kd bias
    python -m benchmarks.ablate_recipe --out runs/ablate_r20 --report benchmarks/results/ablate_r20.md

``--track`` also scores the validation split after every epoch (each tree with its best leaf and
conditional gain); the report then adds a per-epoch table and a plot beside it.

Point clouds: ``--data modelnet40 --model pointnet2_ssg --width 0.25 --checkpoint <dense checkpoint>`` (the
data set's own augmentation is used). ``--val-tail`` takes the validation images from the *end* of the seeded
permutation, so a dense model pretrained by ``compare_baselines.py --train-limit <training images - val-size>``
with the same seed never saw them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

import sigmab_plugin as sb
from sigmab_plugin.baselines.data import load_dataset
from sigmab_plugin.baselines.harness import make_teacher
from sigmab_plugin.baselines.models import classifier_name, create_model
from sigmab_plugin.baselines.registry import RunContext, get_method
from benchmarks.common import machine
from sigmab_plugin.finetune import FinetuneConfig, evaluate, finetune

# name -> (method, branch() overrides, FinetuneConfig overrides, teacher used)
VARIANTS = {
    "mixture": ("sigmab", {}, dict(objective="mixture", balance_weight=0.1, hard_epochs=1), False),
    "expected": ("sigmab", {}, dict(balance_weight=0.1), False),
    "expected_kd_w": ("sigmab", {}, dict(balance_weight=0.1, distill_paths="weighted"), True),
    "expected_kd_bal2": ("sigmab", {}, dict(balance_weight=2.0), True),
    "bal05": ("sigmab", {}, dict(balance_weight=0.5), True),
    "bal1": ("sigmab", {}, dict(balance_weight=1.0), True),
    "bal4": ("sigmab", {}, dict(balance_weight=4.0), True),
    "bias": ("sigmab", {}, dict(balance_weight=0.0, balance_rate=0.05), True),
    "bias_bal05": ("sigmab", {}, dict(balance_weight=0.5, balance_rate=0.05), True),
    "bal2_bnw": ("sigmab", {}, dict(balance_weight=2.0, bn_weighting=True), True),
    "bal2_top2": ("sigmab", {}, dict(balance_weight=2.0, top_k=2), True),
    "bal2_hard1": ("sigmab", {}, dict(balance_weight=2.0, hard_epochs=1), True),
    "bal2_nocover": ("sigmab", {"coverage": False}, dict(balance_weight=2.0), True),
    "nocover_w_bal2": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, distill_paths="weighted"), True),
    "nocover_top2": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, top_k=2), True),
    # routers that commit: the per-sample leaf entropy penalised next to the balance term (routers
    # that hedge balance the mass but not the decisions: ModelNet40 mass 24/24/26/26%, routing 5/2/58/35%)
    "nocover_decisive05": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, decisive_weight=0.5), True),
    "nocover_decisive2": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, decisive_weight=2.0), True),
    # hard-share balancing: router offsets stepped towards equal argmax shares (against routers that hedge)
    "nocover_rate05": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, balance_rate=0.05), True),
    # least-squares refit of every pruned layer to the dense one on the node's calibration samples (sb.reconstruct)
    "nocover_recon": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, reconstruct={}), True),
    "nocover_recon_r1": ("sigmab", {"coverage": False},
                         dict(balance_weight=2.0, reconstruct={"ridge": 1.0}), True),
    # where the tree splits: later routers read more semantic features (linear probes of the dense
    # ResNet-20's pooled layer1 / layer2 / layer3 outputs predict the class at 43 / 58 / 88 %:
    # benchmarks/probe_split_features.py)
    "split_l2_l31": ("sigmab", {"coverage": False, "split_points": ["layer2", "layer3.1"]},
                     dict(balance_weight=2.0), True),
    "split_l1_l31": ("sigmab", {"coverage": False, "split_points": ["layer1", "layer3.1"]},
                     dict(balance_weight=2.0), True),
    "d3_nocover": ("sigmab", {"coverage": False, "depth": 3}, dict(balance_weight=2.0), True),  # 8 leaves
    "d1_l2": ("sigmab", {"coverage": False, "depth": 1, "split_points": ["layer2"]}, dict(balance_weight=2.0), True),
    # class-grouped routing: each class is given a leaf (a balanced assignment that agrees most with
    # the calibrated tree's own routing of the training images), and the leaf probabilities get a
    # cross-entropy towards the label's leaf with this weight, so leaves specialise on class groups
    "class_routes1": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, route_weight=1.0), True),
    "class_routes_w": ("sigmab", {"coverage": False},
                       dict(balance_weight=2.0, route_weight=1.0, distill_paths="weighted"), True),
    # routers trained against the leaves' losses with a capacity limit: each sample's target is its
    # lowest-loss leaf, no leaf taking more than its equal share of the batch (a cross-entropy of the leaf
    # probabilities towards it, weight 1), so the router learns where each leaf is good and that leaf
    # then trains more on those samples
    "loss_routes1": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, loss_route_weight=1.0), True),
    "loss_routes_w": ("sigmab", {"coverage": False},
                      dict(balance_weight=2.0, loss_route_weight=1.0, distill_paths="weighted"), True),
    # BatchNorm as deployed while training: running statistics re-estimated under hard routing, then fixed
    # in the shared backbone (so the root router sees what deployment computes) or everywhere (routers near
    # their boundary flipped side between batch and running statistics on ModelNet40)
    "nocover_bnshared": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, bn_mode="shared"), True),
    "nocover_bnshared_norecal": ("sigmab", {"coverage": False},
                                 dict(balance_weight=2.0, bn_mode="shared", bn_recalibration_batches=0), True),
    # a second training seed (batch order, augmentation) of the same tree and split, for the two above
    "bal2_nocover_s1": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, seed=1), True),
    "nocover_bnshared_s1": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, bn_mode="shared", seed=1), True),
    "nocover_bnfrozen": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, bn_mode="frozen", lr=0.001), True),
    # routers trained on each sample's unaugmented input (as deployed), leaves on the augmented one (issue 9)
    "nocover_bnshared_clean": ("sigmab", {"coverage": False},
                               dict(balance_weight=2.0, bn_mode="shared", route_inputs="clean"), True),
    "nocover_bnshared_clean_s1": ("sigmab", {"coverage": False},
                                  dict(balance_weight=2.0, bn_mode="shared", route_inputs="clean", seed=1), True),
    "bal2_nocover_clean": ("sigmab", {"coverage": False}, dict(balance_weight=2.0, route_inputs="clean"), True),
    "nocover_bnshared_decisive05": ("sigmab", {"coverage": False},
                                    dict(balance_weight=2.0, bn_mode="shared", decisive_weight=0.5), True),
    # diagnostic: the untrained tree's most-routed path exported as a plain network and fine-tuned like FPGM (is a
    # leaf weaker than FPGM because of its channels, or because of the tree's training?)
    "nocover_leaf": ("sigmab", {"coverage": False}, dict(export_leaf=True), True),
    # nodes rank channels by |activation| x the L2 norm of the weights it feeds (Wanda's criterion)
    "aw_leaf": ("sigmab", {"coverage": False, "channel_score": "activation_weight"}, dict(export_leaf=True), True),
    "aw_bnshared": ("sigmab", {"coverage": False, "channel_score": "activation_weight"},
                    dict(balance_weight=2.0, bn_mode="shared"), True),
    "aw_bnshared_s1": ("sigmab", {"coverage": False, "channel_score": "activation_weight"},
                       dict(balance_weight=2.0, bn_mode="shared", seed=1), True),
    # the default recipe (bal2_nocover) with the weight-aware score: decides the default channel_score
    "aw_nocover": ("sigmab", {"coverage": False, "channel_score": "activation_weight"}, dict(balance_weight=2.0), True),
    "aw_nocover_s1": ("sigmab", {"coverage": False, "channel_score": "activation_weight"},
                      dict(balance_weight=2.0, seed=1), True),
    # per-level keep ratios in a fixed proportion (the scale searched to the budget): the routed levels keep
    # more channels than the leaves, or the leaves more than the level under them
    "aw_shape_1_07": ("sigmab", {"coverage": False, "channel_score": "activation_weight", "keep_shape": [1.0, 0.7]},
                      dict(balance_weight=2.0), True),
    "aw_shape_07_1": ("sigmab", {"coverage": False, "channel_score": "activation_weight", "keep_shape": [0.7, 1.0]},
                      dict(balance_weight=2.0), True),
    "aw_shape_1_07_s1": ("sigmab", {"coverage": False, "channel_score": "activation_weight", "keep_shape": [1.0, 0.7]},
                         dict(balance_weight=2.0, seed=1), True),
    "aw_shape_1_05": ("sigmab", {"coverage": False, "channel_score": "activation_weight", "keep_shape": [1.0, 0.5]},
                      dict(balance_weight=2.0), True),
    # routers that read where a feature fires: the split-point map averaged over a grid x grid layout of cells
    # (BranchConfig.router_grid; a linear probe of ResNet-20's layer1 predicts the class at 53% from a 2x2 grid,
    # 43% from the global average: benchmarks/results/probe_split_resnet20.md)
    "aw_grid2": ("sigmab", {"coverage": False, "channel_score": "activation_weight", "router_grid": 2},
                 dict(balance_weight=2.0), True),
    "aw_grid2_s1": ("sigmab", {"coverage": False, "channel_score": "activation_weight", "router_grid": 2},
                    dict(balance_weight=2.0, seed=1), True),
    "aw_grid4": ("sigmab", {"coverage": False, "channel_score": "activation_weight", "router_grid": 4},
                 dict(balance_weight=2.0), True),
    # each node's layers at lr x (nodes of its level): a leaf gets ~1/4 of a static layer's gradient under SGD
    "aw_nodelr": ("sigmab", {"coverage": False, "channel_score": "activation_weight"},
                  dict(balance_weight=2.0, node_lr_scale=True), True),
    "aw_nodelr_s1": ("sigmab", {"coverage": False, "channel_score": "activation_weight"},
                     dict(balance_weight=2.0, node_lr_scale=True, seed=1), True),
    "fpgm": ("fpgm", {}, {}, False),
    "fpgm_kd": ("fpgm", {}, {}, True),
    "fpgm_kd_recon": ("fpgm", {}, dict(reconstruct={}), True),
    # a stronger pull towards the pruned weights (ridge 1.0 instead of 0.01): a less exact, less fragile fit
    "fpgm_kd_recon_r1": ("fpgm", {}, dict(reconstruct={"ridge": 1.0}), True),
    "fpgm_kd_s1": ("fpgm", {}, dict(seed=1), True),
    # FPGM with the tree's allocation across stages (layer1 whole, as the tree's backbone; layer2 and layer3 in
    # the given proportion), so a gain from the shape is not credited to branching
    "fpgm_kd_stage_1_1": ("fpgm", {"static_shape": {"layer2": 1.0, "layer3": 1.0}}, {}, True),
    "fpgm_kd_stage_1_07": ("fpgm", {"static_shape": {"layer2": 1.0, "layer3": 0.7}}, {}, True),
    "fpgm_kd_bnfrozen": ("fpgm", {}, dict(bn_mode="frozen", lr=0.001), True),
    "hrank_kd": ("hrank", {}, {}, True),
}


def class_leaves(tree, images, labels, normalize, num_classes: int) -> torch.Tensor:
    """Leaf of every class: a balanced assignment (at most ceil(classes / leaves) per leaf) that
    maximises how many training images the calibrated tree already routes to their class's leaf."""
    from scipy.optimize import linear_sum_assignment
    leaves = torch.cat([sb.route(tree, normalize(images[i:i + 500])) for i in range(0, len(labels), 500)])
    n_leaves = 2 ** len(sb.tree_state(tree).spec["levels"])
    counts = torch.zeros(num_classes, n_leaves).index_put_((labels, leaves), torch.ones(len(labels)), accumulate=True)
    slots = -(-num_classes // n_leaves)
    rows, cols = linear_sum_assignment(-counts.repeat_interleave(slots, 1).numpy())
    out = torch.empty(num_classes, dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols) // slots
    return out


@contextlib.contextmanager
def _route_term(weight: float, goal_of):
    """Adds ``weight * CE(leaf probabilities, goal)`` to the training loss of a tree under soft routing, where
    ``goal_of(state, target)`` gives each sample's target leaf; restores the loss on exit."""
    import sigmab_plugin.finetune as ft
    base = ft.training_loss

    def loss(model, logits, target, **kw):
        total, parts = base(model, logits, target, **kw)
        state = sb.tree_state(model)
        probs = state.last_leaf_probs
        if probs is not None and state.last_paths is not None and probs.shape[0] == target.shape[0]:
            with torch.no_grad():
                goal = goal_of(state, target)
            r = -probs.clamp_min(1e-8).log().gather(1, goal[:, None]).mean()
            total = total + weight * r
            parts["route"] = float(r.detach())
        return total, parts
    ft.training_loss = loss
    try:
        yield
    finally:
        ft.training_loss = base


def route_loss(weight: float, leaf_of_class: torch.Tensor):
    """Adds ``weight * CE(leaf probabilities, leaf of the label)`` to the training loss of a tree."""
    return _route_term(weight, lambda _state, target: leaf_of_class.to(target.device)[target])


def capped_argmin(loss: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row's lowest-``loss`` column, no column taking more than ``capacity`` rows: rows choose in order
    of how much they prefer their best column (the gap to their second best), and a full column passes
    the row on to its next best. ``loss`` is (rows, columns); needs ``capacity * columns >= rows``."""
    n, k = loss.shape
    if k < 2 or capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} columns cannot hold {n} rows, or fewer than 2 columns to choose "
                         "from (a tree has at least 2 leaves)")
    ranked = loss.argsort(1)
    best2 = loss.gather(1, ranked[:, :2])
    order = (best2[:, 1] - best2[:, 0]).argsort(descending=True).tolist()
    free = [capacity] * k
    out = torch.empty(n, dtype=torch.long)
    for i in order:
        j = next(c for c in ranked[i].tolist() if free[c] > 0)
        free[j] -= 1
        out[i] = j
    return out


def loss_route_loss(weight: float):
    """Adds ``weight * CE(leaf probabilities, capped lowest-loss leaf)`` to the training loss of a tree under
    soft routing: the target of each sample is the leaf whose path has the lowest cross-entropy on it,
    with each leaf capped at an equal share of the batch (``capped_argmin``)."""
    import torch.nn.functional as F

    def goal_of(state, target):
        paths, probs = state.last_paths, state.last_leaf_probs
        per_path = probs.new_full(probs.shape, float("inf"))
        per_path[paths.sample, paths.leaf] = F.cross_entropy(paths.output.float(), target[paths.sample],
                                                             reduction="none")
        return capped_argmin(per_path.cpu(), -(-len(target) // probs.shape[1])).to(target.device)
    return _route_term(weight, goal_of)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--checkpoint", default="../shared/weights/resnet20-12fca82f.th")
    ap.add_argument("--shortcut", default="A")
    ap.add_argument("--width", type=float, default=None, help="width multiplier of models that take one (pointnet2_*)")
    ap.add_argument("--data", default="cifar10-jpeg")
    ap.add_argument("--target-fraction", type=float, default=0.4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--val-size", type=int, default=5000, help="images held out from the training set")
    ap.add_argument("--val-tail", action="store_true",
                    help="hold out the last --val-size images of the seeded permutation (not the ones after "
                         "--train-limit): the images a dense model pretrained with compare_baselines.py "
                         "--train-limit <N - val-size> and the same seed did not see")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--track", action="store_true",
                    help="score the validation split after every epoch (with each tree's leaf diagnostics): the "
                         "report then adds a per-epoch table and plot, e.g. to see whether the leaves specialise "
                         "with longer training")
    ap.add_argument("--report", default=None, help="write a markdown table of results.json here and stop")
    return ap.parse_args(argv)


def split(n: int, a) -> tuple:
    """The seeded permutation of the ``n`` training images and its training / validation indices (``a``: the
    run's arguments, also as recorded in ``results.json``); the calibration set is the first 512 of it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed))
    if a.train_limit + a.val_size > n:
        raise ValueError(f"--train-limit {a.train_limit} + --val-size {a.val_size} exceeds the {n} training images of "
                         f"{a.data}; lower one of them")
    tail = getattr(a, "val_tail", False)  # runs recorded before --val-tail existed
    va = perm[n - a.val_size:] if tail else perm[a.train_limit:a.train_limit + a.val_size]
    return perm, perm[:a.train_limit], va


def reference(a, data, perm: torch.Tensor) -> tuple:
    """The run's dense model (eval mode) and its calibration inputs: the first 512 of the permutation."""
    dense = create_model(a.model, data.num_classes, a.checkpoint, a.shortcut,
                         **({} if getattr(a, "width", None) is None else {"width": a.width})).eval()
    return dense, data.normalize(data.train.images[perm[:512]])


def branch_options(a) -> dict:
    """branch() options of every tree of a run, before a variant's own."""
    return dict(depth=a.depth, prune_residual=True, coverage=True, progress=False, seed=a.seed)


def variant_config(a, ftopts: dict, distill: bool) -> FinetuneConfig:
    """A variant's fine-tuning settings: the run's epochs, lr, batch and seed, then the variant's own options.
    node_lr_scale is off unless a variant sets it: every variant before aw_nodelr ran so (it is the library's
    default now), and a variant must keep meaning what it measured."""
    return FinetuneConfig(**{**dict(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, progress=False,
                                    distill_weight=1.0 if distill else 0.0, node_lr_scale=False), **ftopts})


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    a = parse(argv)
    both = [n for n in a.variants if VARIANTS[n][2].get("route_weight") and VARIANTS[n][2].get("loss_route_weight")]
    if both:  # one would silently not train
        raise ValueError(f"variants {both} set route_weight and loss_route_weight, two routing targets; set one")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    started = machine()  # the code this process runs: a long run's rows can end after later commits
    done = json.loads(path.read_text()) if path.is_file() else {"args": vars(a), "machine": started, "rows": {}}
    if a.report:
        return report(done, a.report)
    torch.manual_seed(a.seed)
    data = load_dataset(a.data, seed=a.seed)
    perm, tr, va = split(len(data.train.labels), a)
    train = (data.train.images[tr], data.train.labels[tr])
    val = (data.train.images[va], data.train.labels[va])
    dense, calib = reference(a, data, perm)
    augment = getattr(data, "augment", None)  # point clouds: their own augmentation; images: finetune's pad-4 crop
    opts = branch_options(a)
    dense_params = sum(p.numel() for p in dense.parameters())
    budget = int(a.target_fraction * dense_params)
    trees = {}
    for name in a.variants:
        if name in done["rows"]:
            print(f"{name}: done ({100 * done['rows'][name]['top1']:.2f}%)")
            continue
        method, bopts, ftopts, distill = VARIANTS[name]
        keep = None
        if method == "sigmab":  # one tree per set of branch() options, copied for each variant that uses it
            key = json.dumps(bopts, sort_keys=True)
            if key not in trees:
                trees[key] = get_method("sigmab").prepare(RunContext(
                    dense, calib, budget, {**opts, **bopts}, classifier_name(dense), a.seed, a.target_fraction))
            model = copy.deepcopy(trees[key])
            keep = sb.tree_state(model).spec["config"]["keep_ratio"]
        else:
            run = RunContext(dense, calib, budget, opts, classifier_name(dense), a.seed,
                             static_shape=bopts.get("static_shape"))
            model = get_method(method).prepare(run)
        ftopts = dict(ftopts)
        route_weight = ftopts.pop("route_weight", 0.0)
        loss_route_weight = ftopts.pop("loss_route_weight", 0.0)
        if ftopts.pop("export_leaf", False):  # the calibration set's most-routed leaf, as a plain network
            leaf = int(torch.bincount(sb.route(model, calib), minlength=2 ** a.depth).argmax())
            model, method = sb.export_path(model, leaf), f"sigmab leaf {leaf}"
        recon = ftopts.pop("reconstruct", None)  # None: no refit; a dict: sb.reconstruct's keyword arguments
        reconstruction = None if recon is None else sb.reconstruct(model, dense, calib, **recon)
        top1_before = evaluate(model, *val, data.normalize)["top1"]
        cfg = variant_config(a, ftopts, distill)
        teacher = make_teacher(dense) if distill else None  # PointNet++: without the grouping cache
        t0 = time.perf_counter()
        extra, leaf_of_class = contextlib.nullcontext(), None
        if route_weight:
            leaf_of_class = class_leaves(model, *train, data.normalize, data.num_classes)
            print(f"{name}: leaf of each class {leaf_of_class.tolist()}", flush=True)
            extra = route_loss(route_weight, leaf_of_class)
        elif loss_route_weight:
            extra = loss_route_loss(loss_route_weight)
        with extra:
            hist = finetune(model, *train, data.normalize, cfg, teacher=teacher, out_dir=out / name, resume=True,
                            augment=augment,
                            **(dict(test=val, diagnostics=True) if a.track else {}))
        ev = evaluate(model, *val, data.normalize, diagnostics=sb.is_branched(model))
        params = sb.param_report(model)["active_params_max"] if sb.is_branched(model) else \
            sum(p.numel() for p in model.parameters())
        row = {"method": method, "branch": bopts, "finetune": cfg.to_dict(), "distilled": distill,
               "route_weight": route_weight, "loss_route_weight": loss_route_weight, "top1_before_finetune": top1_before,
               "reconstruction": reconstruction, "leaf_of_class": None if leaf_of_class is None else leaf_of_class.tolist(),
               "keep_ratio": keep, "variants_of_run": a.variants,
               "active_fraction": params / dense_params,
               "train_images_per_second": sum(len(train[1]) for _ in hist) / sum(h["seconds"] for h in hist),
               "seconds": time.perf_counter() - t0, "history": hist, "commit": started["commit"], **ev}
        done["rows"][name] = row
        path.write_text(json.dumps(done, indent=1))
        extra = (f" best leaf {100 * ev['best_leaf_top1']:.2f} oracle {100 * ev['oracle_top1']:.2f} "
                 f"leaves {ev['leaf_histogram']}") if "leaf_histogram" in ev else ""
        print(f"{name}: val top-1 {100 * top1_before:.2f}% -> {100 * ev['top1']:.2f}% at {row['active_fraction']:.3f}{extra} "
              f"({row['seconds']:.0f}s, {row['train_images_per_second']:.0f} img/s)", flush=True)


def _last(r: dict) -> str:
    """The tree's last-epoch mean leaf entropy and route loss (when a route term trained it)."""
    last = (r.get("history") or [{}])[-1]
    ent = f"{last['leaf_entropy']:.2f}" if "leaf_entropy" in last else ""
    return ent + (f" / {last['route']:.2f}" if "route" in last else "")


def report(done: dict, dest: str) -> None:
    a, m = done["args"], done["machine"]
    lines = [f"# Recipe ablation: {a['model']} on {a['data']}, target active fraction {a['target_fraction']}",
             "", f"Command: `python -m benchmarks.ablate_recipe --out <dir> ...` with {json.dumps(a)}; "
             f"commit {m['commit']}, {m['cpu']} ({m['threads']} threads), {m['date']}.", "",
             f"{a['epochs']} epochs on {a['train_limit']} training images; top-1 on {a['val_size']} images held out "
             "from the training set (validation, not the test set" + ("; the last of the seeded permutation, which "
             "the dense model's pretraining did not see" if a.get("val_tail") else "") + "). Conditional gain = "
             "routed top-1 minus the "
             "best single leaf applied to every input; oracle = a sample counts when any leaf is right.", "",
             "| variant | method | KD | active | val top-1 before FT | val top-1 | best leaf | oracle | cond. gain (pp) "
             "| leaf shares (%) | train img/s | last epoch: leaf entropy / route loss (nats) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in done["rows"].items():
        tree = "leaf_histogram" in r
        shares = "/".join(f"{100 * h / max(1, sum(r['leaf_histogram'])):.0f}" for h in r["leaf_histogram"]) if tree else ""
        pre = "" if r.get("top1_before_finetune") is None else f"{100 * r['top1_before_finetune']:.2f}"
        lines.append(f"| {name} | {r['method']} | {'yes' if r['distilled'] else 'no'} | {r['active_fraction']:.3f} | "
                     f"{pre} | {100 * r['top1']:.2f} | {100 * r['best_leaf_top1']:.2f} | {100 * r['oracle_top1']:.2f} | "
                     f"{100 * r['conditional_gain']:+.2f} | {shares} | {r['train_images_per_second']:.0f} | {_last(r)} |"
                     if tree else
                     f"| {name} | {r['method']} | {'yes' if r['distilled'] else 'no'} | {r['active_fraction']:.3f} | "
                     f"{pre} | {100 * r['top1']:.2f} | | | | | {r['train_images_per_second']:.0f} | |")
    later = {n: r["variants_of_run"] for n, r in done["rows"].items()
             if r.get("variants_of_run") not in (None, a.get("variants"))}
    if later:  # rows appended by a later run with other --variants (the command above names the first run's)
        lines += ["", "Rows added by later runs into the same folder (their `--variants`): " + "; ".join(
            f"{n} (`{' '.join(v)}`)" for n, v in later.items()) + "."]
    commits = defaultdict(list)  # a row from before rows recorded their commit ran at the first run's
    for n, r in done["rows"].items():
        commits[r.get("commit", m["commit"])].append(n)
    if len(commits) > 1:
        lines += ["", "Rows by the commit they ran at: " + "; ".join(f"{c}: {', '.join(ns)}" for c, ns in commits.items())
                  + "."]
    lines += per_epoch(done["rows"], dest)
    Path(dest).write_text("\n".join(lines) + "\n")
    print(f"wrote {dest}")


def per_epoch(rows: dict, dest: str) -> list:
    """The per-epoch validation top-1 (and each tree's conditional gain) of the variants run with ``--track``, as
    a table and a plot beside ``dest``; nothing when no variant was tracked."""
    tracked = {n: [h for h in r["history"] if "test_top1" in h] for n, r in rows.items()}
    tracked = {n: h for n, h in tracked.items() if h}
    if not tracked:
        return []
    epochs = max(len(h) for h in tracked.values())
    lines = ["", "## Per epoch (validation top-1 %; trees: routed / best leaf / conditional gain pp)", "",
             "| variant | " + " | ".join(str(e + 1) for e in range(epochs)) + " |", "|---|" + "---|" * epochs]

    def cell(h):
        if "test_best_leaf_top1" not in h:
            return f"{100 * h['test_top1']:.2f}"
        return f"{100 * h['test_top1']:.2f} / {100 * h['test_best_leaf_top1']:.2f} / {100 * h['test_conditional_gain']:+.2f}"
    for name, hist in tracked.items():
        lines.append(f"| {name} | " + " | ".join(cell(h) for h in hist) + " |" * (epochs - len(hist) + 1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in tracked.items():
        x = range(1, len(hist) + 1)
        line, = ax.plot(x, [100 * h["test_top1"] for h in hist], marker="o", label=name)
        if "test_best_leaf_top1" in hist[0]:
            ax.plot(x, [100 * h["test_best_leaf_top1"] for h in hist], ls=":", color=line.get_color())
            gx.plot(x, [100 * h["test_conditional_gain"] for h in hist], marker="o", color=line.get_color(), label=name)
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="routed (solid), best single leaf (dotted)")
    gx.set(xlabel="epoch", ylabel="conditional gain (pp)", title="routed minus best leaf")
    ax.legend(fontsize=8)
    for axis in (ax, gx):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    gx.axhline(0, color="grey", lw=0.5)
    fig.tight_layout()
    png = Path(dest).with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return lines + ["", f"![per-epoch validation top-1]({png.name})"]


if __name__ == "__main__":
    main()
