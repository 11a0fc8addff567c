"""Reading weight files, with an error that says where the file must be when it is missing."""
from __future__ import annotations

import os


from fasttl.util.errors import UserError
from fasttl.util.files import absolute
from fasttl.util.path_problems import unreachable


class WeightsError(UserError, ValueError):
    """A weights file that is not a state dict fasttl can load (or that would run code on load)."""


def read_state_dict(path: str) -> dict:
    """A state dict from a .pth/.pt (torch.save) or .safetensors file; nothing is downloaded."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise WeightsError(f"weights: {absolute(path)} is not a regular file (a folder, a pipe or a device?); "
                           "pass a torch.save'd .pth/.pt or a .safetensors file")
    if not os.path.isfile(path) and (why := unreachable(path)):
        raise WeightsError(f"weights: {absolute(path)} {why}")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights: no file at {absolute(path)}. fasttl never downloads weights: put the state dict "
            "file there (a torch.save'd .pth/.pt or a .safetensors file), or pass weights=PATH / --weights PATH "
            "pointing to where it is."
        )
    with open(path, "rb"):  # an unreadable file: the OS's own error (safetensors says "No such file")
        pass
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            from fasttl.util.torch_files import load_tensors

            state = load_tensors(path)
    except Exception as exc:  # safetensors and torch raise many types for a damaged file
        reason = " ".join(str(exc).split())[:200]
        raise WeightsError(f"weights: {path} is not a state dict file fasttl can load ({reason}); pass a "
                           "torch.save'd state dict or a .safetensors file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights: {path} does not hold a state dict (got {type(state).__name__})")
    _check_entries(path, state)
    _check_finite(path, state)
    return state


def _check_entries(path: str, state: dict) -> None:
    """Every key a name and every value a dense tensor (what torch.load's weights_only also lets
    through: a number, a list, a sparse or nested tensor, a key None), named before a model sees it."""
    import torch

    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f"weights: {path} holds a key {key!r:.60} that is not a name (a state dict maps "
                               "parameter names to tensors): pass a torch.save'd state dict")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"weights: {path}: '{key}' holds {type(value).__name__} {value!r:.40}, not a tensor: "
                               "pass a torch.save'd state dict")
        if value.is_nested or value.layout != torch.strided or value.device.type == "meta":
            kind = "a nested" if value.is_nested else "a meta" if value.device.type == "meta" else f"a {value.layout}"
            raise WeightsError(f"weights: {path}: '{key}' holds {kind} tensor, not a dense one of values: save it with "
                               "its values (tensor.to_dense() before torch.save)")


def _check_finite(path: str, state: dict) -> None:
    """Weights that make NaN features are refused naming the file and the tensor: NaN or infinite
    values (a float64 beyond float32's range counts: the model runs in float32), or a negative
    batch-norm running variance (its square root is NaN)."""
    import torch

    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor.float()).all()):
            raise WeightsError(f"weights: {path}: '{key}' holds NaN or infinite values (in float32); the backbone "
                               "would compute NaN features: pass a sound state dict")
        if str(key).endswith("running_var") and bool((tensor < 0).any()):
            raise WeightsError(f"weights: {path}: '{key}' holds a negative running variance; the backbone would "
                               "compute NaN features: pass a sound state dict")
