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

from typing import Optional, Tuple

import torch
from torch import Tensor

from fasttl._device_checks import check_range, check_unique, raise_reported
from fasttl._native import dtype_code, native, require_cuda_kernels, stream_handle
from fasttl._op_checks import as_int64, check_adam, check_distill_rows, check_gather, check_pool_store, shares_memory


def _unit_column_stride(x: Tensor) -> Tensor:
    """Rows may be strided (a slice of a larger batch); columns must be contiguous."""
    return x if x.dim() == 2 and (x.stride(1) == 1 or x.size(1) <= 1) else x.contiguous()


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
    check_distill_rows(student, teacher, target, temperature, alpha, label_smoothing)
    if not math.isfinite(grad_scale):
        raise ValueError(f"scale: is {grad_scale} (expected a finite number)")
    raise_reported(student.device)
    student = _unit_column_stride(student)
    teacher = _unit_column_stride(teacher)
    rows, classes = student.shape
    loss_rows = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty((rows, classes), dtype=student.dtype, device=student.device)
    if target is not None:
        target = check_range("target", as_int64(target), classes, ignore_index=int(ignore_index))
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
    check_distill_rows(student, teacher, target, temperature, alpha, label_smoothing)
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
    check_distill_rows(student, teacher, target, temperature, alpha, label_smoothing)
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
    check_adam(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, amsgrad,
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
    check_adam(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, amsgrad,
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
    check_pool_store(src, cache, scales, rows)
    raise_reported(src.device)
    # A bad row becomes -1 on a sync-free device, which the kernels skip: no valid row is overwritten.
    rows = check_range("rows", as_int64(rows), cache.shape[0], replacement=-1)
    check_unique("rows", rows)
    # An input that is a view of an output would be read while it is written.
    if shares_memory(src, cache) or shares_memory(src, scales):
        src = src.clone()
    if shares_memory(rows, cache) or shares_memory(rows, scales):
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
    check_pool_store(src, cache, scales, rows)
    return None


pool_store = torch.ops.fasttl.pool_store.default


@_kernel("gather")
def _gather_kernel(cache: Tensor, scales: Optional[Tensor], indices: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[i] = cache[indices[i]] dequantized to out_dtype (float32 or bfloat16), contiguous."""
    check_gather(cache, scales, indices, out_dtype)
    raise_reported(cache.device)
    if cache.shape[0] == 0 and indices.numel():
        raise ValueError(f"indices: {indices.numel()} entries index an empty cache (expected none)")
    indices = check_range("indices", as_int64(indices), cache.shape[0])
    scales = None if scales is None else scales.contiguous()
    out = torch.empty((indices.numel(), cache.shape[1]), dtype=out_dtype, device=cache.device)
    if out.numel() == 0:
        return out  # also spares CUDA a launch of zero blocks
    _native_call(cache.device, "gather", cache.data_ptr(), dtype_code(cache), _address(scales), indices.data_ptr(),
                 indices.numel(), cache.shape[1], out.data_ptr(), dtype_code(out))
    return out


@_fake("gather")
def _gather_fake(cache, scales, indices, out_dtype):
    check_gather(cache, scales, indices, out_dtype)
    return cache.new_empty((indices.shape[0], cache.shape[1]), dtype=out_dtype)


gather = torch.ops.fasttl.gather.default
