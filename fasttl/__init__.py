"""fasttl: fast transfer learning with fused native kernels (CPU always, CUDA when built)."""
import importlib
import sys


def _interrupted_while_loading(kind, value, traceback, previous=sys.excepthook):
    """Ctrl-C in the seconds torch takes to load ends as a command of a loaded fasttl ends (the
    CLI's handler is not in place yet): one line, not Python's traceback."""
    if issubclass(kind, KeyboardInterrupt):
        print("\nfasttl: interrupted", file=sys.stderr)
    else:
        previous(kind, value, traceback)


sys.excepthook = _interrupted_while_loading  # put back below once loaded; left only when the load was interrupted
# numpy first: imported from inside torch's C module, a Ctrl-C during its import is swallowed there (the command
# then runs on, or fails later in numpy); imported here, the interrupt reaches the hook above
import numpy  # noqa: E402, F401
from fasttl import nn, optim  # noqa: E402
from fasttl._native import build_info  # noqa: E402
# a CUDA op's bad index, raised named at a sync you choose:
from fasttl._device_checks import raise_device_errors  # noqa: E402
from fasttl._version import __version__  # noqa: E402
from fasttl.cache import FeatureCache  # noqa: E402
from fasttl.losses import distillation_loss  # noqa: E402
if sys.excepthook is _interrupted_while_loading:
    sys.excepthook = _interrupted_while_loading.__defaults__[0]


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
