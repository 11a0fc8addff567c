"""Public entry points of the feature cache kernels, with their argument checks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttl import _ops

CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_rows(name: str, rows: Tensor, count: int, limit: int, device: torch.device) -> None:
    if not isinstance(rows, Tensor) or rows.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor of row indices")
    if rows.dim() != 1 or rows.numel() != count:
        raise ValueError(f"{name}: expected shape ({count},), got {tuple(rows.shape)}")
    if rows.device != device:
        raise ValueError(f"{name}: on {rows.device}, expected {device}")
    if count and (int(rows.min()) < 0 or int(rows.max()) >= limit):
        raise ValueError(f"{name}: indices must be in [0, {limit}), got [{int(rows.min())}, {int(rows.max())}]")


def pool_store(features: Tensor, cache: Tensor, rows: Tensor, scales: Optional[Tensor] = None) -> None:
    """Writes ``features`` (N, C, H, W) global-average-pooled, or (N, C) as they are, into
    ``cache[rows]``, converted to the cache's dtype (float32, float16, bfloat16, or int8 with
    the per-row fp32 scale written to ``scales[rows]``), in one pass. Pooling accumulates in fp32."""
    if not isinstance(features, Tensor) or features.dtype not in _SOURCE_DTYPES:
        raise TypeError(f"features: expected a float32/float16/bfloat16 tensor, got "
                        f"{getattr(features, 'dtype', type(features).__name__)}")
    if features.dim() not in (2, 4):
        raise ValueError(f"features: expected (N, C, H, W) or (N, C), got {tuple(features.shape)}")
    if not isinstance(cache, Tensor) or cache.dtype not in CACHE_DTYPES.values() or cache.dim() != 2:
        raise TypeError("cache: expected a 2-D float32/float16/bfloat16/int8 tensor")
    if not cache.is_contiguous():
        raise ValueError("cache: expected a contiguous tensor")
    if cache.shape[1] != features.shape[1]:
        raise ValueError(f"cache: has {cache.shape[1]} columns, features have {features.shape[1]} channels")
    if cache.device != features.device:
        raise ValueError(f"cache: on {cache.device}, features on {features.device}")
    if cache.dtype == torch.int8:
        if scales is None or scales.dtype != torch.float32 or scales.shape != (cache.shape[0],) or \
                scales.device != cache.device or not scales.is_contiguous():
            raise ValueError(f"scales: an int8 cache needs a contiguous float32 tensor of shape ({cache.shape[0]},) "
                             "on the cache's device")
    elif scales is not None:
        raise ValueError("scales: only int8 caches have scales")
    _check_rows("rows", rows, features.shape[0], cache.shape[0], cache.device)
    if features.shape[0]:
        _ops.pool_store(features, cache, scales, rows)


def gather(cache: Tensor, indices: Tensor, scales: Optional[Tensor] = None,
           out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Returns ``cache[indices]`` dequantized to ``out_dtype`` (float32 or bfloat16) as one
    contiguous (len(indices), C) batch, in one pass."""
    if not isinstance(cache, Tensor) or cache.dtype not in CACHE_DTYPES.values() or cache.dim() != 2:
        raise TypeError("cache: expected a 2-D float32/float16/bfloat16/int8 tensor")
    if not cache.is_contiguous():
        raise ValueError("cache: expected a contiguous tensor")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype: expected torch.float32 or torch.bfloat16, got {out_dtype}")
    if cache.dtype == torch.int8 and (scales is None or scales.shape != (cache.shape[0],)):
        raise ValueError(f"scales: an int8 cache needs its float32 scales of shape ({cache.shape[0]},)")
    _check_rows("indices", indices, indices.numel() if isinstance(indices, Tensor) else -1, cache.shape[0],
                cache.device)
    return _ops.gather(cache, scales if cache.dtype == torch.int8 else None, indices, out_dtype)
