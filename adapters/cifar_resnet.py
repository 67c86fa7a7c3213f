"""CIFAR ResNet-20/32/44/56 (He et al., CVPR 2016, section 4.2), loadable from the public checkpoints.

Three stages of 16/32/64 channels of basic blocks. Shortcut option "A" (akamaster's CIFAR-10
release: stride-2 subsampling plus zero-padded new channels, no parameters; classifier ``linear``)
or option "B" (chenyaofo's CIFAR-100 release: 1x1 conv + BN on the downsampling blocks; classifier
``fc``). The stem's ReLU is a module and ``feature_info`` lists the stages, timm-style, so
``sigmab_plugin.branch`` finds split points as it does for timm models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from sigmab_plugin import register_pruner

DEPTHS = (20, 32, 44, 56)
CIFAR10_MEAN, CIFAR10_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # akamaster's normalisation
CIFAR100_MEAN, CIFAR100_STD = (0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels equally on both sides.

    Written as an explicit channel map (output channel ``dst[i]`` = input channel ``src[i]``, all
    others zero) so that channel pruning can edit it: ``PadShortcutPruner`` teaches Torch-Pruning's
    DependencyGraph to prune through it (a plain ``F.pad`` on channels is mis-traced by Torch-Pruning).
    """

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        pad = planes // 4
        self.in_channels, self.out_channels = in_planes, planes
        self.register_buffer("src", torch.arange(in_planes), persistent=False)
        self.register_buffer("dst", torch.arange(in_planes) + pad, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        out = x.new_zeros((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        return out.index_copy(1, self.dst, x.index_select(1, self.src))


class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner of ``PadShortcut``: input and output channels are pruned independently."""

    def prune_out_channels(self, layer: PadShortcut, idxs):
        pos = {o: i for i, o in enumerate(sorted(set(range(layer.out_channels)) - set(idxs)))}
        pairs = [(pos[d], s) for d, s in zip(layer.dst.tolist(), layer.src.tolist()) if d in pos]
        return self._set(layer, pairs, layer.in_channels, len(pos))

    def prune_in_channels(self, layer: PadShortcut, idxs):
        pos = {c: i for i, c in enumerate(sorted(set(range(layer.in_channels)) - set(idxs)))}
        pairs = [(d, pos[s]) for d, s in zip(layer.dst.tolist(), layer.src.tolist()) if s in pos]
        return self._set(layer, pairs, len(pos), layer.out_channels)

    @staticmethod
    def _set(layer: PadShortcut, pairs, n_in: int, n_out: int) -> PadShortcut:
        device = layer.src.device
        layer.dst = torch.tensor([d for d, _ in pairs], dtype=torch.long, device=device)
        layer.src = torch.tensor([s for _, s in pairs], dtype=torch.long, device=device)
        layer.in_channels, layer.out_channels = n_in, n_out
        return layer

    def get_out_channels(self, layer: PadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: PadShortcut) -> int:
        return layer.in_channels


register_pruner(PadShortcut, PadShortcutPruner())


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = PadShortcut(in_planes, planes) if shortcut == "A" else nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int = 56, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"CIFAR ResNet depth {depth} is not supported; choose one of {DEPTHS}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is unknown; use 'A' (zero-pad) or 'B' (1x1 conv)")
        n = (depth - 2) // 6
        self.depth, self.shortcut = depth, shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU()
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(planes, width, 2 if (b == 0 and i > 0) else 1, shortcut))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_name = "linear" if shortcut == "A" else "fc"
        setattr(self, self.head_name, nn.Linear(64, num_classes))
        self.feature_info = [dict(module="act1", num_chs=16, reduction=1),
                             dict(module="layer1", num_chs=16, reduction=1),
                             dict(module="layer2", num_chs=32, reduction=2),
                             dict(module="layer3", num_chs=64, reduction=4)]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def cifar_resnet(depth: int = 56, num_classes: int = 10, shortcut: str = "A",
                 checkpoint: Union[str, Path, None] = None) -> CifarResNet:
    """Build a CIFAR ResNet and, if ``checkpoint`` is given, load it (either public format)."""
    model = CifarResNet(depth, num_classes, shortcut)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _register_with_timm() -> None:
    """``timm.create_model("cifar_resnet56", num_classes=10)`` (option A) and ``"cifar_resnet56_b"`` (option B)."""
    from timm.models import register_model

    for depth in DEPTHS:
        for shortcut, suffix in (("A", ""), ("B", "_b")):
            def entry(pretrained: bool = False, num_classes: int = 10, depth=depth, shortcut=shortcut, **kwargs):
                if pretrained:
                    raise ValueError("CIFAR ResNets have no downloadable weights here: create the model, then "
                                     "sigmab_plugin.adapters.cifar_resnet.load_checkpoint(model, path)")
                kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and v is not None}
                if kwargs:
                    raise TypeError(f"cifar_resnet{depth}{suffix} takes num_classes only, got {sorted(kwargs)}")
                return CifarResNet(depth, num_classes, shortcut)
            entry.__name__ = entry.__qualname__ = f"cifar_resnet{depth}{suffix}"
            entry.__module__ = __name__
            globals()[entry.__name__] = entry
            register_model(entry)


_register_with_timm()


def load_checkpoint(model: CifarResNet, path: Union[str, Path]) -> CifarResNet:
    """Load akamaster's ``{'state_dict': {'module.…'}}``, a plain state dict, or a training checkpoint of
    :func:`sigmab_plugin.finetune` (its weights under ``'model'``, e.g. the harness's pretraining step),
    strictly (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; the public CIFAR ResNet weights are expected "
                                "there (see ../shared/data/README.md)")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(raw).__name__}, not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit CifarResNet-{model.depth} (shortcut {model.shortcut}, "
                         f"{model.get_classifier().out_features} classes): missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; pick the matching depth/shortcut/num_classes")
    shapes = [k for k, v in state.items() if own[k].shape != v.shape]
    if shapes:
        raise ValueError(f"{path}: shape mismatch for {shapes[:4]}; pick the matching depth/num_classes")
    model.load_state_dict(state, strict=False)
    return model
