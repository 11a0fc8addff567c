"""torch.library ops: schema, CPU/CUDA kernels, fake (shape-only) implementation and autograd of
every fasttl op, so each works under torch.compile and passes torch.library.opcheck.

The native kernels take raw pointers, so every op implementation here validates all it passes
on: dtypes, devices, dims, sizes, strides and index ranges (``torch.ops.fasttl.*`` called
directly raises ValueError/TypeError, never reads or writes out of bounds). The fake
implementations run the same metadata checks, so torch.compile refuses what eager refuses. Index
ranges depend on data: checked on the host for CPU tensors; on CUDA without a host sync (see
raise_device_errors): a bad index is replaced on the device by a harmless one and reported, by
name, as a ValueError at the next fasttl call after the GPU has run the call that received it.

The ops are defined with the low-level torch.library.Library API, not @custom_op: custom_op
wraps each kernel so that its first call imports torch._dynamo (1.3 s on a 2-core CPU), a
pause every script would pay at its first fasttl call."""
from __future__ import annotations

import math
import numbers
from collections import deque

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from fasttl._native import dtype_code, native, require_cuda_kernels, stream_handle


def _unit_column_stride(x: Tensor) -> Tensor:
    """Rows may be strided (a slice of a larger batch); columns must be contiguous."""
    return x if x.dim() == 2 and (x.stride(1) == 1 or x.size(1) <= 1) else x.contiguous()


# ---- argument checks shared by the kernels and the fake implementations --------------------------
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


def _as_int64(index: Tensor) -> Tensor:
    # The kernels walk a contiguous int64 array: a strided or int32 index would be misread.
    return index.to(torch.int64).contiguous()


# ---- index checks on CUDA without a host sync ----------------------------------------------------
# A CUDA call must not wait for the GPU to learn whether an index was bad. So on these devices
# the bad entries are replaced on the device (nothing out of bounds is ever touched), and whether
# there were any is copied behind the kernel into pinned host memory. The next fasttl op call that
# finds such a copy done raises its named ValueError; raise_device_errors() waits for them.
_SYNC_FREE_DEVICE_TYPES = ("cuda",)  # the tests add "cpu" to run these paths without a GPU
_MAX_PENDING = 1024
_pending: deque = deque()  # (host flag, cuda event or None, message), oldest first


def _checks_on_device(t: Tensor) -> bool:
    return t.device.type in _SYNC_FREE_DEVICE_TYPES


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _defer_error(bad_any: Tensor, message: str) -> None:
    """Reports `message` later if the 0-dim bool `bad_any` turns out true; no host sync now."""
    if _capturing(bad_any.device):
        # Inside a CUDA graph nothing can be waited on: a device-side assert stops the replay.
        torch._assert_async(~bad_any, message)
        return
    if bad_any.device.type == "cuda":
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(bad_any, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(bad_any.device))  # the stream the copy went on
    else:  # the CPU stand-in of the tests: the value is there already
        flag, done = bad_any, None
    _pending.append((flag, done, message))
    if len(_pending) > _MAX_PENDING and _pending[0][1] is not None:
        _pending[0][1].synchronize()  # the GPU is far behind: wait for the oldest check (rare)


def _raise_ready(wait: bool) -> None:
    """Raises the first reported bad index among the finished checks (all of them when `wait`)."""
    kept = deque()
    error = None
    while _pending:
        flag, done, message = _pending.popleft()
        if done is not None and not wait and not done.query():
            kept.append((flag, done, message))
            continue
        if done is not None and wait:
            done.synchronize()
        # Host memory (pinned): numpy() cannot read a device tensor, so this never syncs.
        if error is None and bool(flag.numpy()):
            error = message
    _pending.extend(kept)
    if error is not None:
        _pending.clear()  # one bad batch, one error
        raise ValueError(error)


def raise_device_errors() -> None:
    """Waits for every pending CUDA index check of fasttl's ops and raises the first bad index
    found as a ValueError naming the argument (a host sync: call it where one costs nothing, e.g.
    at the end of an epoch). Without this, such an error surfaces at the next fasttl op call once
    the GPU has run the call that received the index."""
    if _pending and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        _raise_ready(wait=True)


def _raise_reported(device: torch.device) -> None:
    """At the start of an op on a sync-free device: the errors of earlier calls that are known."""
    if _pending and not _capturing(device):
        _raise_ready(wait=False)


def _check_range(name: str, index: Tensor, limit: int, ignore_index: Optional[int] = None,
                 replacement: Optional[int] = None) -> Tensor:
    """Values in [0, limit) (or equal to ignore_index). Returns the index safe to hand to a kernel:
    on a sync-free device, bad entries are replaced by `replacement` (default: ignore_index, else 0)."""
    if index.numel() == 0:
        return index
    bad = (index < 0) | (index >= limit)
    if ignore_index is not None:
        bad &= index != ignore_index
    allowed = f"[0, {limit})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
    if _checks_on_device(index):
        _defer_error(bad.any(), f"{name}: an index out of range (expected values in {allowed}) reached a "
                                f"{index.device.type} call, which used a valid one in its place (its result is "
                                "wrong; nothing outside the tensors was touched)")
        if replacement is None:
            replacement = 0 if ignore_index is None else ignore_index
        return torch.where(bad, torch.full_like(index, replacement), index)
    if bool(bad.any()):
        raise ValueError(f"{name}: index {index[bad][:5].tolist()} out of range (expected values in {allowed})")
    return index


def _check_unique(name: str, index: Tensor) -> None:
    """Distinct values: two writes to one row race (OpenMP threads, CUDA blocks) and may mix.
    Negative entries are rows the kernel skips (bad rows replaced by _check_range)."""
    if index.numel() < 2:
        return
    ordered = index.sort().values
    repeated = ordered[1:] == ordered[:-1]
    if _checks_on_device(index):
        _defer_error((repeated & (ordered[1:] >= 0)).any(),
                     f"{name}: a row index repeated (expected distinct rows) in a {index.device.type} call; "
                     "its rows may hold a mix of the repeated writes")
    elif bool(repeated.any()):
        raise ValueError(f"{name}: row {ordered[1:][repeated][:5].tolist()} repeated (expected distinct rows)")


def _shares_memory(a: Tensor, b: Optional[Tensor]) -> bool:
    if b is None or a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":
        return False  # meta storages all sit at address 0
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# Temperatures where the loss is within 1e-3 of the float64 formula for every finite input whose
# loss fits in fp32 (csrc/include/fasttl/distill.h); outside, even float64 cannot tell the KL
# from its rounding (T = 1e20: every softmax is uniform to the last bit).
TEMPERATURE_RANGE = (1e-2, 1e3)


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


def _check_distill_rows(student, teacher, target, temperature: float, alpha: float,
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


def _check_pool_store(src, cache, scales, rows) -> None:
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
    if written and _shares_memory(scales, cache):
        raise ValueError("scales: shares memory with cache (expected separate tensors)")


def _check_gather(cache, scales, indices, out_dtype) -> None:
    _check_tensor("cache", cache, _CACHE_DTYPES, (2,))
    if not cache.is_contiguous():
        raise ValueError("cache: is not contiguous (expected a contiguous tensor)")
    _check_scales(scales, cache, written=False)
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices: got {type(indices).__name__} (expected a torch.Tensor)")
    _check_index("indices", indices, indices.numel(), cache.device, "cache")
    if out_dtype not in _GATHER_OUT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not supported (expected one of {_names(_GATHER_OUT_DTYPES)})")


_LIB = torch.library.Library("fasttl", "DEF")
_LIB.define("distill_rows(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
            "int ignore_index, float label_smoothing=0.0) -> (Tensor, Tensor)")
_LIB.define("distill_loss(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
            "int ignore_index, float scale, float label_smoothing=0.0) -> (Tensor, Tensor)")
_LIB.define("pool_store(Tensor src, Tensor(a!) cache, Tensor(b!)? scales, Tensor rows) -> ()")
_LIB.define("gather(Tensor cache, Tensor? scales, Tensor indices, ScalarType out_dtype) -> Tensor")


def _kernel(name: str):
    """Registers the decorated function as the CPU and CUDA kernel of fasttl::name."""
    def register(fn):
        for key in ("CPU", "CUDA"):
            _LIB.impl(name, fn, key)
        return fn
    return register


def _fake(name: str):
    def register(fn):
        torch.library.register_fake(f"fasttl::{name}", fn, lib=_LIB)
        return fn
    return register


@_kernel("distill_rows")
def _distill_rows_kernel(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float,
                         alpha: float, ignore_index: int, label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Per-row distillation loss (fp32, shape (B,)) and its gradient w.r.t. the student logits
    (student dtype, shape (B, C)), computed in one native call."""
    return _distill_checked(student, teacher, target, temperature, alpha, ignore_index, 1.0, label_smoothing)


def _distill_checked(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float,
                     alpha: float, ignore_index: int, grad_scale: float,
                     label_smoothing: float) -> Tuple[Tensor, Tensor]:
    """Both distillation ops' eager path: checks the inputs, then (loss_rows, grad_scale * grad)."""
    _check_distill_rows(student, teacher, target, temperature, alpha, label_smoothing)
    if not math.isfinite(grad_scale):
        raise ValueError(f"scale: is {grad_scale} (expected a finite number)")
    _raise_reported(student.device)
    student = _unit_column_stride(student)
    teacher = _unit_column_stride(teacher)
    rows, classes = student.shape
    loss_rows = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty((rows, classes), dtype=student.dtype, device=student.device)
    if target is not None:
        target = _check_range("target", _as_int64(target), classes, ignore_index=int(ignore_index))
    run_distill_rows(student, teacher, target, temperature, alpha, ignore_index, loss_rows, grad, grad_scale,
                     label_smoothing)
    return loss_rows, grad


def run_distill_rows(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float,
                     alpha: float, ignore_index: int, loss_rows: Tensor, grad: Tensor,
                     grad_scale: float = 1.0, label_smoothing: float = 0.0) -> None:
    """Calls the native kernel into given outputs (unit column strides, target int64); the
    gradient written is grad_scale * d(loss_rows[i])/d(student[i])."""
    rows, classes = student.shape
    if rows == 0:
        return
    args = (
        student.data_ptr(), student.stride(0), dtype_code(student),
        teacher.data_ptr(), teacher.stride(0), dtype_code(teacher),
        0 if target is None else target.data_ptr(), int(ignore_index),
        float(temperature), float(alpha), loss_rows.data_ptr(), grad.data_ptr(), rows, classes,
        float(grad_scale), float(label_smoothing),
    )
    if student.device.type == "cuda":
        require_cuda_kernels("distill_rows_cuda")
        with torch.cuda.device(student.device):
            native.distill_rows_cuda(*args, stream_handle(student.device))
    else:
        native.distill_rows_cpu(*args)


@_fake("distill_rows")
def _distill_rows_fake(student, teacher, target, temperature, alpha, ignore_index, label_smoothing=0.0):
    _check_distill_rows(student, teacher, target, temperature, alpha, label_smoothing)
    rows, classes = student.shape
    return student.new_empty((rows,), dtype=torch.float32), student.new_empty((rows, classes))


def _distill_setup(ctx, inputs, output, smoothing_at: int):
    ctx.save_for_backward(output[1])
    # Kept for a double backward only, which recomputes the gradient with differentiable torch ops
    # (not saved_tensors: a first-order backward must not depend on them).
    ctx.distill_inputs = tuple(inputs[:6]) + (inputs[smoothing_at] if len(inputs) > smoothing_at else 0.0,)
    ctx.input_count = len(inputs)
    ctx.loss_scale = inputs[6] if smoothing_at == 7 else 1.0
    # The gradient output is never differentiated; without this autograd would fill a (B, C)
    # buffer of zeros for it on every backward.
    ctx.set_materialize_grads(False)


def _distill_rows_setup(ctx, inputs, output):
    _distill_setup(ctx, inputs, output, smoothing_at=6)


def _distill_loss_setup(ctx, inputs, output):
    _distill_setup(ctx, inputs, output, smoothing_at=7)


def _differentiable_grad(ctx) -> Tensor:
    """d(loss_rows)/d(student) as a function of the student that autograd can differentiate:
    what backward returns under create_graph=True, so that a second derivative (a Hessian-vector
    product, gradient penalties) is the derivative of the same gradient."""
    from fasttl import _reference

    student, teacher, target, temperature, alpha, ignore_index, label_smoothing = ctx.distill_inputs
    return _reference.distillation_row_grad(student, teacher, target, temperature=temperature, alpha=alpha,
                                            ignore_index=ignore_index, label_smoothing=label_smoothing)


def _times_upstream(grad: Tensor, upstream: Tensor) -> Tensor:
    """grad * upstream, computed in fp32 and stored in the grad's dtype: GradScaler's 65536 times
    a mean's 1/B fits in fp16, while 65536 itself rounded to fp16 first is inf. A new buffer, as
    torch's losses give: the saved one stays as it was, so a retained graph's second backward
    (with any upstream gradient) reads it unchanged."""
    return (grad * upstream).to(grad.dtype)


def _distill_rows_backward(ctx, grad_loss_rows, _grad_of_grad):
    # The forward already holds d(loss_i)/d(student_i); backward only scales it by each row's
    # upstream gradient (into a new buffer). The teacher gets no gradient, by design.
    nones = (None,) * (ctx.input_count - 1)
    # contiguous(): after a mean/sum the upstream gradient is an expanded scalar, and a
    # stride-0 broadcast operand sends aten::mul down a slow path (15x here).
    scale = grad_loss_rows.float().contiguous().unsqueeze(1)
    if torch.is_grad_enabled():  # create_graph=True
        return (_differentiable_grad(ctx) * scale).to(ctx.distill_inputs[0].dtype), *nones
    (grad,) = ctx.saved_tensors
    return _times_upstream(grad, scale), *nones


torch.library.register_autograd("fasttl::distill_rows", _distill_rows_backward, setup_context=_distill_rows_setup,
                                lib=_LIB)
distill_rows = torch.ops.fasttl.distill_rows.default


# ---- distill_loss: the reduced loss, its scale folded into the forward's gradient ----------------
# For reduction "sum" or "mean" the upstream gradient of every row is known before the kernel runs
# (1, or 1 / counted rows), so the kernel writes the final gradient and a backward reached with an
# upstream gradient of 1 (loss.backward() on the loss itself, the common case) returns it as it is:
# no second pass over a (B, C) buffer.
@_kernel("distill_loss")
def _distill_loss_kernel(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float,
                         alpha: float, ignore_index: int, scale: float,
                         label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor]:
    """scale * (sum of the per-row losses), fp32 0-dim, and its gradient w.r.t. the student
    (student dtype, (B, C)), in one native call."""
    loss_rows, grad = _distill_checked(student, teacher, target, temperature, alpha, ignore_index, scale,
                                       label_smoothing)
    return loss_rows.sum() * scale, grad


@_fake("distill_loss")
def _distill_loss_fake(student, teacher, target, temperature, alpha, ignore_index, scale, label_smoothing=0.0):
    _check_distill_rows(student, teacher, target, temperature, alpha, label_smoothing)
    return student.new_empty((), dtype=torch.float32), student.new_empty(student.shape)


def _distill_loss_backward(ctx, grad_loss, _grad_of_grad):
    nones = (None,) * (ctx.input_count - 1)
    if torch.is_grad_enabled():  # create_graph=True
        return (_differentiable_grad(ctx) * (grad_loss.float() * ctx.loss_scale)).to(ctx.distill_inputs[0].dtype), *nones
    (grad,) = ctx.saved_tensors
    if type(grad) is torch.Tensor and not torch.compiler.is_compiling() and grad_loss.device.type == "cpu" and \
            float(grad_loss) == 1.0:
        # The forward wrote the final gradient, and fasttl never writes it again. Autograd may hand
        # this very buffer on as the leaf's .grad: changed there in place (a clip) before a retained
        # graph's second backward, it is refused by autograd's version check, not misread.
        return grad, *nones
    # (1, 1): a dimensioned fp32 operand, so the product is taken in fp32 (a 0-dim one would be
    # rounded to the grad's dtype first)
    return _times_upstream(grad, grad_loss.float().reshape(1, 1)), *nones


torch.library.register_autograd("fasttl::distill_loss", _distill_loss_backward, setup_context=_distill_loss_setup,
                                lib=_LIB)
distill_loss = torch.ops.fasttl.distill_loss.default


# ---- adam_step: the fused Adam/AdamW update of one (device, dtype) group, in place ---------------
# A torch.library op (with a fake implementation) so that torch.compile keeps an optimizer step
# in one graph; the native call behind it takes raw pointers, so the op checks every tensor it
# is handed: one device, the param's shape and memory layout for every state tensor, the dtypes.
_LIB.define("adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] exp_avgs, "
            "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] steps, float lr, Tensor? lr_tensor, "
            "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
            "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def _check_adam(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, amsgrad,
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
    ok = (first.dtype in _PARAM_DTYPES and all(p.dtype == first.dtype for p in params)
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
    """Raises the error naming the first tensor _check_adam's list comparisons found wrong."""
    first = params[0]
    grad_dtypes = (first.dtype, torch.float32) if isinstance(first, Tensor) else ()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}]: got {type(p).__name__} (expected a torch.Tensor)")
        if p.dtype not in _PARAM_DTYPES or p.dtype != first.dtype:
            raise TypeError(f"params[{i}]: dtype {p.dtype} (expected params[0]'s, one of {_names(_PARAM_DTYPES)})")
        _check_device(f"params[{i}]", p, first.device, "params[0]")
        if p.layout != torch.strided or not is_dense(p):
            raise ValueError(f"params[{i}]: is not contiguous (expected a contiguous or channels_last tensor)")
        grads = lists["grads"]
        _check_like(f"grads[{i}]", grads[i], p, grad_dtypes if i == 0 else (grads[0].dtype,))
        for name in ("masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            if name in lists:
                _check_like(f"{name}[{i}]", lists[name][i], p, (torch.float32,))
        _check_scalar(f"steps[{i}]", lists["steps"][i], first.device)
    raise AssertionError("_check_adam found a fault _find_adam_culprit could not name")  # pragma: no cover


def _address(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


@_kernel("adam_step")
def _adam_step_kernel(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1,
                      beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_scale,
                      found_inf) -> None:
    """One fused Adam/AdamW step, in place, over params of one device and dtype (one native
    call). `masters`: fp32 master weights, one per param, or none (the params are updated
    themselves); `max_exp_avg_sqs`: one per param with amsgrad, else none. `steps`: each param's
    fp32 step count, already incremented. `lr_tensor`, when given, is read by the kernel in place
    of `lr` (no host sync); `grad_scale` divides the grads; a nonzero `found_inf` skips the step
    (on the device)."""
    _check_adam(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, amsgrad,
                grad_scale, found_inf)
    if not params:
        return
    n = len(params)
    masters = list(masters) or [None] * n
    max_exp_avg_sqs = list(max_exp_avg_sqs) or [None] * n
    _native_call(params[0].device, "adam_step",
                 [_address(t) for t in params], [_address(t) for t in grads], [_address(t) for t in masters],
                 [_address(t) for t in exp_avgs], [_address(t) for t in exp_avg_sqs],
                 [_address(t) for t in max_exp_avg_sqs], [t.numel() for t in params],
                 [_address(t) for t in steps], dtype_code(params[0]), dtype_code(grads[0]),
                 masters[0] is not None, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                 bool(decoupled_weight_decay), bool(amsgrad), bool(maximize), _address(grad_scale),
                 _address(found_inf), _address(lr_tensor))


@_fake("adam_step")
def _adam_step_fake(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1,
                    beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_scale, found_inf):
    _check_adam(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, amsgrad,
                grad_scale, found_inf)
    return None


adam_step = torch.ops.fasttl.adam_step.default


def _native_call(device: torch.device, name: str, *args) -> None:
    """Calls a native entry point that takes (cuda, ..., stream), on the tensors' device."""
    if device.type == "cuda":
        require_cuda_kernels(name)
        with torch.cuda.device(device):
            getattr(native, name)(True, *args, stream_handle(device))
    else:
        getattr(native, name)(False, *args, 0)


@_kernel("pool_store")
def _pool_store_kernel(src: Tensor, cache: Tensor, scales: Optional[Tensor], rows: Tensor) -> None:
    """Average-pools src (N, C, H, W) or (N, C) over H*W, converts to cache's dtype (int8: with a
    per-row scale into `scales`) and writes cache[rows[i]] for each i."""
    _check_pool_store(src, cache, scales, rows)
    _raise_reported(src.device)
    # A bad row becomes -1 on a sync-free device, which the kernels skip: no valid row is overwritten.
    rows = _check_range("rows", _as_int64(rows), cache.shape[0], replacement=-1)
    _check_unique("rows", rows)
    # An input that is a view of an output would be read while it is written.
    if _shares_memory(src, cache) or _shares_memory(src, scales):
        src = src.clone()
    if _shares_memory(rows, cache) or _shares_memory(rows, scales):
        rows = rows.clone()
    n, channels = src.shape[0], src.shape[1]
    if n == 0 or (channels == 0 and scales is None):
        return  # nothing to write (an int8 cache still gets the scales of its empty rows)
    src, strides = _pool_layout(src)
    hw = src[0, 0].numel() if channels else 1
    _native_call(src.device, "pool_store", src.data_ptr(), dtype_code(src), n, channels, hw, *strides,
                 cache.data_ptr(), dtype_code(cache), _address(scales), rows.data_ptr())


def _pool_layout(src: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
    """src and its (image, channel, pixel) element strides as the kernels read it. NCHW and
    channels_last (what a backbone under channels_last returns) are read as they are; anything
    else is copied to NCHW first. The strides are each format's canonical ones, which address the
    same elements whatever strides torch reports for dims of size 1."""
    channels = src.shape[1]
    if src.dim() == 2:
        src = src.contiguous()
        return src, (channels, 1, 1)
    hw = src.shape[2] * src.shape[3]
    if not src.is_contiguous() and src.is_contiguous(memory_format=torch.channels_last):
        return src, (hw * channels, 1, channels)
    src = src.contiguous()
    return src, (channels * hw, hw, 1)


@_fake("pool_store")
def _pool_store_fake(src, cache, scales, rows):
    _check_pool_store(src, cache, scales, rows)
    return None


pool_store = torch.ops.fasttl.pool_store.default


@_kernel("gather")
def _gather_kernel(cache: Tensor, scales: Optional[Tensor], indices: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[i] = cache[indices[i]] dequantized to out_dtype (float32 or bfloat16), contiguous."""
    _check_gather(cache, scales, indices, out_dtype)
    _raise_reported(cache.device)
    if cache.shape[0] == 0 and indices.numel():
        raise ValueError(f"indices: {indices.numel()} entries index an empty cache (expected none)")
    indices = _check_range("indices", _as_int64(indices), cache.shape[0])
    scales = None if scales is None else scales.contiguous()
    out = torch.empty((indices.numel(), cache.shape[1]), dtype=out_dtype, device=cache.device)
    if out.numel() == 0:
        return out  # also spares CUDA a launch of zero blocks
    _native_call(cache.device, "gather", cache.data_ptr(), dtype_code(cache), _address(scales), indices.data_ptr(),
                 indices.numel(), cache.shape[1], out.data_ptr(), dtype_code(out))
    return out


@_fake("gather")
def _gather_fake(cache, scales, indices, out_dtype):
    _check_gather(cache, scales, indices, out_dtype)
    return cache.new_empty((indices.shape[0], cache.shape[1]), dtype=out_dtype)


gather = torch.ops.fasttl.gather.default
