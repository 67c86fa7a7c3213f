"""Fine-tuning of SigmaB trees with soft routing, and the one training loop every method shares.

For a branched model the loss is cross-entropy on the path-probability mixture, plus a load-balance
term on the batch-mean leaf probabilities (zero when leaves are used uniformly), plus optional
distillation from the dense teacher; the router temperature anneals geometrically per epoch toward
hard routing. Evaluation always routes hard (the deployed behaviour). A dense or statically pruned
model goes through the same loop with the routing terms off, which is what makes comparisons fair.
Every epoch ends with an atomic checkpoint (temp file + rename); ``resume=True`` continues from it
and reaches the same final weights as an uninterrupted run (seeded per epoch, CPU-deterministic).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .branch import _is_branched
from .routing import set_routing

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass
class FinetuneConfig:
    """Training options shared by every method of a comparison."""

    epochs: int = field(default=3, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (cosine-annealed to 0)"})
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = field(default=True, metadata={"help": "random crop (pad 4) during training"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flip (off for digits)"})
    temperature_start: float = field(default=1.0, metadata={"help": "router temperature of the first epoch"})
    temperature_end: float = field(default=0.1, metadata={"help": "router temperature of the last epoch"})
    hard_epochs: int = field(default=1, metadata={"help": "last epochs trained with hard routing (routers frozen)"})
    balance_weight: float = field(default=0.1, metadata={"help": "weight of the leaf load-balance term"})
    distill_weight: float = field(default=0.0, metadata={"help": "weight of distillation from the dense model"})
    distill_temperature: float = 4.0
    seed: int = 0
    eval_batch_size: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {"epochs": self.epochs >= 0, "hard_epochs": 0 <= self.hard_epochs <= self.epochs, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "temperature_start": self.temperature_start > 0, "temperature_end": self.temperature_end > 0,
                  "balance_weight": self.balance_weight >= 0, "distill_weight": self.distill_weight >= 0,
                  "eval_batch_size": self.eval_batch_size >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"FinetuneConfig.{name}={getattr(self, name)!r} is out of range")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        return cls(**data)

    def temperature(self, epoch: int) -> float:
        if self.epochs <= 1:
            return self.temperature_end
        a = epoch / (self.epochs - 1)
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** a


def augment_batch(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random 4-pixel-padded crop (and flip) of a uint8/float NCHW batch, driven by ``gen``."""
    b, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=gen)
    dx = torch.randint(0, 9, (b,), generator=gen)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 8)
    out = pad.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        out = torch.where(mask.view(b, 1, 1, 1), out.flip(3), out)
    return out


def leaf_balance(leaf_probs: torch.Tensor) -> torch.Tensor:
    """``L * sum(q**2) - 1`` for the batch-mean leaf distribution q: 0 when uniform, L-1 when collapsed."""
    q = leaf_probs.mean(0)
    return q.numel() * (q * q).sum() - 1.0


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
             batch_size: int = 256) -> Dict[str, object]:
    """Top-1 with hard routing, and for a tree the leaf histogram of the evaluated set."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, hist = 0, None
    try:
        for i in range(0, len(labels), batch_size):
            x = normalize(images[i:i + batch_size].to(device))
            out = model(x)
            correct += int((out.argmax(1).cpu() == labels[i:i + batch_size]).sum())
            if _is_branched(model):
                leaves = model._sigmab_tree.last_leaves.cpu()
                counts = torch.bincount(leaves, minlength=2 ** model._sigmab_tree.depth)
                hist = counts if hist is None else hist + counts
    finally:
        model.train(was)
    result = {"top1": correct / max(1, len(labels))}
    if hist is not None:
        result["leaf_histogram"] = hist.tolist()
    return result


def finetune(model: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor, normalize: Callable,
             cfg: FinetuneConfig, *, test: Optional[tuple] = None, teacher: Optional[nn.Module] = None,
             out_dir=None, resume: bool = False) -> List[dict]:
    """Train ``model`` in place (its train/eval mode is restored); returns the per-epoch log (also
    written to ``out_dir/log.jsonl``, with an atomic checkpoint per epoch in ``out_dir``)."""
    device = next(model.parameters()).device
    branched = _is_branched(model)
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(train_labels) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    history: List[dict] = []
    start = 0
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (out_dir / CHECKPOINT).is_file():
            ck = torch.load(out_dir / CHECKPOINT, map_location=device, weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            history, start = json.loads(ck["history"]), int(ck["epoch"]) + 1
            tmp = out_dir / (LOG + ".tmp")  # the checkpoint is the truth: the log restarts from it
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
            os.replace(tmp, out_dir / LOG)
        elif not resume and (out_dir / LOG).exists():
            (out_dir / LOG).unlink()
    if teacher is not None:
        teacher.eval()
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout etc.; batches use their own generator
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        temperature = cfg.temperature(epoch)
        if branched:
            hard = epoch >= cfg.epochs - cfg.hard_epochs
            set_routing(model, "hard" if hard else "soft", temperature)
        model.train()
        perm = torch.randperm(len(train_labels), generator=gen)
        sums = {"loss": 0.0, "ce": 0.0, "balance": 0.0, "distill": 0.0, "correct": 0, "seen": 0}
        batches = range(0, len(perm), cfg.batch_size)
        if cfg.progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for i in batches:
            idx = perm[i:i + cfg.batch_size]
            x = train_images[idx]
            if cfg.augment:
                x = augment_batch(x, gen, cfg.flip)
            x, y = normalize(x.to(device, non_blocking=True)), train_labels[idx].to(device)
            out = model(x)
            ce = F.cross_entropy(out, y)
            loss = ce
            if branched and cfg.balance_weight > 0 and model._sigmab_tree.last_leaf_probs is not None:
                bal = leaf_balance(model._sigmab_tree.last_leaf_probs)
                loss = loss + cfg.balance_weight * bal
                sums["balance"] += float(bal.detach()) * len(idx)
            if teacher is not None and cfg.distill_weight > 0:
                with torch.no_grad():
                    t_out = teacher(x)
                tt = cfg.distill_temperature
                kd = F.kl_div(F.log_softmax(out / tt, 1), F.softmax(t_out / tt, 1), reduction="batchmean") * tt * tt
                loss = loss + cfg.distill_weight * kd
                sums["distill"] += float(kd.detach()) * len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["loss"] += float(loss.detach()) * len(idx)
            sums["ce"] += float(ce.detach()) * len(idx)
            sums["correct"] += int((out.argmax(1) == y).sum())
            sums["seen"] += len(idx)
        if branched:
            set_routing(model, "auto")
        n = max(1, sums["seen"])
        row = {"epoch": epoch + 1, "temperature": temperature if branched else None, "lr": sched.get_last_lr()[0],
               "loss": sums["loss"] / n, "ce": sums["ce"] / n, "balance": sums["balance"] / n,
               "distill": sums["distill"] / n, "train_top1_soft": sums["correct"] / n,
               "seconds": time.perf_counter() - t0}
        if test is not None:
            row.update({f"test_{k}": v for k, v in evaluate(model, test[0], test[1], normalize,
                                                           cfg.eval_batch_size).items()})
        history.append(row)
        if out_dir is not None:
            _save_checkpoint(out_dir, model, opt, sched, epoch, history)
            with open(out_dir / LOG, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    model.train(was_training)
    return history


def _save_checkpoint(out_dir: Path, model, opt, sched, epoch: int, history: List[dict]) -> None:
    tmp = out_dir / (CHECKPOINT + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch, "history": json.dumps(history)}, tmp)
    os.replace(tmp, out_dir / CHECKPOINT)
