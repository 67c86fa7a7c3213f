"""Tiny models of every covered family, realistic weights, and the masked-dense reference."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch_pruning as tp
from torch import nn

from sigmab_plugin.adapters.cifar_resnet import cifar_resnet
from sigmab_plugin import registered_pruners

warnings.filterwarnings("ignore")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

FAMILIES = {
    "resnet": lambda: timm.create_model("resnet18", num_classes=10),
    "resnext": lambda: timm.create_model("resnext26ts", num_classes=10),
    "regnet": lambda: timm.create_model("regnetx_002", num_classes=10),
    "convnext": lambda: timm.create_model("convnext_atto", num_classes=10),
    "efficientnet": lambda: timm.create_model("efficientnet_b0", num_classes=10),
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", num_classes=10),
    "cifar_resnet_a": lambda: cifar_resnet(20, 10, "A"),
    "cifar_resnet_b": lambda: cifar_resnet(20, 10, "B"),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms and layer scales non-trivial values (timm zero-inits some of them), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def make_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize(FAMILIES[family]())


def node_levels(model: nn.Module) -> dict:
    """Parameter name -> number of nodes of its level (1: shared layers and routers), read from the module
    names alone (independent of ``node_param_groups``)."""
    from sigmab_plugin.routing import RoutedModule
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, RoutedModule):
            for i, v in enumerate(m.variants):
                for pname, _ in v.named_parameters():
                    out[f"{mname}.variants.{i}.{pname}" if mname else f"variants.{i}.{pname}"] = len(m.variants)
    return {n: out.get(n, 1) for n, _ in model.named_parameters()}


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def masked_dense(dense: nn.Module, tree: nn.Module, leaf: int) -> nn.Module:
    """The dense model with every channel pruned on ``leaf``'s path zeroed where it is read.

    Built with Torch-Pruning directly: for each planned group of each node on the path, the group's
    in-channel consumers (conv/linear inside that node's level) get their removed inputs zeroed.
    """
    spec = tree._sigmab_tree.spec
    depth = len(spec["levels"])
    model = copy.deepcopy(dense).eval()
    probe = copy.deepcopy(dense).eval()
    example = torch.zeros(2, *spec["input_shape"])
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(probe, example_inputs=example, verbose=False,
                                                   customized_pruners=registered_pruners())
    names = {m: n for n, m in probe.named_modules()}
    masks = {}
    for level in range(1, depth + 1):
        node = leaf >> (depth - level)
        units = spec["levels"][level - 1]
        for key, kept in spec["plan"].get(f"{level}/{node}", {}).items():
            root = probe.get_submodule(key)
            n = dg.get_out_channels(root)
            removed = sorted(set(range(n)) - set(kept))
            if not removed:
                continue
            group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, removed)
            for item in group.items:
                mod = item.dep.target.module
                name = names.get(mod)
                if (name is None or not dg.is_in_channel_pruning_fn(item.dep.handler)
                        or not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear, *registered_pruners()))
                        or not any(name == u or name.startswith(u + ".") for u in units)):
                    continue
                masks.setdefault(name, set()).update(item.idxs)
    for name, idxs in masks.items():
        mod = model.get_submodule(name)
        idx = torch.tensor(sorted(idxs))
        last = isinstance(mod, nn.Linear)

        def hook(_m, inp, idx=idx, last=last):
            x = inp[0].clone()
            if last:
                x[..., idx] = 0
            else:
                x[:, idx] = 0
            return (x,) + tuple(inp[1:])
        mod.register_forward_pre_hook(hook)
    return model


def modules_run(model: nn.Module, call) -> set:
    """The modules of ``model`` whose forward ran during ``call()``."""
    ran, handles = set(), []
    for m in model.modules():
        handles.append(m.register_forward_hook(lambda mod, _i, _o: ran.add(mod)))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return ran


def modules_run_params(model: nn.Module, x: torch.Tensor) -> int:
    """Independent active count: parameters owned directly by the modules that ran on ``x``."""
    return sum(p.numel() for m in modules_run(model, lambda: model(x)) for p in m.parameters(recurse=False))


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (real data and weights) is not present")
    return SHARED


def option_value(cmd: list, flag: str) -> list:
    """The words after ``flag`` in a printed command line (split on spaces) up to the next option."""
    i = cmd.index(flag) + 1
    j = next((k for k in range(i, len(cmd)) if cmd[k].startswith("--")), len(cmd))
    return cmd[i:j]


def write_point_npz(folder: Path, train: int = 32, test: int = 16, points: int = 1024) -> None:
    """A four-class stand-in for modelnet40-1024.npz: each class an ellipsoid of its own proportions."""
    import numpy as np
    rng = np.random.default_rng(0)
    axes = np.array([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0], [1.0, 1.0, 0.2]])

    def clouds(n):
        labels = np.arange(n) % 4
        return (rng.normal(size=(n, points, 3)) * axes[labels][:, None]).astype(np.float32), labels
    folder.mkdir(parents=True)
    (trp, trl), (tep, tel) = clouds(train), clouds(test)
    np.savez(folder / "modelnet40-1024.npz", train_points=trp, train_labels=trl, test_points=tep, test_labels=tel,
             classes=np.array(["a", "b", "c", "d"]))
