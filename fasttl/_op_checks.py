"""Argument checks of every fasttl op, shared by the kernels and the fake (shape-only)
implementations, so torch.compile refuses what eager refuses: dtypes, devices, dims, sizes,
strides, numbers in range. (Index values, which depend on data, are checked in _device_checks.)"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_DTYPES = _FLOAT_DTYPES + (torch.int8,)
_INDEX_DTYPES = (torch.int64, torch.int32)
_GATHER_OUT_DTYPES = (torch.float32, torch.bfloat16)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensor(name: str, x, dtypes: Sequence[torch.dtype], dims: Sequence[int]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: got {type(x).__name__} (expected a torch.Tensor)")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: layout {x.layout} is not supported (expected a dense, strided tensor)")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (expected one of {_names(dtypes)})")
    if x.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: has shape {tuple(x.shape)} (expected a {expected} tensor)")


def _check_device(name: str, x: Tensor, device: torch.device, owner: str) -> None:
    if x.device != device:
        raise ValueError(f"{name}: is on {x.device} (expected {owner}'s device, {device})")


def _check_index(name: str, index, length: int, device: torch.device, owner: str) -> None:
    """A 1-D int32/int64 index tensor of `length` entries on `device` (values checked apart)."""
    _check_tensor(name, index, _INDEX_DTYPES, (1,))
    if index.numel() != length:
        raise ValueError(f"{name}: has {index.numel()} entries (expected {length}, one per row)")
    _check_device(name, index, device, owner)


def as_int64(index: Tensor) -> Tensor:
    # The kernels walk a contiguous int64 array: a strided or int32 index would be misread.
    return index.to(torch.int64).contiguous()


def shares_memory(a: Tensor, b: Optional[Tensor]) -> bool:
    if b is None or a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":
        return False  # meta storages all sit at address 0
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# Temperatures where the loss is within 1e-3 of the float64 formula for every finite input whose
# loss fits in fp32 (csrc/include/fasttl/distill.h); outside, even float64 cannot tell the KL
# from its rounding (T = 1e20: every softmax is uniform to the last bit).
TEMPERATURE_RANGE = (1e-2, 1e3)


def finite(value) -> bool:
    """math.isfinite for a number read back from a file: an integer too large for a double (an int
    of 400 digits in JSON or a checkpoint) is not finite here, where math.isfinite raises OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_number(name: str, value, low: float, high: float, why: str = "") -> None:
    """`value` is a real number (a Python or numpy one, not a bool) in [low, high]; else an error
    that says which: the type (TypeError) or the range (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = "; float(t) if you mean its value" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name}: got {type(value).__name__} (expected a Python float{hint})")
    if not low <= value <= high:
        raise ValueError(f"{name}: is {value!r} (expected a number in [{low:g}, {high:g}]{why})")


def check_temperature(name: str, temperature) -> None:
    low, high = TEMPERATURE_RANGE
    check_number(name, temperature, low, high, ": beyond it the softened distributions are uniform or one-hot to "
                 "the last bit of float64")


def check_label_smoothing(label_smoothing) -> None:
    check_number("label_smoothing", label_smoothing, 0.0, 1.0, ", as torch.nn.functional.cross_entropy")


def check_distill_rows(student, teacher, target, temperature: float, alpha: float,
                        label_smoothing: float = 0.0) -> None:
    _check_tensor("student", student, _FLOAT_DTYPES, (2,))
    _check_tensor("teacher", teacher, _FLOAT_DTYPES, (2,))
    if teacher.shape != student.shape:
        raise ValueError(f"teacher: has shape {tuple(teacher.shape)} (expected the student's, {tuple(student.shape)})")
    if student.shape[1] < 1:
        raise ValueError(f"student: has shape {tuple(student.shape)} (expected at least one class)")
    _check_device("teacher", teacher, student.device, "student")
    if target is not None:
        _check_index("target", target, student.shape[0], student.device, "student")
    check_temperature("temperature", temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: is {alpha} (expected a number in [0, 1])")
    check_label_smoothing(label_smoothing)


def check_pool_store(src, cache, scales, rows) -> None:
    _check_tensor("src", src, _FLOAT_DTYPES, (2, 4))
    if src.dim() == 4 and src.shape[2] * src.shape[3] == 0:
        raise ValueError(f"src: has shape {tuple(src.shape)} (expected H * W >= 1 to average over)")
    _check_tensor("cache", cache, _CACHE_DTYPES, (2,))
    _check_device("cache", cache, src.device, "src")
    if cache.shape[1] != src.shape[1]:
        raise ValueError(f"cache: has {cache.shape[1]} columns (expected src's {src.shape[1]} channels)")
    if not cache.is_contiguous():
        raise ValueError("cache: is not contiguous (expected a contiguous tensor: rows are written in place)")
    _check_scales(scales, cache, written=True)
    _check_index("rows", rows, src.shape[0], src.device, "src")


def _check_scales(scales, cache: Tensor, written: bool) -> None:
    """int8 caches: float32 (rows,) scales on the cache's device; other caches: none."""
    if cache.dtype != torch.int8:
        if scales is not None:
            raise ValueError(f"scales: given for a {cache.dtype} cache (expected None: only int8 caches have scales)")
        return
    if scales is None:
        raise ValueError(f"scales: missing (an int8 cache needs float32 scales of shape ({cache.shape[0]},))")
    _check_tensor("scales", scales, (torch.float32,), (1,))
    if scales.shape[0] != cache.shape[0]:
        raise ValueError(f"scales: has shape {tuple(scales.shape)} (expected ({cache.shape[0]},), one per cache row)")
    _check_device("scales", scales, cache.device, "cache")
    if written and not scales.is_contiguous():
        raise ValueError("scales: is not contiguous (expected a contiguous tensor: it is written in place)")
    if written and shares_memory(scales, cache):
        raise ValueError("scales: shares memory with cache (expected separate tensors)")


def check_gather(cache, scales, indices, out_dtype) -> None:
    _check_tensor("cache", cache, _CACHE_DTYPES, (2,))
    if not cache.is_contiguous():
        raise ValueError("cache: is not contiguous (expected a contiguous tensor)")
    _check_scales(scales, cache, written=False)
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices: got {type(indices).__name__} (expected a torch.Tensor)")
    _check_index("indices", indices, indices.numel(), cache.device, "cache")
    if out_dtype not in _GATHER_OUT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not supported (expected one of {_names(_GATHER_OUT_DTYPES)})")


PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_dense(t: Tensor) -> bool:
    """Contiguous in some memory format: the kernels then walk it as one flat array."""
    if t.is_contiguous():
        return True
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()])


def _check_like(name: str, t, p: Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """`t` is read or written as p.numel() values laid out as `p`'s."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: got {type(t).__name__} (expected a torch.Tensor)")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (expected one of {_names(dtypes)})")
    if t.shape != p.shape or t.stride() != p.stride() or t.device != p.device:
        raise ValueError(f"{name}: has shape {tuple(t.shape)}, strides {t.stride()} on {t.device} (expected the "
                         f"param's {tuple(p.shape)}, {p.stride()} on {p.device})")


def _check_scalar(name: str, t, device: torch.device) -> None:
    if t is None:
        return
    _check_tensor(name, t, (torch.float32,), (0, 1))
    if t.numel() != 1:
        raise ValueError(f"{name}: has shape {tuple(t.shape)} (expected one value)")
    _check_device(name, t, device, "the params")


def check_adam(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, amsgrad,
                grad_scale, found_inf) -> None:
    n = len(params)
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    lists.update(masters=masters) if masters else None
    lists.update(max_exp_avg_sqs=max_exp_avg_sqs) if amsgrad else None
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"{name}: has {len(values)} tensors (expected {n}, one per param)")
    if not amsgrad and max_exp_avg_sqs:
        raise ValueError("max_exp_avg_sqs: given without amsgrad (expected an empty list)")
    if n == 0:
        return
    if not all(isinstance(t, Tensor) for values in (params, *lists.values()) for t in values):
        _find_adam_culprit(params, lists)
    # Whole-list comparisons first (a step of 160 tensors checks in ~0.1 ms); the walk in
    # _find_adam_culprit only runs to name what differs. Strides and element counts, not shapes
    # (torch.Size is 20x slower to make): two dense tensors with both equal are walked alike.
    layouts = [(p.stride(), p.numel(), p.device) for p in params]
    first = params[0]
    ok = (first.dtype in PARAM_DTYPES and all(p.dtype == first.dtype for p in params)
          and all(p.layout == torch.strided and is_dense(p) for p in params)
          and grads[0].dtype in (first.dtype, torch.float32) and all(g.dtype == grads[0].dtype for g in grads)
          and all(v.dtype == torch.float32 for name in ("masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
                  if name in lists for v in lists[name])
          and all([(t.stride(), t.numel(), t.device) for t in lists[name]] == layouts
                  for name in ("grads", "masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs") if name in lists)
          and all(p.device == first.device for p in params)
          and all(s.dtype == torch.float32 and s.numel() == 1 and s.device == first.device for s in steps))
    if not ok:
        _find_adam_culprit(params, lists)
    for name, value in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _check_scalar(name, value, first.device)


def _find_adam_culprit(params, lists) -> None:
    """Raises the error naming the first tensor check_adam's list comparisons found wrong."""
    first = params[0]
    grad_dtypes = (first.dtype, torch.float32) if isinstance(first, Tensor) else ()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}]: got {type(p).__name__} (expected a torch.Tensor)")
        if p.dtype not in PARAM_DTYPES or p.dtype != first.dtype:
            raise TypeError(f"params[{i}]: dtype {p.dtype} (expected params[0]'s, one of {_names(PARAM_DTYPES)})")
        _check_device(f"params[{i}]", p, first.device, "params[0]")
        if p.layout != torch.strided or not is_dense(p):
            raise ValueError(f"params[{i}]: is not contiguous (expected a contiguous or channels_last tensor)")
        grads = lists["grads"]
        _check_like(f"grads[{i}]", grads[i], p, grad_dtypes if i == 0 else (grads[0].dtype,))
        for name in ("masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            if name in lists:
                _check_like(f"{name}[{i}]", lists[name][i], p, (torch.float32,))
        _check_scalar(f"steps[{i}]", lists["steps"][i], first.device)
    raise AssertionError("check_adam found a fault _find_adam_culprit could not name")  # pragma: no cover
