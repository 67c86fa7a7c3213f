"""The SigmaB training objective, usable from any training loop.

A tree is deployed one path per input, so each leaf must be right on its own. The default objective
is the *expected* per-path loss, ``sum_p P(p|x) * CE(f_p(x), y)`` (soft decision trees, adaptive
neural trees), not the loss of the mixed output, which lets leaves lean on each other (measured on
CIFAR-10: -7 pp once routed hard). Distillation from the dense teacher is applied to every path
(``distill_paths="all"``: each path on every sample, unweighted, or ``"weighted"`` by P(p|x)), and a
load-balance term on the batch-mean leaf probabilities keeps the tree from collapsing into one
leaf. A dense or statically pruned model gets the same cross-entropy and distillation on its
output, which is what makes comparisons fair.

    out = model(x)                                    # soft routing while training
    loss, parts = sigmab_plugin.tree_loss(model, out, y, teacher_logits=teacher(x))
    loss.backward()
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .routing import is_branched, tree_state

OBJECTIVES = ("expected", "mixture")
DISTILL_PATHS = ("all", "weighted")


def _number(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (value > lo if lo_open else value >= lo) or value > hi:
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi < math.inf else "")
        raise ValueError(f"{name}={value!r} is invalid: use a finite number {bound}")


@dataclass
class LossConfig:
    """Terms of the SigmaB training loss (see the module docstring)."""

    objective: str = field(default="expected", metadata={"help": "expected per-path loss, or CE of the mixture"})
    balance_weight: float = field(default=2.0, metadata={"help": "weight of the leaf load-balance term"})
    distill_weight: float = field(default=1.0, metadata={"help": "weight of distillation (used when a teacher is given)"})
    distill_temperature: float = field(default=4.0, metadata={"help": "softmax temperature of distillation"})
    distill_paths: str = field(default="all", metadata={"help": "'all': every path distilled unweighted; 'weighted'"})
    decisive_weight: float = field(default=0.0, metadata={"help": "weight of the mean per-sample leaf entropy"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is unknown; choose one of {OBJECTIVES}")
        if self.distill_paths not in DISTILL_PATHS:
            raise ValueError(f"distill_paths={self.distill_paths!r} is unknown; choose one of {DISTILL_PATHS}")
        _number("balance_weight", self.balance_weight, 0)
        _number("decisive_weight", self.decisive_weight, 0)
        _number("distill_weight", self.distill_weight, 0)
        _number("distill_temperature", self.distill_temperature, 0, lo_open=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def leaf_balance(leaf_probs: torch.Tensor) -> torch.Tensor:
    """``L * sum(q**2) - 1`` for the batch-mean leaf distribution q: 0 when uniform, L-1 when collapsed."""
    q = leaf_probs.mean(0)
    return q.numel() * (q * q).sum() - 1.0


def leaf_entropy(leaf_probs: torch.Tensor) -> torch.Tensor:
    """Mean per-sample entropy (nats) of the leaf distribution: 0 when every sample commits to one leaf.

    The balance term alone is also met by routers that hedge (every sample near 1/L on each leaf, so the
    mass is balanced while the hard decisions are not); penalising this entropy as well makes the
    balance hold for the decisions (balance + decisiveness: the mutual information of input and leaf)."""
    p = leaf_probs.clamp_min(1e-12)
    return -(leaf_probs * p.log()).sum(1).mean()


def _kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Per-row KL(teacher || student) at temperature ``t``, scaled by t^2."""
    return F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                    reduction="none", log_target=True).sum(1) * (t * t)


def _check(logits: torch.Tensor, target: torch.Tensor, teacher_logits: Optional[torch.Tensor]) -> None:
    if not torch.is_tensor(logits) or logits.ndim != 2:
        raise ValueError(f"logits must be a (batch, classes) tensor, got {getattr(logits, 'shape', type(logits))}")
    if not torch.is_tensor(target) or target.shape != logits.shape[:1] or target.dtype != torch.long:
        raise ValueError(f"target must be a long tensor of shape ({logits.shape[0]},), got "
                         f"{getattr(target, 'dtype', type(target))} {tuple(getattr(target, 'shape', ()))}")
    if teacher_logits is not None and tuple(teacher_logits.shape) != tuple(logits.shape):
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, logits {tuple(logits.shape)}: "
                         "the teacher must see the same batch")


def training_loss(model: nn.Module, logits: torch.Tensor, target: torch.Tensor, *,
                  teacher_logits: Optional[torch.Tensor] = None,
                  config: Optional[LossConfig] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """:func:`tree_loss` for a branched ``model``; cross-entropy (+ distillation) for any other model."""
    if is_branched(model):
        return tree_loss(model, logits, target, teacher_logits=teacher_logits, config=config)
    cfg = config or LossConfig()
    _check(logits, target, teacher_logits)
    ce = F.cross_entropy(logits, target)
    loss, parts = ce, {"ce": float(ce.detach())}
    if teacher_logits is not None and cfg.distill_weight > 0:
        kd = _kd(logits, teacher_logits.detach(), cfg.distill_temperature).mean()
        loss = loss + cfg.distill_weight * kd
        parts["distill"] = float(kd.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def tree_loss(model: nn.Module, logits: torch.Tensor, target: torch.Tensor, *,
              teacher_logits: Optional[torch.Tensor] = None,
              config: Optional[LossConfig] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The complete SigmaB training loss of ``model``'s last forward, and its parts for logging.

    ``logits`` is what that forward returned (the path mixture in soft routing, the routed output in
    hard routing); under soft routing the expected objective reads the per-path outputs the forward
    recorded. ``teacher_logits`` (the dense model on the same batch) switches distillation on.
    Returns ``(loss, {"loss", "ce", "balance", "distill", "leaf_entropy"})``.
    """
    state = tree_state(model)
    cfg = config or LossConfig()
    _check(logits, target, teacher_logits)
    teacher = None if teacher_logits is None or cfg.distill_weight == 0 else teacher_logits.detach()
    paths = state.last_paths
    soft = paths is not None and state.last_leaf_probs is not None \
        and state.last_leaf_probs.shape[0] == logits.shape[0]
    if soft and paths.output.ndim != 2:
        raise ValueError(f"the tree's last routed unit returns shape {tuple(paths.output.shape)}; the expected "
                         "objective needs (rows, classes) logits there: use objective='mixture'")
    parts: Dict[str, float] = {}
    if soft and cfg.objective == "expected":
        ce_rows = F.cross_entropy(paths.output, target[paths.sample], reduction="none")
        ce = (paths.weight * ce_rows).sum() / logits.shape[0]
    else:  # hard-routed training (one path per sample) or the mixture objective
        ce = F.cross_entropy(logits, target)
    loss = ce
    parts["ce"] = float(ce.detach())
    if teacher is not None:
        if soft and cfg.objective == "expected":
            kd_rows = _kd(paths.output, teacher[paths.sample], cfg.distill_temperature)
            if cfg.distill_paths == "weighted":
                kd = (paths.weight * kd_rows).sum() / logits.shape[0]
            else:
                kd = kd_rows.mean()
        else:
            kd = _kd(logits, teacher, cfg.distill_temperature).mean()
        loss = loss + cfg.distill_weight * kd
        parts["distill"] = float(kd.detach())
    if soft and cfg.balance_weight > 0:
        bal = leaf_balance(state.last_leaf_probs)
        loss = loss + cfg.balance_weight * bal
        parts["balance"] = float(bal.detach())
    if soft:
        ent = leaf_entropy(state.last_leaf_probs)
        if cfg.decisive_weight > 0:
            loss = loss + cfg.decisive_weight * ent
        parts["leaf_entropy"] = float(ent.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


@dataclass
class TemperatureSchedule:
    """Router temperature annealed geometrically from ``start`` to ``end`` over ``total`` steps."""

    start: float = 1.0
    end: float = 0.1
    total: int = 1

    def __post_init__(self) -> None:
        _number("temperature start", self.start, 0, lo_open=True)
        _number("temperature end", self.end, 0, lo_open=True)
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 1:
            raise ValueError(f"total={self.total!r} must be an integer >= 1 (steps or epochs)")

    def __call__(self, step: int) -> float:
        if self.total <= 1:
            return self.end
        a = min(max(step, 0), self.total - 1) / (self.total - 1)
        return self.start * (self.end / self.start) ** a


def temperature_at(step: int, total: int, start: float = 1.0, end: float = 0.1) -> float:
    """Router temperature at ``step`` of ``total`` (epochs or batches), geometric from start to end."""
    return TemperatureSchedule(start, end, total)(step)
