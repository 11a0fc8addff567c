"""What this CPU computes natively, read from the kernel's CPU flags (never assumed): which
extraction precisions pay here (fasttl.cache.engines, fasttl.transfer.config) and how an int8
graph is quantized (fasttl.cache.quantize)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The kernel's flags of this CPU (x86 "flags", Arm "Features"); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f
                                   if line.split(":", 1)[0].strip() in ("flags", "Features")), []))
    except (OSError, UnicodeDecodeError):
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX): read from the
    kernel's CPU flags, never assumed."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), on
    which ONNX Runtime's int8 kernels were measured 1.96x its fp32 ones (benchmarks/RESULTS.md,
    "extract"); elsewhere int8 is not measured, and a run's auto precision stays fp32."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
