"""What :func:`sigmab_plugin.finetune.finetune` keeps of a run: the per-epoch checkpoint (written atomically),
the checks that a resumed run matches it, and the in-memory snapshot that a failed run restores."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import torch
from torch import nn

from .routing import is_branched, set_routing, tree_state

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"

_RUN_ONLY = ("progress", "eval_batch_size")  # settings a resumed run may change
# fields whose default differs from how runs trained before the field existed (a checkpoint or report row without it)
BEFORE_FIELD = {"node_lr_scale": False}
TREE_ONLY = ("node_lr_scale",)  # a resumed plain (static or dense) model may differ in these: they do not reach it


class Snapshot:
    """Weights, buffers, every module's train/eval flag and the routing settings of a model."""

    def __init__(self, model: nn.Module):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.flags = [(m, m.training) for m in model.modules()]
        self.routing = tree_state(model).settings() if is_branched(model) else None

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(self.state[k])
        for m, flag in self.flags:
            m.training = flag
        if self.routing is not None:
            set_routing(model, **self.routing)


def load_resume(path: Path, model: nn.Module, cfg, device) -> dict:
    """The checkpoint at ``path``, checked against ``model`` and ``cfg`` before anything is loaded."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated or foreign files: never suggest unsafe loading
        raise ValueError(f"{path} cannot be read as a finetune checkpoint ({type(err).__name__}); delete it to "
                         "start over, or resume=False") from None
    if not isinstance(ck, dict) or not {"model", "optimizer", "scheduler", "epoch", "history"} <= set(ck):
        raise ValueError(f"{path} is not a finetune checkpoint (keys {sorted(ck)[:6] if isinstance(ck, dict) else ck})")
    own = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in ck["model"].items()}
    if own != theirs:
        diff = sorted(set(own) ^ set(theirs))[:3] or sorted(k for k in own if own[k] != theirs[k])[:3]
        raise ValueError(f"{path} holds the weights of another model (first differences: {diff}); resume only with "
                         "the model that wrote it, or resume=False")
    saved = ck.get("config")
    if saved is not None:
        mine = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_ONLY}
        # a field added since the checkpoint: how runs trained before it existed (else its default)
        defaults = {**type(cfg)(progress=False).to_dict(), **BEFORE_FIELD}
        theirs_cfg = {**defaults, **{k: v for k, v in json.loads(saved).items() if k not in _RUN_ONLY}}
        inert = () if is_branched(model) else TREE_ONLY  # settings that do not change a plain model's training
        changed = sorted(k for k in mine if mine[k] != theirs_cfg.get(k) and k not in inert)
        if changed:
            what = ", ".join(f"{k}: {theirs_cfg.get(k)!r} -> {mine[k]!r}" for k in changed[:4])
            raise ValueError(f"{path} was written with other training settings ({what}); resume with the same "
                             "FinetuneConfig, or resume=False to start over")
    return ck


def save_checkpoint(out_dir: Path, model, opt, sched, epoch: int, history: List[dict], cfg) -> None:
    tmp = out_dir / (CHECKPOINT + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch, "history": json.dumps(history), "config": json.dumps(cfg.to_dict())}, tmp)
    os.replace(tmp, out_dir / CHECKPOINT)
