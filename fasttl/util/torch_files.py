"""torch.save files fasttl reads (run checkpoints, backbone weights): tensors and plain containers
only, never code; a file of another kind said for what it looks like."""
from __future__ import annotations

import os
import re
import stat

from fasttl.util.files import first_bytes
from fasttl.util.outputs import terminal_text


def load_tensors(path: str):
    """torch.load restricted to tensors and plain containers (weights_only=True): a file holding
    any other Python object, which could run code as it loads, is refused, never executed.
    Raises ValueError with a one-line reason (never torch's advice to load it unsafely); a file
    one may not read raises its PermissionError (a permission, never damage to delete it for)."""
    import pickle
    import warnings

    import torch

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # (a pipe reads as empty, a device as its first bytes)
            raise ValueError("not a torch.save file (not a regular file: a folder, a pipe or a device?)")
        start = first_bytes(path)
        if not start.startswith((b"PK\x03\x04", b"\x80")):  # a zip (torch.save's) or a pickle (its old format)
            raise ValueError(f"not a torch.save file ({_looks_like(start)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle protocol note of a foreign file
            return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            named = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))  # (a cut file's, too: said)
            what = f" ({terminal_text(named.group(1))[:80]})" if named else ""
            raise ValueError(f"it holds Python objects other than tensors{what}, refused: loading them could run "
                             "code") from None
        raise ValueError(f"not a torch.save file ({' '.join(str(exc).split())[:120]})") from None
    except Exception as exc:  # damage raises what torch's readers meet: IndexError, KeyError, struct.error, ...
        if isinstance(exc, ValueError) and str(exc).startswith("not a torch.save file"):
            raise
        raise ValueError(f"not a torch.save file ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") \
            from None


# What a file that is no torch.save file most often is, by its first bytes (said instead of a pickle error).
_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"\x1f\x8b", "gzip data"),
               (b"PK", "a zip archive without torch's records"), (b"{", "text (JSON?)"))


def _looks_like(start: bytes) -> str:
    if not start:
        return "an empty file"
    kind = next((kind for magic, kind in _SIGNATURES if start.startswith(magic)), None)
    if kind is None and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in start):
        kind = "text"
    return f"it starts like {kind}" if kind else f"its first bytes are {start.hex(' ')}, not a zip's or a pickle's"
