"""Models the harness can build: CIFAR ResNets (adapters) and any timm model, from a local checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..adapters.cifar_resnet import DEPTHS, cifar_resnet, load_checkpoint

CIFAR_MODELS = {f"resnet{d}": d for d in DEPTHS}


def create_model(name: str, num_classes: int, checkpoint: Optional[str] = None, shortcut: str = "A",
                 **kwargs) -> nn.Module:
    """``resnet20/32/44/56`` are CIFAR ResNets (``shortcut`` A or B); other names are timm models
    (including ``pointnet2_ssg``/``pointnet2_msg``), built with ``kwargs`` (e.g. ``width``)."""
    if name in CIFAR_MODELS:
        if kwargs:
            raise ValueError(f"{name} takes no model options, got {kwargs}: options such as --width apply to "
                             "timm models (e.g. pointnet2_ssg); drop them for a CIFAR ResNet")
        model = cifar_resnet(CIFAR_MODELS[name], num_classes, shortcut)
        if checkpoint:
            load_checkpoint(model, checkpoint)
        return model
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; choose {sorted(CIFAR_MODELS)} (CIFAR ResNets) or a timm "
                         "model name (timm.list_models())")
    model = timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def load_weights(model: nn.Module, checkpoint) -> nn.Module:
    """Load a local ``.safetensors`` or torch checkpoint (a state dict, or one under 'state_dict'/'model')."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    model.load_state_dict(state)
    return model


def classifier_name(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, m in model.named_modules():
        if m is head:
            return name
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1]
