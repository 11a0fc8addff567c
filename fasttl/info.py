"""`fasttl info`: what this installation can do."""
from __future__ import annotations

import platform

import torch

from fasttl._native import build_info, cuda_versions
from fasttl.data.dali_pipeline import dali_available


def version_text(version: int) -> str:
    """12040 -> "12.4" (the CUDA API's encoding); 0 -> ""."""
    return f"{version // 1000}.{version % 1000 // 10}" if version else ""


def cuda_warnings(built: int, linking: str, in_use: int, driver: int, torch_cuda) -> list:
    """Why fasttl's CUDA kernels cannot run here, or cannot run beside torch; [] when they can
    (or were not built). Versions are CUDA ints (12040); torch_cuda is torch.version.cuda."""
    if not built:
        return []
    warnings = []
    runtime = in_use or built
    if driver and driver // 1000 < runtime // 1000:
        warnings.append(f"the driver supports CUDA {version_text(driver)}, older than the CUDA "
                        f"{version_text(runtime)} runtime of fasttl's kernels, so every fasttl CUDA call fails: "
                        f"update the driver, or rebuild fasttl with a CUDA {driver // 1000}.x toolkit matching torch")
    torch_major = int(str(torch_cuda).split(".")[0]) if torch_cuda else 0
    if torch_major and torch_major != built // 1000:
        warnings.append(f"fasttl's kernels were built with CUDA {version_text(built)} ({linking} runtime) but torch "
                        f"uses CUDA {torch_cuda}: they need a driver for both; rebuild with a CUDA {torch_major}.x "
                        "toolkit (pip install --no-build-isolation -e . with that nvcc first on PATH)")
    return warnings


def collect() -> dict:
    native = build_info()
    versions = cuda_versions()
    archs = [a.strip() for a in native.get("cuda_archs", "").split(",") if a.strip()]
    built = int(native.get("cuda_runtime_built", 0) or 0)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "fasttl": __import__("fasttl").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_module": "loaded" if native["loaded"] else f"missing ({native.get('error')})",
        "cuda_kernels": bool(native.get("cuda")),
        "cuda_archs": ", ".join(f"sm_{a}" for a in archs),
        "cuda_runtime_built": version_text(built),
        "cuda_runtime_linking": native.get("cuda_runtime_linking", ""),
        "cuda_runtime_in_use": version_text(versions["runtime"]),
        "cuda_driver": version_text(versions["driver"]),
        "torch_cuda": torch.version.cuda or "",
        "cuda_warnings": cuda_warnings(built, native.get("cuda_runtime_linking", ""), versions["runtime"],
                                       versions["driver"], torch.version.cuda),
        "gpu_visible": bool(gpus),
        "gpus": gpus,
        "openmp_threads": native.get("openmp_threads", 0),
        "torch_threads": torch.get_num_threads(),
        "dali": dali_available(),
    }


def format_report(info: dict) -> str:
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines = [
        f"fasttl         {info['fasttl']}",
        f"torch          {info['torch']}  (python {info['python']})",
        f"native module  {info['native_module']}",
        f"CUDA kernels   {yes(info['cuda_kernels'])}" + (f"  (compiled for {info['cuda_archs']})" if info["cuda_kernels"] else ""),
        f"GPU visible    {yes(info['gpu_visible'])}" + (f"  ({', '.join(info['gpus'])})" if info["gpus"] else ""),
    ]
    if info["cuda_kernels"]:
        lines += [
            f"CUDA runtime   built with {info['cuda_runtime_built']} ({info['cuda_runtime_linking']})"
            + (f", in use {info['cuda_runtime_in_use']}" if info["cuda_runtime_in_use"] else ""),
            f"CUDA driver    {('supports CUDA ' + info['cuda_driver']) if info['cuda_driver'] else 'none found'}",
        ]
    lines += [
        f"torch CUDA     {info['torch_cuda'] or 'none (a CPU build of torch)'}",
        f"OpenMP threads {info['openmp_threads']}  (torch threads {info['torch_threads']})",
        f"DALI           {'importable' if info['dali'] else 'not installed (pip install nvidia-dali-cuda120)'}",
    ]
    lines += [f"warning: {w}" for w in info["cuda_warnings"]]
    return "\n".join(lines)
