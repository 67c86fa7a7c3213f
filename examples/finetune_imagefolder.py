"""Fine-tune a SigmaB tree of a timm model on an ImageFolder, in your own training loop.

timm builds the model, the transforms, the optimizer and the LR schedule; SigmaB adds only the
branching, ``tree_loss`` (expected per-path loss + balance + distillation from the dense model), the
per-level learning rate (``sb.node_param_groups`` as timm's ``param_group_fn``) and the router
temperature. Any training script can be adapted the same way.

    python examples/finetune_imagefolder.py --data path/with/train_and_val --model resnet18 \
        --checkpoint my_dense.safetensors --epochs 5 --out runs/imagefolder
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
from pathlib import Path

import timm
import torch
from timm.data import create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import sigmab_plugin as sb
from sigmab_plugin.baselines.models import load_weights
from sigmab_plugin.finetune import evaluate


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    ap.add_argument("--model", default="resnet18", help="a timm model name")
    ap.add_argument("--checkpoint", default=None, help="dense weights (local .safetensors/.pth) to start from")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--calib-size", type=int, default=256, help="training images used to branch")
    ap.add_argument("--amp", choices=["bf16"], default=None, help="autocast (CPU or GPU)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/imagefolder")
    return ap.parse_args(argv)


def make_optimizer(model, lr: float, weight_decay: float = 5e-4):
    """timm's SGD (no weight decay on biases and norm layers) with the tree's per-level learning rate: each node's
    layers at lr x (nodes of its level), as ``compare_baselines`` trains (``FinetuneConfig.node_lr_scale``)."""
    return create_optimizer_v2(model, opt="sgd", lr=lr, weight_decay=weight_decay, momentum=0.9,
                               param_group_fn=lambda m: sb.node_param_groups(m, lr, weight_decay, exclude_1d=True))


def main(argv=None) -> dict:
    a = parse(argv)
    size = (3, a.img_size, a.img_size)
    train_set = ImageFolder(Path(a.data) / "train", create_transform(size, is_training=True))
    val_set = ImageFolder(Path(a.data) / "val", create_transform(size, is_training=False))
    calib_set = ImageFolder(Path(a.data) / "train", create_transform(size, is_training=False))
    train = DataLoader(train_set, a.batch_size, shuffle=True, num_workers=a.workers, drop_last=len(train_set) > a.batch_size)
    val = DataLoader(val_set, a.batch_size, num_workers=a.workers)

    model = timm.create_model(a.model, num_classes=len(train_set.classes))
    if a.checkpoint:
        load_weights(model, a.checkpoint)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the dense model distils into every path
    calib = torch.stack([calib_set[i][0] for i in torch.randperm(len(calib_set))[:a.calib_size].tolist()])
    sb.branch(model, depth=a.depth, calib_data=calib, keep_ratio=a.keep_ratio)
    print(sb.summary(model))

    optimizer = make_optimizer(model, a.lr)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=a.epochs, warmup_epochs=0)
    loss_cfg = sb.LossConfig()
    autocast = (lambda: torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", torch.bfloat16)) \
        if a.amp else contextlib.nullcontext
    history = []
    steps = a.epochs * len(train)
    for epoch in range(a.epochs):
        model.train()
        for i, (x, y) in enumerate(train):
            # router temperature 1 -> 0.1, annealed per batch (a short run must still start soft)
            sb.set_routing(model, "soft", temperature=sb.temperature_at(epoch * len(train) + i, steps))
            with autocast():
                out = model(x)
                with torch.no_grad():
                    t_out = teacher(x)
                loss, parts = sb.tree_loss(model, out, y, teacher_logits=t_out, config=loss_cfg)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step(epoch + 1)
        result = evaluate(model, val)  # hard routing: the deployed behaviour
        history.append({"epoch": epoch + 1, **parts, **result})
        print(json.dumps(history[-1]))
    sb.set_routing(model, "auto")
    sb.save_branched(model, Path(a.out) / "tree")
    (Path(a.out) / "history.json").write_text(json.dumps(history, indent=1))
    return {"history": history, "report": sb.param_report(model)}


if __name__ == "__main__":
    main()
