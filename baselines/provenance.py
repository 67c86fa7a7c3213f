"""Where a result came from: the machine, the software and the commit, recorded next to every result file."""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
import sys

import torch

from ..allocator import freed_memory_kept


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "gpu": gpu, "python": sys.version.split()[0],
            "torch": torch.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(), "freed_memory_kept": freed_memory_kept()}  # speeds depend on it (allocator.py)


def _commit() -> str:
    if os.environ.get("SIGMAB_COMMIT"):  # a copy without .git (e.g. a lent GPU machine)
        return os.environ["SIGMAB_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True).returncode == 1
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")  # tracked files changed since the commit ran too


def state_fingerprint(module: torch.nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over ``module``'s state_dict (names, shapes, dtypes and values): which
    dense model a result started from, whatever path its checkpoint was loaded from (a pretraining rerun writes
    another model to the same path), so a report never compares rows that started from different models."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
