"""Progress reporting: a tqdm bar on a terminal, a line every 30 s otherwise (logs stay readable)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional


def progress(iterable: Iterable, enabled: bool, desc: str, total: Optional[int] = None) -> Iterable:
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)
    return _lines(iterable, desc, total)


def _lines(iterable: Iterable, desc: str, total: Optional[int], every: float = 30.0) -> Iterator:
    start = last = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every:
            last = now
            of = f"/{total}" if total else ""
            print(f"[sigmab] {desc}: {i}{of} ({now - start:.0f}s)", file=sys.stderr, flush=True)
