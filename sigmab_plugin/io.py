"""Save and load a SigmaB tree: a JSON spec plus safetensors weights, no pickle.

``load_branched`` re-applies the spec (split points, units, every node's keep-sets) to a fresh dense
model of the same architecture and then loads the weights, the way PEFT adapters are reloaded. The
spec records the format version and the SHA-256 of the weights file it was saved with; everything
is checked (version, digest, tensor names and shapes) before the model is touched, and files are
written under temporary names and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._assemble import rebuild_tree, swap_in
from .branch import SPEC_FORMAT, _restore_flags
from .routing import attach, detach, is_branched, tree_state

SPEC_FILE = "sigmab_spec.json"
WEIGHTS_FILE = "model.safetensors"
SPEC_VERSION = 2  # 2: weights digest and routing settings recorded
READABLE_VERSIONS = (1, 2)
_REQUIRED = ("format", "version", "model", "config", "split_points", "levels", "classifier", "consumers", "widths",
             "input_shape", "dense_params", "plan")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_branched(model: nn.Module, directory) -> Path:
    """Write ``sigmab_spec.json`` and ``model.safetensors`` for a branched ``model`` into ``directory``.

    A folder that already holds a ``model.safetensors`` is only overwritten when it is a SigmaB save
    (its spec is there); anything else of the user's is refused, not replaced.
    """
    state = tree_state(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file: save_branched needs a folder path (it writes "
                                 f"{SPEC_FILE} and {WEIGHTS_FILE} into it)")
    if (directory / WEIGHTS_FILE).exists() and not _is_sigmab_save(directory):
        raise FileExistsError(f"{directory / WEIGHTS_FILE} exists and is not a SigmaB save: choose an empty or new "
                              "folder (nothing was written)")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_weights, tmp_spec = directory / (WEIGHTS_FILE + ".tmp"), directory / (SPEC_FILE + ".tmp")
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": SPEC_FORMAT})
        spec = {**state.spec, "version": SPEC_VERSION, "routing": state.settings(),
                "weights_sha256": _sha256(tmp_weights)}
        tmp_spec.write_text(json.dumps(spec, indent=1))
        os.replace(tmp_weights, directory / WEIGHTS_FILE)
        os.replace(tmp_spec, directory / SPEC_FILE)
    finally:
        for tmp in (tmp_weights, tmp_spec):
            tmp.unlink(missing_ok=True)
    return directory


def _is_sigmab_save(directory: Path) -> bool:
    try:
        return json.loads((directory / SPEC_FILE).read_text()).get("format") == SPEC_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_spec(directory) -> dict:
    """The validated spec of a ``save_branched`` folder (format, version, keys, weights digest)."""
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {directory} is not a save_branched() folder "
                                    f"(expected {SPEC_FILE} and {WEIGHTS_FILE})")
    try:
        spec = json.loads(spec_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{spec_path} is not valid JSON ({err}): the folder is damaged; save the tree again") from err
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"{spec_path} has format {found!r}, expected {SPEC_FORMAT!r}")
    if spec.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{spec_path} has spec version {spec.get('version')!r}; this release reads versions "
                         f"{READABLE_VERSIONS}: load it with the sigmab-plugin release that saved it")
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"{spec_path} misses {missing}: the spec is incomplete; save the tree again")
    digest = spec.get("weights_sha256")
    if digest is not None and digest != _sha256(weights_path):
        raise ValueError(f"{weights_path} is not the weights file this spec was saved with (SHA-256 differs): "
                         "keep each tree's spec and weights together")
    return spec


def _expected_state(base_model: nn.Module, routed: Dict[str, nn.Module]) -> Dict[str, torch.Size]:
    """Names and shapes of the branched model's state dict, computed without touching ``base_model``."""
    shapes = {}
    for k, v in base_model.state_dict().items():
        if not any(k == u or k.startswith(u + ".") for u in routed):
            shapes[k] = v.shape
    for u, module in routed.items():
        shapes.update({f"{u}.{k}": v.shape for k, v in module.state_dict().items()})
    return shapes


def load_branched(base_model: nn.Module, directory, *, forward_fn: Optional[Callable] = None) -> nn.Module:
    """Rebuild a saved tree on ``base_model`` (a fresh dense model of the same architecture), in place.
    ``forward_fn``: as in :func:`sigmab_plugin.branch`, for models that ``model(x)`` does not run.

    Everything is checked before ``base_model`` changes; on any error it is left as it was.
    """
    directory = Path(directory)
    spec = read_spec(directory)
    if is_branched(base_model):
        raise ValueError("base_model is already branched; pass a fresh dense model")
    dense = sum(p.numel() for p in base_model.parameters())
    if dense != spec["dense_params"] or type(base_model).__name__ != spec["model"]:
        raise ValueError(f"base_model is {type(base_model).__name__} with {dense:,} params but the tree was saved "
                         f"from {spec['model']} with {spec['dense_params']:,}: build the same architecture")
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{directory / WEIGHTS_FILE} cannot be read ({err}): the file is damaged or truncated; "
                         "save the tree again") from err
    try:
        routed, state = rebuild_tree(base_model, spec, forward_fn)
    except (RuntimeError, ValueError, IndexError, KeyError) as err:
        raise ValueError(f"the spec in {directory} does not fit {type(base_model).__name__} ({err}): it was saved "
                         "from another architecture or has been edited") from err
    expected = _expected_state(base_model, routed)
    given = {k: v.shape for k, v in tensors.items()}
    # version-1 saves had no balance offsets and did not store the channel index buffers
    legacy = {k for k in expected if k.endswith((".balance", ".in_idx", ".out_idx"))} - set(given)
    if spec["version"] == 1:
        expected = {k: v for k, v in expected.items() if k not in legacy}
    if expected != given:
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match the tree of its spec: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}; the model was not changed")
    flags = {name: m.training for name, m in base_model.named_modules()}
    originals = swap_in(base_model, routed)
    try:
        attach(base_model, state)
        base_model.load_state_dict(tensors, strict=spec["version"] != 1)
    except Exception:
        swap_in(base_model, originals)
        detach(base_model)
        raise
    finally:
        _restore_flags(base_model, flags)
    return base_model
