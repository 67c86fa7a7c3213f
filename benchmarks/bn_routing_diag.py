"""Hard routing of an ablation's validation split with BatchNorm in eval mode (running statistics, as deployed)
and with batch statistics (as in training), and on the same inputs with the training augmentation (running
statistics), for the trees an ``ablate_recipe`` run saved: routers whose decisions flip between these sit within
BatchNorm's train/eval shift, or the augmentation's shift, of their boundary.

    python -m benchmarks.bn_routing_diag runs/ablate_mn40 bal2_nocover nocover_rate05

The tree is rebuilt from the run's recorded arguments (same model, checkpoint, calibration set and budget) and
each variant's last checkpoint is loaded into a copy; nothing is trained.
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch

import sigmab_plugin as sb
from sigmab_plugin.baselines.data import load_dataset
from sigmab_plugin.baselines.models import classifier_name
from sigmab_plugin.baselines.registry import RunContext, get_method
from sigmab_plugin.finetune import FinetuneConfig, augment_batch
from sigmab_plugin.routing import tree_state
from benchmarks.ablate_recipe import branch_options, reference, split


def leaves(model, x: torch.Tensor, batch: int, batch_stats: bool) -> torch.Tensor:
    """Each sample's hard-routed leaf, BatchNorm on running statistics or (``batch_stats``) on batches of ``batch``."""
    if not batch_stats:
        return torch.cat([sb.route(model, x[i:i + batch]) for i in range(0, len(x), batch)])
    m = copy.deepcopy(model).train()  # a copy: train mode updates the running statistics
    state, out = tree_state(m), []
    sb.set_routing(m, "hard")
    with torch.no_grad():
        for i in range(0, len(x), batch):
            m(x[i:i + batch])
            out.append(state.last_leaves.clone())
    return torch.cat(out)


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="an ablate_recipe --out folder (its results.json holds the arguments)")
    ap.add_argument("variants", nargs="+", help="tree variants of that run")
    a = ap.parse_args(argv)
    done = json.loads((Path(a.run) / "results.json").read_text())
    run = argparse.Namespace(**done["args"])
    torch.manual_seed(run.seed)
    data = load_dataset(run.data, seed=run.seed)
    perm, _, va = split(len(data.train.labels), run)
    raw = data.train.images[va]
    x = data.normalize(raw)
    flip = FinetuneConfig().flip  # ablate_recipe trains images with finetune's default crop and flip
    aug = getattr(data, "augment", None) or (lambda b, g: augment_batch(b, g, flip=flip))
    x_aug = data.normalize(aug(raw, torch.Generator().manual_seed(run.seed)))
    dense, calib = reference(run, data, perm)
    budget = int(run.target_fraction * sum(p.numel() for p in dense.parameters()))
    trees = {}  # one tree per set of branch() options, as in ablate_recipe
    for name in a.variants:
        opts = {**branch_options(run), **done["rows"][name]["branch"]}
        key = json.dumps(opts, sort_keys=True)
        if key not in trees:
            trees[key] = get_method("sigmab").prepare(RunContext(dense, calib, budget, opts, classifier_name(dense),
                                                                 run.seed, run.target_fraction))
        tree = copy.deepcopy(trees[key])
        tree.load_state_dict(torch.load(Path(a.run) / name / "checkpoint.pt", map_location="cpu",
                                        weights_only=False)["model"])
        k = 2 ** run.depth
        deployed = torch.bincount(leaves(tree, x, 100, False), minlength=k).tolist()
        training = torch.bincount(leaves(tree, x, run.batch_size, True), minlength=k).tolist()
        augmented = torch.bincount(leaves(tree, x_aug, 100, False), minlength=k).tolist()
        print(f"{name}: leaf counts on {len(x)} validation samples, BatchNorm running statistics {deployed}; "
              f"batch statistics (batches of {run.batch_size}) {training}; running statistics on the inputs with "
              f"the training augmentation {augmented}", flush=True)

if __name__ == "__main__":
    main()
