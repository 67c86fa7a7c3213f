"""Model adapters: architectures SigmaB supports beyond timm (CIFAR ResNets, PointNet++), registered with timm."""
from . import cifar_resnet, pointnet2  # noqa: F401
