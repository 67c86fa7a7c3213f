"""sigmab-plugin: Sigma-Branch (SigmaB) for PyTorch CNNs.

Restructure a pretrained dense network into a binary tree (shared backbone, cosine routers,
channel-pruned leaves), initialised by activation-aware spherical k-means; each input runs one
root-to-leaf path, so only that path's weights are read per inference.
"""
from ._split import register_pruner, registered_pruners
from .allocator import keep_freed_memory
from .branch import branch
from .calibrate import calibrate_routing
from .reconstruct import reconstruct
from .config import BranchConfig
from .io import load_branched, save_branched
from .export import export_deployment, export_path, load_deployment
from .kmeans import spherical_kmeans
from .finetune import node_param_groups
from .norm_stats import freeze_batchnorm, recalibrate_batchnorm
from .objective import LossConfig, TemperatureSchedule, leaf_balance, leaf_entropy, temperature_at, tree_loss
from .report import param_report, summary
from .routing import forward_leaf, is_branched, route, route_on, set_routing, tree_state

__version__ = "0.1.0"

from . import adapters as adapters  # noqa: E402  (registers the CIFAR ResNets with timm)

__all__ = [
    "BranchConfig",
    "LossConfig",
    "TemperatureSchedule",
    "__version__",
    "branch",
    "calibrate_routing",
    "recalibrate_batchnorm",
    "reconstruct",
    "export_deployment",
    "export_path",
    "forward_leaf",
    "freeze_batchnorm",
    "is_branched",
    "keep_freed_memory",
    "leaf_balance",
    "leaf_entropy",
    "load_branched",
    "load_deployment",
    "node_param_groups",
    "param_report",
    "register_pruner",
    "registered_pruners",
    "route",
    "route_on",
    "save_branched",
    "set_routing",
    "spherical_kmeans",
    "summary",
    "temperature_at",
    "tree_state",
    "tree_loss",
]
