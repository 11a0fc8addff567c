"""Argument checks every layer repeats, written once: each raises the caller's error type with a
message naming the argument."""
from __future__ import annotations


def positive_int(name: str, value, error=ValueError, optional: bool = False):
    """`value` when it is an int >= 1 (True is not 1 here), or None when `optional`; else `error`
    naming `name`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name}: expected a positive integer, got {value!r}")
    return value


def torch_device(value, name: str = "device"):
    """`value` (cpu, cuda or cuda:N) as a torch.device this machine has; else an OptionError
    naming `name` (a GPU asked for where torch sees none says so)."""
    import torch

    from fasttl.util.errors import OptionError

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"{name}: expected cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{name}: {device} asked for, but torch sees no CUDA GPU; pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"{name}: {device} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise OptionError(f"{name}: expected cpu, cuda or cuda:N, got {str(device)!r}")
    return device
