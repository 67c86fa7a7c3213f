"""Hard-routed evaluation (the deployed behaviour) of any model, with a tree's per-leaf diagnostics."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .routing import forward_leaf, is_branched, tree_state


def _eval_batches(data, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple):
        images, labels = data
        for i in range(0, len(labels), batch_size):
            yield images[i:i + batch_size], labels[i:i + batch_size]
    else:
        for item in data:
            yield item[0], item[1]


@torch.no_grad()
def evaluate(model: nn.Module, images, labels=None, normalize: Optional[Callable] = None,
             batch_size: int = 256, diagnostics: bool = False) -> Dict[str, object]:
    """Top-1 (and mean per-class top-1) with hard routing (``images, labels`` in memory, or ``images`` a
    loader of ``(x, y)``).

    For a tree it also gives the leaf histogram; with ``diagnostics`` each leaf's top-1 on every
    input and on the inputs routed to it, the best single leaf, the oracle (a sample counts when
    any leaf is right) and the *conditional gain* (routed top-1 minus the best single leaf).
    """
    data = (images, labels) if labels is not None else images
    norm = normalize or (lambda t: t)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    tree = is_branched(model)
    n_leaves = 2 ** tree_state(model).depth if tree else 0
    correct, seen, hist = 0, 0, torch.zeros(n_leaves, dtype=torch.long)
    leaf_all = torch.zeros(n_leaves, dtype=torch.long)
    leaf_routed = torch.zeros(n_leaves, dtype=torch.long)
    oracle = 0
    per_class: Dict[int, list] = {}
    saved_mode = tree_state(model).mode if tree else None
    if tree:
        tree_state(model).mode = "hard"
    try:
        for xb, yb in _eval_batches(data, batch_size):
            x, y = norm(xb.to(device)), yb.to(device)
            pred = model(x).argmax(1)
            right = pred == y
            correct += int(right.sum())
            seen += len(y)
            for c in y.unique().tolist():
                tally = per_class.setdefault(c, [0, 0])
                tally[0] += int(right[y == c].sum())
                tally[1] += int((y == c).sum())
            if not tree:
                continue
            leaves = tree_state(model).last_leaves
            hist += torch.bincount(leaves.cpu(), minlength=n_leaves)
            if diagnostics:
                any_right = torch.zeros_like(y, dtype=torch.bool)
                for leaf in range(n_leaves):
                    right = forward_leaf(model, x, leaf).argmax(1) == y
                    any_right |= right
                    leaf_all[leaf] += int(right.sum())
                    leaf_routed[leaf] += int(right[leaves == leaf].sum())
                oracle += int(any_right.sum())
    finally:
        model.train(was)
        if tree:
            tree_state(model).mode = saved_mode
    result: Dict[str, object] = {"top1": correct / max(1, seen),
                                 "mean_class_top1": sum(a / n for a, n in per_class.values()) / max(1, len(per_class))}
    if tree:
        result["leaf_histogram"] = hist.tolist()
    if tree and diagnostics:
        n = max(1, seen)
        result["leaf_top1_all"] = (leaf_all.double() / n).tolist()
        result["leaf_top1_routed"] = [float(c) / max(1, int(h)) for c, h in zip(leaf_routed, hist)]
        result["best_leaf_top1"] = max(result["leaf_top1_all"])
        result["oracle_top1"] = oracle / n
        result["conditional_gain"] = result["top1"] - result["best_leaf_top1"]
    return result
