"""Loads the native module once. When it is missing, or was built without CUDA, a stand-in
raises a clear error at the first call that needs it, so ``import fasttl`` never fails."""
from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}


class _MissingNative:
    """Stands in for ``fasttl._C`` when it could not be imported."""

    def __init__(self, error: BaseException):
        self.error = error

    def __getattr__(self, name: str):
        raise RuntimeError(
            f"fasttl's native module is not available ({type(self.error).__name__}: {self.error}), "
            f"so fasttl.{name} cannot run. Build it with "
            "`pip install torch==2.13.0 && pip install --no-build-isolation -e .` "
            "(needs a C++17 compiler, CMake >= 3.24 and pybind11)."
        )


try:
    from fasttl import _C as native  # type: ignore[attr-defined]

    load_error: BaseException | None = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    native = _MissingNative(exc)
    load_error = exc


def build_info() -> dict:
    """What the native module was built with, or why it did not load."""
    if load_error is not None:
        return {"loaded": False, "error": str(load_error), "cuda": False, "cuda_archs": "", "openmp_threads": 0}
    info = dict(native.build_info())
    info["loaded"] = True
    return info


def cuda_versions() -> dict:
    """{"runtime": the CUDA runtime the kernels call (e.g. 12040), "driver": the newest CUDA the
    driver supports}; 0 where there is none (no CUDA kernels, no driver). Creates no CUDA context."""
    if load_error is not None or not hasattr(native, "cuda_versions"):
        return {"runtime": 0, "driver": 0}
    return dict(native.cuda_versions())


def cuda_kernels_available() -> bool:
    return load_error is None and bool(native.build_info()["cuda"])


def require_cuda_kernels(what: str) -> None:
    if load_error is not None:
        getattr(native, what)  # raises the missing-module error
    if not cuda_kernels_available():
        raise RuntimeError(
            f"{what}: this fasttl build has no CUDA kernels (nvcc was not found when it was built). "
            "Reinstall with the CUDA toolkit on PATH (FASTTL_CUDA=ON makes a missing nvcc an error), "
            "or move the tensors to the CPU."
        )


def dtype_code(tensor: torch.Tensor) -> int:
    return DTYPE_CODES[tensor.dtype]


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current stream on `device` (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
