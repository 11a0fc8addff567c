"""fasttl: fast transfer learning with fused native kernels (CPU always, CUDA when built)."""
from fasttl import nn, optim
from fasttl._native import build_info
from fasttl.cache import FeatureCache
from fasttl.losses import distillation_loss

__version__ = "0.1.0"
__all__ = ["FeatureCache", "distillation_loss", "nn", "optim", "build_info", "__version__"]
