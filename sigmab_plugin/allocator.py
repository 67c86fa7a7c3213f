"""Keep the memory a CPU training process frees, instead of handing it back to the kernel at every step.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed. PointNet++ allocates grouped neighbourhoods of 100+ MiB in every training step, so every
step pays one page fault per 4 KiB of memory it had a moment before. Measured on this project's 2-core VM (``benchmarks/results/allocator_speed.md``): PointNet++ SSG
(width 0.25) training steps at batch 32 ran 4.9x faster (dense) and 3.6x (its SigmaB tree), system time fell
from as much as the user time to 2 s, and the CIFAR ResNet-20 (small tensors) gained 5%. The cost: the process
holds on to its peak memory (+0.5-0.6 GiB there; its resident size does not shrink after a large step).

Opt-in, process-wide (``mallopt``), for command-line tools: a library never changes its caller's allocator on
import. ``examples/compare_baselines.py`` applies it unless ``--no-keep-freed-memory``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_STATE = {"applied": False}


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap (``M_MMAP_MAX`` 0) and never trim the heap
    (``M_TRIM_THRESHOLD`` at its maximum), so memory freed by one training step is reused by the next without page
    faults. Applies to the allocations made after the call, in this process and the processes it forks. True when
    applied; False (nothing changed) where the C library is not glibc (macOS, Windows, musl)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    _STATE["applied"] = _STATE["applied"] or ok
    return ok


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process (results record it beside their speeds)."""
    return _STATE["applied"]
