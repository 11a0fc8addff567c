"""Reading weight files, with an error that says where the file must be when it is missing."""
from __future__ import annotations

import os


from fasttl.util.errors import UserError


class WeightsError(UserError, ValueError):
    """A weights file that is not a state dict fasttl can load (or that would run code on load)."""


def read_state_dict(path: str) -> dict:
    """A state dict from a .pth/.pt (torch.save) or .safetensors file; nothing is downloaded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights: no file at {os.path.abspath(path)}. fasttl never downloads weights: put the state dict "
            "file there (a torch.save'd .pth/.pt or a .safetensors file), or pass weights=PATH / --weights PATH "
            "pointing to where it is."
        )
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            from fasttl.util.files import load_tensors

            state = load_tensors(path)
    except Exception as exc:  # safetensors and torch raise many types for a damaged file
        reason = " ".join(str(exc).split())[:200]
        raise WeightsError(f"weights: {path} is not a state dict file fasttl can load ({reason}); pass a "
                           "torch.save'd state dict or a .safetensors file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights: {path} does not hold a state dict (got {type(state).__name__})")
    return state
