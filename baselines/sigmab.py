"""SigmaB: branch a copy of the dense reference (activation-aware spherical k-means initialisation),
at the given keep ratio or, with a target active fraction, at the largest keep ratio that meets it.

``keep_shape`` (one positive number per level) makes the keep ratio of level ``l`` ``keep * shape[l] / max(shape)``:
with a target, the common scale ``keep`` is searched, so the levels keep channels in that proportion."""
import copy

import sigmab_plugin as sb

from ._static import bisect_budget
from .registry import Method, RunContext, register_method


def level_shape(shape, depth: int) -> list:
    """``shape`` normalised by its largest entry; ``ValueError`` unless it holds one positive number per level."""
    shape = [float(r) for r in shape]
    if len(shape) != depth or min(shape) <= 0:
        raise ValueError(f"keep_shape={shape} needs one positive number per level (depth {depth}), e.g. [1.0, 0.7]")
    return [r / max(shape) for r in shape]


@register_method("sigmab")
class SigmaB(Method):
    def prepare(self, run: RunContext):
        opts = {"progress": False, "seed": run.seed, **run.branch_options}
        shape = opts.pop("keep_shape", None)
        if shape is not None:
            shape = level_shape(shape, opts.get("depth", sb.BranchConfig().depth))

        def build(keep: float):
            ratio = keep if shape is None else [keep * r for r in shape]
            return sb.branch(copy.deepcopy(run.dense), calib_data=run.calib, **{**opts, "keep_ratio": ratio})
        if run.target_fraction is None:
            return build(opts.pop("keep_ratio", 0.5))
        dense = sum(p.numel() for p in run.dense.parameters())
        lo = 0.5 if opts.get("coverage", True) else 0.05
        return bisect_budget(build, lambda t: sb.param_report(t)["active_params_max"],
                             int(run.target_fraction * dense), lo, 1.0, 7, shrinks=False,
                             what=f"SigmaB (target active fraction {run.target_fraction})",
                             fix="raise the target, set prune_residual or coverage=False")[1]
