"""Deploy one path: a SigmaB tree's root-to-leaf path as a plain ``nn.Module``, and a deployment folder
that a device loads node by node.

``export_path(model, leaf)`` copies the model with every routed unit replaced by that leaf's node
copy of the unit: channel widths stay pruned end to end, and where one unit's kept output channels
are the next unit's kept input channels the scatter to dense width and the gather back are dropped;
no routing state is left, so the result goes through ``torch.export`` (and ONNX). It equals the
hard-routed tree on the inputs the tree routes to ``leaf``.

``export_deployment(model, dir)`` writes the parameters outside the routed units with the routers
(``backbone.safetensors``), one file per tree node (``node_<level>_<j>.safetensors``) and a JSON
manifest naming each path's files. ``load_deployment(dir, base_model)`` rebuilds the tree with its
nodes unloaded and loads a node's file only when an input is routed to it (a device then holds the
backbone plus the nodes of the paths in use; ``max_paths`` bounds how many stay loaded).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._assemble import swap_in
from .routing import PathBatchNorm, RoutedModule, detach, tree_state

MANIFEST = "deployment.json"


class ChannelGather(nn.Module):
    """Keep the listed channels (dim 1) of a tensor."""

    def __init__(self, idx: torch.Tensor):
        super().__init__()
        self.register_buffer("idx", idx.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.idx)


class ChannelScatter(nn.Module):
    """Place the channels of a tensor at the listed positions of a zero tensor of ``width`` channels."""

    def __init__(self, idx: torch.Tensor, width: int):
        super().__init__()
        self.register_buffer("idx", idx.clone())
        self.width = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((x.shape[0], self.width) + tuple(x.shape[2:]))
        return out.index_copy(1, self.idx, x)


def _plain_batchnorm(module: nn.Module) -> nn.Module:
    """Node BatchNorms back to the torch classes they came from (same tensors, eval behaviour)."""
    for m in module.modules():
        if isinstance(m, PathBatchNorm):
            m.__class__ = next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn")
                               and issubclass(c, nn.modules.batchnorm._BatchNorm) and c is not PathBatchNorm)
    return module


def _path_units(model: nn.Module, leaf: int) -> List[tuple]:
    """(unit name, node variant) along ``leaf``'s path, in forward order."""
    state = tree_state(model)
    n = 2 ** state.depth
    if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf < n:
        raise ValueError(f"leaf={leaf!r} is not a leaf of this depth-{state.depth} tree: use 0..{n - 1}")
    units = [u for level in state.spec["levels"] for u in level]
    out = []
    for u in units:
        routed = model.get_submodule(u)
        out.append((u, routed.variants[leaf >> (state.depth - routed.level)]))
    return out


def export_path(model: nn.Module, leaf: int) -> nn.Module:
    """A plain copy of ``model`` that runs only ``leaf``'s path (see the module docstring)."""
    path = _path_units(model, leaf)
    plain = copy.deepcopy(model)
    detach(plain)
    replaced: Dict[str, nn.Module] = {}
    prev_out: Optional[torch.Tensor] = None
    for i, (name, variant) in enumerate(path):
        layers: List[nn.Module] = []
        in_idx, out_idx = variant.in_idx, variant.out_idx
        if in_idx is not None:
            if prev_out is not None and torch.equal(prev_out, in_idx):
                pass  # the previous unit already hands over exactly these channels
            elif prev_out is not None and bool(torch.isin(in_idx, prev_out).all()):
                pos = torch.searchsorted(prev_out, in_idx)  # both sorted: positions within the kept set
                layers.append(ChannelGather(pos))
            else:
                if prev_out is not None:
                    layers = [ChannelScatter(prev_out, path[i - 1][1].out_width)]
                layers.append(ChannelGather(in_idx))
        elif prev_out is not None:
            layers.append(ChannelScatter(prev_out, path[i - 1][1].out_width))
        layers.append(_plain_batchnorm(copy.deepcopy(variant.module)))
        nxt = path[i + 1][1].in_idx if i + 1 < len(path) else None
        keep_narrow = out_idx is not None and nxt is not None and bool(torch.isin(nxt, out_idx).all())
        if out_idx is not None and not keep_narrow:
            layers.append(ChannelScatter(out_idx, variant.out_width))
            prev_out = None
        else:
            prev_out = out_idx
        replaced[name] = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    swap_in(plain, replaced)
    return plain.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_deployment(model: nn.Module, directory) -> Path:
    """Write the backbone (with routers), one file per node and a manifest into ``directory``."""
    state = tree_state(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file: give a folder for the deployment")
    if directory.exists() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise FileExistsError(f"{directory} is not empty and holds no {MANIFEST}: choose an empty or new folder")
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    files: Dict[str, Dict[str, torch.Tensor]] = {"backbone.safetensors": {}}
    for name, unit in model.named_modules():
        if not isinstance(unit, RoutedModule):
            continue
        for j in range(len(unit.variants)):
            prefix = f"{name}.variants.{j}."
            part = files.setdefault(f"node_{unit.level}_{j}.safetensors", {})
            part.update({k: v for k, v in sd.items() if k.startswith(prefix)})
    in_nodes = {k for part in files.values() for k in part}
    files["backbone.safetensors"] = {k: v for k, v in sd.items() if k not in in_nodes}
    digests = {}
    for fname, tensors in files.items():
        tmp = directory / (fname + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / fname)
        digests[fname] = _sha256(directory / fname)
    depth = state.depth
    paths = {str(leaf): ["backbone.safetensors"] + [f"node_{l}_{leaf >> (depth - l)}.safetensors"
                                                    for l in range(1, depth + 1)] for leaf in range(2 ** depth)}
    manifest = {"format": "sigmab-deployment", "version": 1, "spec": {**state.spec, "routing": state.settings()},
                "files": digests, "paths": paths,
                "bytes": {f: (directory / f).stat().st_size for f in files}}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, directory / MANIFEST)
    return directory


class _NodeLoader:
    """Loads a node's weights from its file the first time an input is routed to it."""

    def __init__(self, directory: Path, manifest: dict, units: Dict[int, List[tuple]], max_paths: Optional[int],
                 device: torch.device):
        self.directory, self.manifest, self.units, self.max_paths = directory, manifest, units, max_paths
        self.device = device
        self.loaded: Dict[int, List[int]] = {}  # level -> loaded node ids, most recent last
        self.opened: List[str] = []  # files read, in order (what a device would fetch)
        self.forward, self.in_use = None, set()  # nodes the current forward needs are never evicted

    def __call__(self, level: int, node: int, forward: object = None) -> None:
        if forward is not self.forward:
            self.forward, self.in_use = forward, set()
        self.in_use.add((level, node))
        held = self.loaded.setdefault(level, [])
        if node in held:
            held.remove(node)
            held.append(node)
            return
        if self.max_paths is not None:
            evictable = [j for j in held if (level, j) not in self.in_use]
            while evictable and len(held) >= self.max_paths:
                j = evictable.pop(0)
                held.remove(j)
                self._unload(level, j)
        fname = f"node_{level}_{node}.safetensors"
        path = self.directory / fname
        if _sha256(path) != self.manifest["files"][fname]:
            raise ValueError(f"{path} is not the file this deployment was written with (SHA-256 differs)")
        tensors = load_file(str(path))
        self.opened.append(fname)
        for unit_name, unit in self.units[level]:
            variant = unit.variants[node]
            prefix = f"{unit_name}.variants.{node}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            variant.to_empty(device=self.device)
            variant.load_state_dict(own)
        held.append(node)

    def _unload(self, level: int, node: int) -> None:
        for _, unit in self.units[level]:
            unit.variants[node].to("meta")


def load_deployment(directory, base_model: nn.Module, max_paths: Optional[int] = 1, *,
                    forward_fn: Optional[Callable] = None) -> nn.Module:
    """Rebuild the tree of ``directory`` on ``base_model`` (a fresh dense model) with every node unloaded;
    nodes load from their files when an input is routed to them. ``model.sigmab_loader.opened`` lists
    the files read. ``forward_fn``: as in :func:`sigmab_plugin.branch`."""
    from ._assemble import rebuild_tree
    from .routing import attach

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: {directory} is not an export_deployment() folder")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != "sigmab-deployment" or manifest.get("version") != 1:
        raise ValueError(f"{manifest_path} is not a version-1 SigmaB deployment manifest")
    backbone = directory / "backbone.safetensors"
    if _sha256(backbone) != manifest["files"]["backbone.safetensors"]:
        raise ValueError(f"{backbone} is not the file this deployment was written with (SHA-256 differs)")
    spec = manifest["spec"]
    device = next(base_model.parameters()).device
    routed, state = rebuild_tree(base_model, spec, forward_fn)
    units: Dict[int, List[tuple]] = {}
    for name, unit in routed.items():
        units.setdefault(unit.level, []).append((name, unit))
        for v in unit.variants:
            v.to("meta")  # not held until an input needs the node
    swap_in(base_model, routed)
    attach(base_model, state)
    tensors = load_file(str(backbone), device=str(device))
    missing, unexpected = base_model.load_state_dict(tensors, strict=False)
    if unexpected or any(".variants." not in k for k in missing):
        raise ValueError(f"{backbone} does not fit {type(base_model).__name__}: unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if '.variants.' not in k][:3]}")
    loader = _NodeLoader(directory, manifest, units, max_paths, device)
    state.node_loader = loader
    base_model.sigmab_loader = loader
    return base_model.eval()


__all__ = ["ChannelGather", "ChannelScatter", "export_deployment", "export_path", "load_deployment"]
