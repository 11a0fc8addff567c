"""`fasttl info`: what this installation can do."""
from __future__ import annotations

import platform

import torch

from fasttl._native import build_info
from fasttl.data.dali_pipeline import dali_available


def collect() -> dict:
    native = build_info()
    archs = [a.strip() for a in native.get("cuda_archs", "").split(",") if a.strip()]
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "fasttl": __import__("fasttl").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_module": "loaded" if native["loaded"] else f"missing ({native.get('error')})",
        "cuda_kernels": bool(native.get("cuda")),
        "cuda_archs": ", ".join(f"sm_{a}" for a in archs),
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
        f"OpenMP threads {info['openmp_threads']}  (torch threads {info['torch_threads']})",
        f"DALI           {'importable' if info['dali'] else 'not installed (pip install nvidia-dali-cuda120)'}",
    ]
    return "\n".join(lines)
