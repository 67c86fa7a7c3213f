"""Train/eval flags kept per module across a temporary switch (``model.train(flag)`` would reset them all,
losing e.g. the BatchNorm layers ``freeze_batchnorm`` put in eval mode)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def kept_train_flags(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` gets its own train/eval flag back on exit, however the block ends."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
