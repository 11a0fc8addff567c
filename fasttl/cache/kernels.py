"""Public entry points of the feature cache kernels, with their argument checks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttl import _ops

CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_cache(cache) -> None:
    if not isinstance(cache, Tensor) or cache.dtype not in CACHE_DTYPES.values() or cache.dim() != 2:
        raise TypeError(f"cache: got {getattr(cache, 'dtype', type(cache).__name__)} of shape "
                        f"{tuple(getattr(cache, 'shape', ()))} (expected a 2-D float32, float16, bfloat16 or int8 "
                        "tensor)")
    if not cache.is_contiguous():
        raise ValueError("cache: is not contiguous (expected a contiguous tensor)")


def _check_rows(name: str, rows: Tensor, count: int, limit: int, device: torch.device) -> None:
    """Friendlier messages than the op's. The range is checked here on the host for CPU tensors;
    on CUDA the op checks it without a host sync (extraction and the loader call these once per
    batch) and reports a bad index as a ValueError under the same name, at the next fasttl call
    after the GPU ran this one, or at fasttl._ops.raise_device_errors()."""
    if not isinstance(rows, Tensor) or rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: got {getattr(rows, 'dtype', type(rows).__name__)} (expected an int64 or int32 "
                        "tensor of row indices)")
    if rows.dim() != 1 or rows.numel() != count:
        raise ValueError(f"{name}: has shape {tuple(rows.shape)} (expected ({count},))")
    if rows.device != device:
        raise ValueError(f"{name}: is on {rows.device} (expected the cache's device, {device})")
    # meta tensors hold no values to check
    if count and rows.device.type != "meta" and not _ops._checks_on_device(rows):
        low, high = (int(v) for v in torch.stack(torch.aminmax(rows)).tolist())
        if low < 0 or high >= limit:
            raise ValueError(f"{name}: values span [{low}, {high}] (expected indices in [0, {limit}))")


def pool_store(features: Tensor, cache: Tensor, rows: Tensor, scales: Optional[Tensor] = None) -> None:
    """Writes ``features`` (N, C, H, W) global-average-pooled, or (N, C) as they are, into
    ``cache[rows]``, converted to the cache's dtype (float32, float16, bfloat16, or int8 with
    the per-row fp32 scale written to ``scales[rows]``), in one pass. Pooling accumulates in fp32.
    ``rows``: (N,) distinct int64 or int32 indices (any stride); ``cache`` and ``scales`` contiguous."""
    if not isinstance(features, Tensor) or features.dtype not in _SOURCE_DTYPES:
        raise TypeError(f"features: got {getattr(features, 'dtype', type(features).__name__)} "
                        "(expected a float32, float16 or bfloat16 tensor)")
    if features.dim() not in (2, 4) or features.dim() == 4 and features.shape[2] * features.shape[3] == 0:
        raise ValueError(f"features: has shape {tuple(features.shape)} (expected (N, C, H, W) with H * W >= 1, "
                         "or (N, C))")
    _check_cache(cache)
    if cache.shape[1] != features.shape[1]:
        raise ValueError(f"cache: has {cache.shape[1]} columns (expected features' {features.shape[1]} channels)")
    if cache.device != features.device:
        raise ValueError(f"cache: is on {cache.device} (expected features' device, {features.device})")
    _check_rows("rows", rows, features.shape[0], cache.shape[0], cache.device)
    # The op checks the rest (scales, repeated rows) under the same argument names.
    _ops.pool_store(features, cache, scales, rows)


def gather(cache: Tensor, indices: Tensor, scales: Optional[Tensor] = None,
           out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Returns ``cache[indices]`` dequantized to ``out_dtype`` (float32 or bfloat16) as one
    contiguous (len(indices), C) batch, in one pass. ``indices``: 1-D int64 or int32 (any stride),
    checked against the cache's size (on CUDA without a host sync, reported as _check_rows says)."""
    _check_cache(cache)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype: {out_dtype} is not supported (expected torch.float32 or torch.bfloat16)")
    _check_rows("indices", indices, indices.numel() if isinstance(indices, Tensor) else -1, cache.shape[0],
                cache.device)
    return _ops.gather(cache, scales if cache.dtype == torch.int8 else None, indices, out_dtype)
