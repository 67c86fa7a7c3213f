"""Shared helpers of the benchmark scripts: machine description (``baselines.provenance``), MAC counting and
timing."""
from __future__ import annotations

import json
import time
from typing import Callable, Tuple

import torch
from torch import nn

from sigmab_plugin.baselines.provenance import machine  # noqa: F401  (re-exported: every benchmark imports it from here)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the conv/linear layers that run on ``x`` (per batch)."""
    total, handles = [0], []

    def hook(m, inp, out):
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            k = m.weight[0].numel()  # in/groups x kernel
            total[0] += out.numel() * k
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def time_call(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def load_run_tree(run: str) -> Tuple[nn.Module, object, dict]:
    """The SigmaB tree a finished harness run saved (``compare_baselines.py --out RUN``), in eval mode, with the run's
    data set and config: ``(tree, dataset, config)``."""
    import sigmab_plugin as sb
    from sigmab_plugin.baselines.data import load_dataset
    from sigmab_plugin.baselines.models import create_model

    cfg = json.load(open(f"{run}/results.json"))["config"]
    ds = load_dataset(cfg["data"], cfg["data_root"], seed=cfg["seed"])
    base = create_model(cfg["model"], ds.num_classes, None, cfg["shortcut"], **cfg.get("model_kwargs", {}))
    return sb.load_branched(base, f"{run}/sigmab/tree").eval(), ds, cfg
