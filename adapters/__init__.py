"""Model adapters: architectures SigmaB supports beyond timm (CIFAR ResNets), registered with timm."""
from . import cifar_resnet  # noqa: F401

