"""Fine-tuning of SigmaB trees with soft routing, and the one training loop every method shares.

A thin loop over the public pieces (:func:`sigmab_plugin.tree_loss`, :class:`TemperatureSchedule`,
:func:`sigmab_plugin.set_routing`): any other training loop can use them the same way. Data comes
either as in-memory uint8 images (the fast path for small sets, with a seeded pad-4 crop and flip)
or as any ``DataLoader`` yielding ``(x, y)`` with its own transforms. A dense or statically pruned
model goes through the same loop and loss terms (cross-entropy, distillation) with the routing
terms off, which is what makes comparisons fair. Evaluation always routes hard (the deployed
behaviour). Every epoch ends with an atomic checkpoint (temp file + rename); ``resume=True``
continues from it and reaches the same final weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checkpoint import BEFORE_FIELD, CHECKPOINT, LOG, Snapshot, load_resume  # noqa: F401  (BEFORE_FIELD: re-exported)
from ._checkpoint import save_checkpoint as _save_checkpoint  # looked up here, so a test can replace it
from ._modes import kept_train_flags
from ._progress import progress
from .evaluate import evaluate
from .norm_stats import freeze_batchnorm, recalibrate_batchnorm
from .objective import LossConfig, TemperatureSchedule, _number, training_loss
from .routing import RoutedModule, is_branched, route_on, set_routing, tree_state

AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
BN_MODES = ("batch", "shared", "frozen")
ROUTE_INPUTS = ("augmented", "clean")


@dataclass
class FinetuneConfig:
    """Training options shared by every method of a comparison (the loss terms are :class:`LossConfig`'s)."""

    epochs: int = field(default=3, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=128, metadata={"help": "training batch size (in-memory data)"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (cosine-annealed to 0)"})
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = field(default=True, metadata={"help": "random crop (pad 4) during training (in-memory data)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flip (in-memory data; off for digits)"})
    temperature_start: float = field(default=1.0, metadata={"help": "router temperature of the first batch"})
    temperature_end: float = field(default=0.1, metadata={"help": "router temperature of the last soft batch"})
    hard_epochs: int = field(default=0, metadata={"help": "last epochs trained with hard routing (routers frozen)"})
    objective: str = field(default="expected", metadata={"help": "'expected' per-path loss or 'mixture'"})
    balance_weight: float = field(default=2.0, metadata={"help": "weight of the leaf load-balance term"})
    balance_rate: float = field(default=0.0, metadata={"help": "step of the routers' load-balancing offsets"})
    decisive_weight: float = field(default=0.0, metadata={"help": "weight of the per-sample leaf entropy (no hedging)"})
    distill_weight: float = field(default=1.0, metadata={"help": "weight of distillation (when a teacher is given)"})
    distill_temperature: float = 4.0
    distill_paths: str = field(default="all", metadata={"help": "'all' paths unweighted or 'weighted' by P(path)"})
    top_k: Optional[int] = field(default=None, metadata={"help": "soft routing: paths per sample (None: all)"})
    bn_weighting: bool = field(default=False, metadata={"help": "node BatchNorm statistics weighted by P(path)"})
    bn_mode: str = field(default="batch", metadata={
        "help": "BatchNorm statistics in training: 'batch'; 'shared': a tree's shared layers use running statistics "
                "(as deployed; a model without a tree trains as with 'batch'); 'frozen': every layer does"})
    bn_recalibration_batches: int = field(default=100, metadata={
        "help": "bn_mode 'shared'/'frozen': training batches that first re-estimate every BatchNorm's statistics "
                "under hard routing (route_inputs 'clean': the batches unaugmented; 0: keep them)"})
    route_inputs: str = field(default="augmented", metadata={
        "help": "what a tree's routers decide on in training: each sample's 'augmented' input, or its 'clean' "
                "(unaugmented) one, as in deployment (in-memory data; see sigmab_plugin.route_on)"})
    node_lr_scale: bool = field(default=True, metadata={
        "help": "a tree: each node's layers train at lr times the number of nodes of its level (weight decay divided "
                "by it, so lr * decay is unchanged). A node's gradient comes from its share of the samples (the "
                "expected loss) or is averaged over all paths (distillation), about 1/nodes of a static layer's, "
                "so under SGD a leaf's weights otherwise move about 1/leaves as far per step"})
    amp: Optional[str] = field(default=None, metadata={"help": "autocast dtype: None, 'bf16' or 'fp16'"})
    seed: int = 0
    eval_batch_size: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "hard_epochs", "batch_size", "seed", "eval_batch_size", "bn_recalibration_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if "size" in name else 0):
                raise ValueError(f"FinetuneConfig.{name}={v!r} must be an integer >= {1 if 'size' in name else 0}")
        if self.hard_epochs > self.epochs:
            raise ValueError(f"FinetuneConfig.hard_epochs={self.hard_epochs} exceeds epochs={self.epochs}")
        _number("FinetuneConfig.lr", self.lr, 0, lo_open=True)
        for name in ("momentum", "weight_decay", "balance_rate"):
            _number(f"FinetuneConfig.{name}", getattr(self, name), 0)
        for name in ("augment", "flip", "bn_weighting", "node_lr_scale", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FinetuneConfig.{name}={getattr(self, name)!r} must be True or False")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"FinetuneConfig.bn_mode={self.bn_mode!r}: choose one of {BN_MODES}")
        if self.bn_mode == "frozen" and self.bn_weighting:
            raise ValueError("FinetuneConfig.bn_weighting=True weights the nodes' batch statistics, which bn_mode='frozen' "
                             "does not use: set bn_weighting=False, or bn_mode 'batch' or 'shared'")
        if self.route_inputs not in ROUTE_INPUTS:
            raise ValueError(f"FinetuneConfig.route_inputs={self.route_inputs!r}: choose one of {ROUTE_INPUTS}")
        if self.route_inputs == "clean" and not self.augment:
            raise ValueError("FinetuneConfig.route_inputs='clean' routes on the unaugmented inputs, but augment=False "
                             "trains on them already: set augment=True, or route_inputs='augmented'")
        if self.amp not in AMP:
            raise ValueError(f"FinetuneConfig.amp={self.amp!r}: choose one of {list(AMP)}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"FinetuneConfig.top_k={self.top_k!r} must be None or an integer >= 1")
        self.schedule()
        self.loss()

    def loss(self) -> LossConfig:
        return LossConfig(self.objective, self.balance_weight, self.distill_weight, self.distill_temperature,
                          self.distill_paths, self.decisive_weight)

    def schedule(self, steps_per_epoch: int = 1) -> TemperatureSchedule:
        """The router temperature per training batch: annealed geometrically over the soft-routed batches
        (``epochs - hard_epochs`` epochs of ``steps_per_epoch``), so even a one-epoch run starts soft."""
        soft = max(1, (self.epochs - self.hard_epochs) * steps_per_epoch)
        return TemperatureSchedule(self.temperature_start, self.temperature_end, soft)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig field(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


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


def _world() -> Tuple[int, int]:
    """(rank, world size) of the running ``torch.distributed`` job, (0, 1) without one."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _batches(data, cfg: FinetuneConfig, gen: torch.Generator, epoch: int = 0,
             augment: Optional[Callable] = None, clean: bool = False) -> Tuple[Iterable, int]:
    """This rank's training batches of one epoch and their number: in-memory ``(images, labels)``
    (every rank draws the same permutation and takes its share; with ``clean``, ``(x, y, unaugmented x)``)
    or a loader (a ``DistributedSampler`` in it is told the epoch)."""
    rank, world = _world()
    if isinstance(data, tuple):
        images, labels = data
        perm = torch.randperm(len(labels), generator=gen)[rank::world]

        def it():
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                x = raw = images[idx]
                if cfg.augment:
                    x = augment(x, gen) if augment is not None else augment_batch(x, gen, cfg.flip)
                yield (x, labels[idx], raw) if clean else (x, labels[idx])
        return it(), -(-len(perm) // cfg.batch_size)
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return data, len(data) if hasattr(data, "__len__") else 0


def finetune(model: nn.Module, train_images, train_labels=None, normalize: Optional[Callable] = None,
             cfg: Optional[FinetuneConfig] = None, *, test=None, teacher: Optional[nn.Module] = None,
             out_dir=None, resume: bool = False, diagnostics: bool = False,
             on_epoch: Optional[Callable[[dict], None]] = None,
             augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None) -> List[dict]:
    """Train ``model`` in place (its train/eval mode and routing settings are restored); returns the
    per-epoch log (also written to ``out_dir/log.jsonl``, with an atomic checkpoint per epoch).

    Data: ``train_images`` (uint8 NCHW) with ``train_labels`` in memory, or ``train_images`` a
    ``DataLoader`` of ``(x, y)`` and ``train_labels=None``. ``normalize`` maps a batch to the model's
    input (default: identity). ``test``: ``(images, labels)`` or a loader, evaluated after each epoch.
    ``teacher``: the dense model, for distillation (``cfg.distill_weight``). ``on_epoch(row)`` is
    called with each epoch's log row (e.g. to report to NNI or stop early by raising). ``augment(x, gen)``
    replaces the in-memory image augmentation (pad-4 crop and flip), e.g. point-cloud augmentation.

    Under ``torchrun`` (an initialised process group) the model is wrapped in
    ``DistributedDataParallel`` (unused leaves and routers allowed), every rank trains on its share of
    each batch order, and rank 0 alone writes checkpoints and logs.
    """
    cfg = FinetuneConfig() if cfg is None else cfg
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"cfg must be a FinetuneConfig, got {type(cfg).__name__}")
    data = (train_images, train_labels) if train_labels is not None else train_images
    norm = normalize or (lambda t: t)
    _check_data(model, data, norm, "training data")
    if test is not None:
        _check_data(model, test, norm, "test data")
    snapshot = Snapshot(model)
    try:
        return _finetune(model, data, norm, cfg, test, normalize, teacher, out_dir, resume, diagnostics, on_epoch,
                         augment)
    except BaseException:
        snapshot.restore(model)  # a failed or interrupted run leaves the model as it was
        raise


def _classes(model: nn.Module, x: torch.Tensor) -> int:
    state = tree_state(model) if is_branched(model) else None
    mode = state.mode if state is not None else None
    try:
        with kept_train_flags(model), torch.no_grad():
            model.eval()
            if state is not None:
                state.mode = "hard"
            return int(model(x).shape[1])
    finally:
        if state is not None:
            state.mode = mode


def _check_data(model: nn.Module, data, norm: Callable, what: str) -> None:
    """In-memory data: matching lengths, finite images, integer labels within the model's classes."""
    if not isinstance(data, tuple):
        if not isinstance(data, Iterable):
            raise TypeError(f"{what} must be (images, labels) tensors or a DataLoader of (x, y) batches, got "
                            f"{type(data).__name__}")
        return  # a loader's batches are checked as they come
    images, labels = data
    if not torch.is_tensor(images) or images.ndim < 2:
        raise ValueError(f"{what}: images must be an (N, C, ...) tensor, got {getattr(images, 'shape', type(images))}")
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels))} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels; give one label per image")
    if len(labels) == 0:
        raise ValueError(f"{what} is empty")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise ValueError(f"{what}: the images contain NaN or inf; clean them before training")
    device = next(model.parameters()).device
    classes = _classes(model, norm(images[:1].to(device)))
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(f"{what}: labels span {low}..{high} but the model has {classes} outputs; labels must lie "
                         f"in 0..{classes - 1}")


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> List[dict]:
    """The SGD parameter groups of ``model``'s trainable parameters: one at ``cfg.lr``, or, with
    ``cfg.node_lr_scale`` and a tree, :func:`node_param_groups`."""
    if not (cfg.node_lr_scale and is_branched(model)):
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return node_param_groups(model, cfg.lr, cfg.weight_decay)


def node_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                      exclude_1d: bool = False) -> List[dict]:
    """Parameter groups for any torch optimizer that train each node of a tree at ``lr * nodes`` of its level
    and ``weight_decay / nodes`` (lr x decay unchanged); the shared layers and the routers keep ``lr`` (a model
    that is not a tree: every parameter at ``lr``). A leaf of a depth-2 tree gets about a quarter of a static
    layer's gradient (its share of the expected loss; distillation averaged over the paths), so under SGD this
    gives its weights a static layer's step (``FinetuneConfig.node_lr_scale``).

    ``exclude_1d=True`` gives every 1-D parameter (biases, norm layers' weights) no weight decay, as timm's
    ``filter_bias_and_bn`` does, so ``create_optimizer_v2(model, ..., param_group_fn=lambda m:
    node_param_groups(m, lr, wd, exclude_1d=True))`` keeps timm's recipe and adds the per-level rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    nodes = {id(p): len(m.variants) for m in model.modules() if isinstance(m, RoutedModule)
             for v in m.variants for p in v.parameters()}
    by_key: Dict[tuple, list] = {}
    for p in params:
        by_key.setdefault((nodes.get(id(p), 1), exclude_1d and p.ndim <= 1), []).append(p)
    return [{"params": ps, "lr": lr * k, "weight_decay": 0.0 if no_decay else weight_decay / k}
            for (k, no_decay), ps in sorted(by_key.items())]


def _finetune(model, data, norm, cfg: FinetuneConfig, test, normalize, teacher, out_dir, resume, diagnostics,
              on_epoch, augment):
    device = next(model.parameters()).device
    branched = is_branched(model)
    saved_routing = tree_state(model).settings() if branched else None
    flags = [(m, m.training) for m in model.modules()]
    opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, _batches(data, cfg, torch.Generator())[1])  # this rank's share
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    rank, world = _world()
    loss_cfg, schedule = cfg.loss(), cfg.schedule(steps_per_epoch)
    history: List[dict] = []
    start = 0
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"out_dir={out_dir} is a file; give a folder for checkpoints and the log")
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        _barrier(world)
        if resume and (out_dir / CHECKPOINT).is_file():
            ck = load_resume(out_dir / CHECKPOINT, model, cfg, device)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            history, start = json.loads(ck["history"]), int(ck["epoch"]) + 1
            if rank == 0:  # the checkpoint is the truth: the log restarts from it
                tmp = out_dir / (LOG + ".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
                os.replace(tmp, out_dir / LOG)
        elif not resume and (out_dir / LOG).exists() and rank == 0:
            (out_dir / LOG).unlink()
        _barrier(world)
    if cfg.route_inputs == "clean" and branched and not isinstance(data, tuple):
        raise ValueError("FinetuneConfig.route_inputs='clean' needs in-memory (images, labels) data, whose augmentation "
                         "finetune applies itself (a DataLoader hands over augmented batches only): pass tensors, or "
                         "route_inputs='augmented'")
    if teacher is not None:
        teacher.eval()
    fixes_stats = cfg.bn_mode == "frozen" or (cfg.bn_mode == "shared" and branched)  # else: as 'batch'
    if fixes_stats and start == 0 and cfg.bn_recalibration_batches > 0:
        torch.manual_seed(cfg.seed * 100003 - 1)  # dropout, loader shuffling (each epoch reseeds after)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 - 1)  # batches like an epoch's, drawn apart
        # route_inputs 'clean': the unaugmented inputs, routed on themselves, as deployed (their routes are the
        # ones training uses, and routes recorded now would read the statistics being reset)
        clean = cfg.route_inputs == "clean" and branched
        batches = (norm(b[2 if clean else 0].to(device)) for b in _batches(data, cfg, gen, 0, augment, clean)[0])
        recalibrate_batchnorm(model, batches, cfg.bn_recalibration_batches)
        _sync_buffers(model, world)
    runner = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device],
                                         find_unused_parameters=branched)
    try:
        for epoch in range(start, cfg.epochs):
            row = _epoch(model, runner, data, norm, cfg, loss_cfg, epoch, schedule if branched else None,
                         steps_per_epoch, opt, sched, scaler, teacher, device, augment)
            _sync_buffers(model, world)
            if test is not None:
                ev = evaluate(model, *(test if isinstance(test, tuple) else (test,)), normalize=normalize,
                              batch_size=cfg.eval_batch_size, diagnostics=diagnostics)
                row.update({f"test_{k}": v for k, v in ev.items()})
            history.append(row)
            if out_dir is not None and rank == 0:
                _save_checkpoint(out_dir, model, opt, sched, epoch, history, cfg)
                with open(out_dir / LOG, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            _barrier(world)
            if on_epoch is not None:
                on_epoch(row)
    finally:
        if branched:
            set_routing(model, **saved_routing)
        for m, flag in flags:
            m.training = flag
    return history


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Rank 0's buffers (BatchNorm statistics, router balance offsets) on every rank, as DDP itself
    broadcasts them before each forward: the ranks end every epoch with identical models."""
    if world > 1:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, 0)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _epoch(model, runner, data, norm, cfg: FinetuneConfig, loss_cfg: LossConfig, epoch: int,
           schedule: Optional[TemperatureSchedule], steps_per_epoch: int, opt, sched, scaler, teacher, device,
           augment=None) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout, loader shuffling; in-memory batches use gen
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    temps = []  # router temperature of each batch (annealed per batch over the soft epochs)
    if schedule is not None:
        hard = epoch >= cfg.epochs - cfg.hard_epochs
        set_routing(model, "hard" if hard else "soft", schedule(epoch * steps_per_epoch), top_k=cfg.top_k,
                    balance_rate=cfg.balance_rate, bn_weighting=cfg.bn_weighting)
    model.train()
    if cfg.bn_mode != "batch":
        freeze_batchnorm(model, "all" if cfg.bn_mode == "frozen" else "shared")
    clean = schedule is not None and cfg.route_inputs == "clean"  # a tree: route each sample on its unaugmented input
    batches, n_batches = _batches(data, cfg, gen, epoch, augment, clean)
    batches = progress(batches, cfg.progress, f"epoch {epoch + 1}/{cfg.epochs}", n_batches or None)
    sums: Dict[str, float] = {}
    seen = correct = 0
    load = None  # training leaf shares: path probability mass (soft) or routed samples (hard)
    greedy = None  # soft routing: how many samples have each leaf as their most probable one
    autocast = torch.autocast(device.type, dtype=AMP[cfg.amp]) if cfg.amp else contextlib.nullcontext()
    for step, (xb, yb, *raw) in enumerate(batches):
        if schedule is not None:
            # per batch; a loader without len() has steps_per_epoch 1: per epoch, as its lr schedule
            tree_state(model).temperature = schedule(epoch * steps_per_epoch + (step if n_batches else 0))
            temps.append(tree_state(model).temperature)
        x, y = norm(xb.to(device, non_blocking=True)), yb.to(device)
        if not isinstance(data, tuple) and (x.is_floating_point() and not torch.isfinite(x).all()):
            raise ValueError(f"a training batch of epoch {epoch + 1} contains NaN or inf; clean the data")
        routing = route_on(model, norm(raw[0].to(device))) if clean else contextlib.nullcontext()
        with autocast, routing:
            out = runner(x)
            t_out = None
            if teacher is not None and loss_cfg.distill_weight > 0:
                with torch.no_grad():
                    t_out = teacher(x)
            loss, parts = training_loss(model, out, y, teacher_logits=t_out, config=loss_cfg)
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(f"the training loss became {parts['loss']} in epoch {epoch + 1}: lower lr, or "
                                     "check the data and labels; the model was restored to its state before finetune")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * len(y)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
        if schedule is not None:
            state = tree_state(model)
            n_leaves = 2 ** state.depth
            if state.last_leaf_probs is not None:
                share = state.last_leaf_probs.detach().sum(0)
                top = torch.bincount(state.last_leaf_probs.detach().argmax(1).cpu(), minlength=n_leaves).double()
                greedy = top if greedy is None else greedy + top
            else:
                share = torch.bincount(state.last_leaves, minlength=n_leaves).to(torch.float64)
            load = share.double().cpu() if load is None else load + share.double().cpu()
    n = max(1, seen)
    seconds = time.perf_counter() - t0
    row = {"epoch": epoch + 1, "temperature": temps[-1] if temps else None,
           "temperature_first": temps[0] if temps else None, "lr": sched.get_last_lr()[0],
           **{k: v / n for k, v in sums.items()}, "train_top1": correct / n, "seconds": seconds,
           "images_per_second": seen / max(seconds, 1e-9)}
    if load is not None:
        row["train_leaf_share"] = (load / load.sum()).tolist()
    if greedy is not None:  # far from train_leaf_share when routers hedge (every sample near 50/50)
        row["train_leaf_share_argmax"] = (greedy / greedy.sum()).tolist()
    return row
