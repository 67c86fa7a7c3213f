"""SigmaB: branch a copy of the dense reference (activation-aware spherical k-means initialisation),
at the given keep ratio or, with a target active fraction, at the largest keep ratio that meets it."""
import copy

import sigmab_plugin as sb

from ._static import bisect_budget
from .registry import Method, RunContext, register_method


@register_method("sigmab")
class SigmaB(Method):
    def prepare(self, run: RunContext):
        opts = {"progress": False, "seed": run.seed, **run.branch_options}

        def build(keep: float):
            return sb.branch(copy.deepcopy(run.dense), calib_data=run.calib, **{**opts, "keep_ratio": keep})
        if run.target_fraction is None:
            return build(opts.pop("keep_ratio", 0.5))
        dense = sum(p.numel() for p in run.dense.parameters())
        lo = 0.5 if opts.get("coverage", True) else 0.05
        return bisect_budget(build, lambda t: sb.param_report(t)["active_params_max"],
                             int(run.target_fraction * dense), lo, 1.0, 7, shrinks=False,
                             what=f"SigmaB (target active fraction {run.target_fraction})",
                             fix="raise the target, set prune_residual or coverage=False")[1]
