"""One NNI trial: branch a dense model with the trial's options, fine-tune it, report top-1.

Parameters come from NNI (``nni.get_next_parameter()``): each name is a field of
``sigmab_plugin.BranchConfig`` (depth, keep_ratio, coverage, ...) or of
``sigmab_plugin.finetune.FinetuneConfig`` (lr, temperature_end, balance_weight, distill_weight, ...).
Run alone (no NNI manager), it uses the defaults. Reports hard-routed test top-1 after every epoch
(``nni.report_intermediate_result``) and at the end ``{"default": top1, "active_fraction": ...}``.
The dense reference is trained once (or loaded from --checkpoint) and cached in --cache.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import nni
import torch

import sigmab_plugin as sb
from sigmab_plugin.baselines.data import load_dataset
from sigmab_plugin.baselines.models import create_model
from sigmab_plugin.finetune import FinetuneConfig, evaluate, finetune

BRANCH_FIELDS = {f.name for f in dataclasses.fields(sb.BranchConfig)} - {"version", "progress"}
FINETUNE_FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"progress", "epochs"}


def split_params(params: dict):
    unknown = sorted(set(params) - BRANCH_FIELDS - FINETUNE_FIELDS)
    if unknown:
        raise ValueError(f"search-space names {unknown} are neither BranchConfig nor FinetuneConfig fields")
    return ({k: v for k, v in params.items() if k in BRANCH_FIELDS},
            {k: v for k, v in params.items() if k in FINETUNE_FIELDS})


def dense_reference(a, data) -> torch.nn.Module:
    model = create_model(a.model, data.num_classes, a.checkpoint, a.shortcut)
    if a.checkpoint:
        return model.eval()
    cache = Path(a.cache) / f"{a.model}-{a.data}-{a.shortcut}-{a.pretrain_epochs}-{a.train_limit}.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    cfg = FinetuneConfig(epochs=a.pretrain_epochs, lr=0.05, batch_size=64, flip=False, distill_weight=0.0,
                         progress=False)
    finetune(model, data.train.images, data.train.labels, data.normalize, cfg)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(cache)
    return model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--shortcut", default="B")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "sigmab" / "nni"))
    a = ap.parse_args(argv)
    branch_opts, ft_opts = split_params(nni.get_next_parameter() or {})
    data = load_dataset(a.data, a.data_root)
    if a.train_limit:
        data.train = type(data.train)(data.train.images[:a.train_limit], data.train.labels[:a.train_limit])
    if a.test_limit:
        data.test = type(data.test)(data.test.images[:a.test_limit], data.test.labels[:a.test_limit])
    dense = dense_reference(a, data)
    g = torch.Generator().manual_seed(0)
    calib = data.normalize(data.train.images[torch.randperm(len(data.train.labels), generator=g)[:256]])
    tree = sb.branch(copy.deepcopy(dense), calib_data=calib, progress=False, **branch_opts)
    cfg = FinetuneConfig(**{"epochs": a.epochs, "batch_size": 64, "flip": a.data != "digits", "progress": False,
                            **ft_opts})
    finetune(tree, data.train.images, data.train.labels, data.normalize, cfg, teacher=dense,
             test=(data.test.images, data.test.labels),
             on_epoch=lambda row: nni.report_intermediate_result(row["test_top1"]))
    result = evaluate(tree, data.test.images, data.test.labels, data.normalize)
    final = {"default": result["top1"], "active_fraction": sb.param_report(tree)["active_fraction_max"],
             "leaf_histogram": json.dumps(result["leaf_histogram"])}
    nni.report_final_result(final)
    return final


if __name__ == "__main__":
    main()
