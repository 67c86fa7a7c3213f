"""Save and load a SigmaB tree: a JSON spec plus safetensors weights, no pickle.

``load_branched`` re-applies the spec (split points, units, every node's keep-sets) to a fresh dense
model of the same architecture and then loads the weights, the way PEFT adapters are reloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._trace import trace_calls
from .branch import SPEC_FORMAT, _is_branched, build_tree, swap_in
from .routing import CosineRouter, tree_state

SPEC_FILE = "sigmab_spec.json"
WEIGHTS_FILE = "model.safetensors"


def save_branched(model: nn.Module, directory) -> Path:
    """Write ``sigmab_spec.json`` and ``model.safetensors`` for a branched ``model`` into ``directory``."""
    state = tree_state(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for name, data in ((WEIGHTS_FILE, None), (SPEC_FILE, json.dumps(state.spec, indent=1))):
        tmp = directory / (name + ".tmp")
        if data is None:
            save_file(tensors, str(tmp), metadata={"format": SPEC_FORMAT})
        else:
            tmp.write_text(data)
        os.replace(tmp, directory / name)
    return directory


def load_branched(base_model: nn.Module, directory) -> nn.Module:
    """Rebuild a saved tree on ``base_model`` (a fresh dense model of the same architecture), in place."""
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {directory} is not a save_branched() folder "
                                    f"(expected {SPEC_FILE} and {WEIGHTS_FILE})")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{spec_path} has format {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
    if _is_branched(base_model):
        raise ValueError("base_model is already branched; pass a fresh dense model")
    dense = sum(p.numel() for p in base_model.parameters())
    if dense != spec["dense_params"] or type(base_model).__name__ != spec["model"]:
        raise ValueError(f"base_model is {type(base_model).__name__} with {dense:,} params but the tree was saved "
                         f"from {spec['model']} with {spec['dense_params']:,}: build the same architecture")
    device = next(base_model.parameters()).device
    example = torch.zeros(2, *spec["input_shape"], device=device)
    trace = trace_calls(base_model, example)  # router input width = channels at each split point
    routers = [[CosineRouter(torch.zeros(2, trace.width[split]), 1.0).to(device) for _ in range(2 ** l)]
               for l, split in enumerate(spec["split_points"])]
    was_training = base_model.training
    routed, state = build_tree(base_model, spec, example, routers)
    originals = swap_in(base_model, routed)
    try:
        base_model._sigmab_tree = state
        base_model.load_state_dict(load_file(str(weights_path), device=str(device)))
    except Exception:
        swap_in(base_model, originals)
        del base_model._sigmab_tree
        raise
    finally:
        base_model.train(was_training)
    return base_model
