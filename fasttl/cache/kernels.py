"""Public entry points of the feature cache kernels, with their argument checks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttl import _device_checks, _ops

CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
CACHE_DTYPE = "fp16"  # the default: half fp32's bytes, within 1e-3 of its features (range checked on write)
_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_cache(cache) -> None:
    if not isinstance(cache, Tensor) or cache.dtype not in CACHE_DTYPES.values() or cache.dim() != 2:
        raise TypeError(f"cache: got {getattr(cache, 'dtype', type(cache).__name__)} of shape "
                        f"{tuple(getattr(cache, 'shape', ()))} (expected a 2-D float32, float16, bfloat16 or int8 "
                        "tensor)")
    if not cache.is_contiguous():
        raise ValueError("cache: is not contiguous (expected a contiguous tensor)")


def _check_index_tensor(name: str, rows: Tensor, device: torch.device) -> None:
    """A 1-D int64 or int32 tensor on `device`: TypeError for anything else than such a tensor's
    dtype, ValueError for its shape or device (one message however the cache is stored)."""
    if not isinstance(rows, Tensor) or rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: got {getattr(rows, 'dtype', type(rows).__name__)} (expected an int64 or int32 "
                        "tensor of row indices)")
    if rows.dim() != 1:
        raise ValueError(f"{name}: has shape {tuple(rows.shape)} (expected a 1-D tensor of row indices; flatten it)")
    if rows.device != device:
        raise ValueError(f"{name}: is on {rows.device} (expected the cache's device, {device})")


def _check_rows(name: str, rows: Tensor, count: int, limit: int, device: torch.device) -> None:
    """Friendlier messages than the op's. The range is checked here on the host for CPU tensors;
    on CUDA the op checks it without a host sync (extraction and the loader call these once per
    batch) and reports a bad index as a ValueError under the same name, at the next fasttl call
    after the GPU ran this one, or at fasttl.raise_device_errors()."""
    _check_index_tensor(name, rows, device)
    if rows.numel() != count:
        raise ValueError(f"{name}: has shape {tuple(rows.shape)} (expected ({count},))")
    # meta tensors hold no values to check
    if count and rows.device.type != "meta" and not _device_checks.checks_on_device(rows):
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


class ShardTable:
    """A cache stored as shards (the memory-mapped shard files of a cache folder) read as one:
    row r is row r % shard_rows of shard r // shard_rows. Checked once here (every shard a 2-D
    contiguous CPU tensor of one cache dtype and width, all but the last of shard_rows rows; int8:
    float32 scales per shard), so each batch's gather checks only its indices.

    The native gather takes a table of the shards' addresses and reads each row where it lies,
    in one pass over the batch: no concatenated copy of the cache, and nothing is ever written to
    a shard."""

    def __init__(self, shards, scales=None):
        shards = list(shards)
        if not shards:
            raise ValueError("shards: expected at least one shard")
        first = shards[0]
        _check_cache(first)
        self.dtype, self.channels, self.shard_rows = first.dtype, first.shape[1], max(first.shape[0], 1)
        for i, shard in enumerate(shards):
            _check_cache(shard)
            if shard.device.type != "cpu" or shard.dtype != self.dtype or shard.shape[1] != self.channels:
                raise ValueError(f"shards: shard {i} is {shard.dtype} {tuple(shard.shape)} on {shard.device} "
                                 f"(expected {self.dtype} with {self.channels} columns on the CPU)")
            last = i == len(shards) - 1
            if shard.shape[0] > self.shard_rows or (not last and shard.shape[0] != self.shard_rows):
                raise ValueError(f"shards: shard {i} has {shard.shape[0]} rows (expected {self.shard_rows}, fewer "
                                 "only in the last)")
        if (scales is not None) != (self.dtype == torch.int8):
            raise ValueError("scales: expected one float32 vector per shard for an int8 cache, none otherwise")
        if scales is not None:
            scales = list(scales)
            for i, (shard, scale) in enumerate(zip(shards, scales)):
                if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.shape != (shard.shape[0],) \
                        or not scale.is_contiguous() or scale.device.type != "cpu":
                    raise ValueError(f"scales: shard {i}'s scales are not a contiguous float32 CPU vector of "
                                     f"{shard.shape[0]} entries")
            if len(scales) != len(shards):
                raise ValueError(f"scales: {len(scales)} vectors for {len(shards)} shards")
        self.shards, self.scales = shards, scales
        self.rows = sum(s.shape[0] for s in shards)
        # The tables hold addresses: the shard tensors above keep what they point to alive.
        self._table = torch.tensor([s.data_ptr() for s in shards], dtype=torch.int64)
        self._scale_table = None if scales is None else torch.tensor([s.data_ptr() for s in scales],
                                                                     dtype=torch.int64)

    def __len__(self) -> int:
        return self.rows

    def __reduce__(self):
        # Its tables hold the shards' addresses: a copy (copy.deepcopy, pickle to a spawned worker)
        # is made again from its own copies of the shards, never with the original's addresses.
        return ShardTable, (self.shards, self.scales)

    def gather(self, indices: Tensor, out_dtype: torch.dtype = torch.float32, out: Optional[Tensor] = None,
               checked: bool = True, method: str = "table", threads: int = 0) -> Tensor:
        """Rows `indices` dequantized to out_dtype, into `out` when given (a contiguous
        (len(indices), C) CPU tensor of out_dtype: a pinned staging buffer, say). `checked=False`
        skips the range check for indices known to be in range (a permutation of the rows).
        `threads`: how many threads read them: the caller and up to threads - 1 helpers claiming
        chunks of rows (csrc/cpu/claim_pool.h); 0: torch's thread count."""
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"out_dtype: {out_dtype} is not supported (expected torch.float32 or torch.bfloat16)")
        _check_index_tensor("indices", indices, torch.device("cpu"))
        indices = indices.to(torch.int64).contiguous()
        if checked and indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.rows:
                raise ValueError(f"indices: values span [{low}, {high}] (expected indices in [0, {self.rows}))")
        shape = (indices.numel(), self.channels)
        if out is None:
            out = torch.empty(shape, dtype=out_dtype)
        elif out.dtype != out_dtype or tuple(out.shape) != shape or not out.is_contiguous() or \
                out.device.type != "cpu":
            raise ValueError(f"out: expected a contiguous {out_dtype} CPU tensor of shape {shape}")
        if out.numel() and method == "grouped":
            self._gather_grouped(indices, out)
        elif out.numel():
            _ops.native.gather_shards(self._table.data_ptr(), 0 if self._scale_table is None else
                                      self._scale_table.data_ptr(), self.shard_rows, _ops.dtype_code(self.shards[0]),
                                      indices.data_ptr(), indices.numel(), self.channels, out.data_ptr(),
                                      _ops.dtype_code(out), threads)
        return out

    def _gather_grouped(self, indices: Tensor, out: Tensor) -> None:
        """The other way to read a sharded cache, kept for the measurement that chose the table
        (fasttl bench cache --scale): the batch grouped by shard, one gather call per shard
        touched, each shard's rows put back at their batch positions."""
        which = torch.div(indices, self.shard_rows, rounding_mode="floor")
        for shard in torch.unique(which).tolist():
            at = (which == shard).nonzero().flatten()
            local = indices[at] - shard * self.shard_rows
            scales = None if self.scales is None else self.scales[shard]
            out.index_copy_(0, at, _ops.gather(self.shards[shard], scales, local, out.dtype))
