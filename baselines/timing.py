"""Honest latency on shared machines: every model is timed as a ratio to a reference model measured in
the same round, rounds interleaved in a shuffled order, and the spread across rounds is reported.

A single median per model varies about 2x on these machines (other jobs, frequency changes); a ratio
to a reference timed moments apart cancels most of that, and several rounds show what is left.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Dict

import torch


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def latency_ratios(calls: Dict[str, Callable[[], object]], reference: str, rounds: int = 7, repeat: int = 10,
                   warmup: int = 3, seed: int = 0) -> Dict[str, dict]:
    """Per name: median latency (ms) over rounds, and the median, min and max over rounds of its ratio
    to ``reference`` timed in the same round."""
    if reference not in calls:
        raise ValueError(f"reference {reference!r} is not among the timed calls {sorted(calls)}")
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    ms: Dict[str, list] = {k: [] for k in calls}
    ratios: Dict[str, list] = {k: [] for k in calls}
    for _ in range(rounds):
        order = list(calls)
        rng.shuffle(order)
        this = {k: _median_ms(calls[k], repeat) for k in order}
        for k, v in this.items():
            ms[k].append(v)
            ratios[k].append(v / this[reference])
    return {k: {"ms": statistics.median(ms[k]), "ratio": statistics.median(ratios[k]),
                "ratio_min": min(ratios[k]), "ratio_max": max(ratios[k]), "rounds": rounds} for k in calls}
