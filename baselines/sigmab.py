"""SigmaB: branch a copy of the dense reference (activation-aware spherical k-means initialisation)."""
import copy

import sigmab_plugin as sb

from .registry import Method, RunContext, register_method


@register_method("sigmab")
class SigmaB(Method):
    def prepare(self, run: RunContext):
        opts = dict(run.branch_options)
        opts.setdefault("progress", False)
        return sb.branch(copy.deepcopy(run.dense), calib_data=run.calib, seed=run.seed, **opts)
