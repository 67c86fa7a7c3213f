"""sigmab-plugin: Sigma-Branch (SigmaB) for PyTorch CNNs.

Restructure a pretrained dense network into a binary tree (shared backbone, cosine routers,
channel-pruned leaves), initialised by activation-aware spherical k-means; each input runs one
root-to-leaf path, so only that path's weights are read per inference.
"""
from ._split import register_pruner
from .branch import branch
from .config import BranchConfig
from .io import load_branched, save_branched
from .kmeans import spherical_kmeans
from .report import param_report, summary
from .routing import route, set_routing

__version__ = "0.1.0"

__all__ = [
    "BranchConfig",
    "__version__",
    "branch",
    "load_branched",
    "param_report",
    "register_pruner",
    "route",
    "save_branched",
    "set_routing",
    "spherical_kmeans",
    "summary",
]
