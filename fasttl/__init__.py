"""fasttl: fast transfer learning with fused native kernels (CPU always, CUDA when built)."""
import importlib

from fasttl import nn, optim
from fasttl._native import build_info
from fasttl._device_checks import raise_device_errors  # a CUDA op's bad index, raised named at a sync you choose
from fasttl._version import __version__
from fasttl.cache import FeatureCache
from fasttl.losses import distillation_loss


_SUBPACKAGES = ("backbones", "cache", "data", "heads", "transfer", "util")  # imported on first use (DALI, matplotlib stay unloaded)
__all__ = ["FeatureCache", "distillation_loss", "load_run", "nn", "optim", "build_info", "raise_device_errors",
           "__version__",
           *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"fasttl.{name}")
    if name == "load_run":  # a finished run's model, ready to predict (fasttl.predict.load_run)
        return importlib.import_module("fasttl.predict").load_run
    raise AttributeError(f"module 'fasttl' has no attribute {name!r}")
