"""torch.library ops: schema, CPU/CUDA kernels, fake (shape-only) implementation and autograd of
every fasttl op, so each works under torch.compile and passes torch.library.opcheck. The public
functions validate user arguments; these check only what depends on data.

The ops are defined with the low-level torch.library.Library API, not @custom_op: custom_op
wraps each kernel so that its first call imports torch._dynamo (1.3 s on a 2-core CPU), a
pause every script would pay at its first fasttl call."""
from __future__ import annotations

import contextlib

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fasttl._native import dtype_code, native, require_cuda_kernels, stream_handle


def _unit_column_stride(x: Tensor) -> Tensor:
    """Rows may be strided (a slice of a larger batch); columns must be contiguous."""
    return x if x.dim() == 2 and (x.stride(1) == 1 or x.size(1) <= 1) else x.contiguous()


_LIB = torch.library.Library("fasttl", "DEF")
_LIB.define("distill_rows(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
            "int ignore_index) -> (Tensor, Tensor)")
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
                         alpha: float, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per-row distillation loss (fp32, shape (B,)) and its gradient w.r.t. the student logits
    (student dtype, shape (B, C)), computed in one native call."""
    student = _unit_column_stride(student)
    teacher = _unit_column_stride(teacher)
    rows, classes = student.shape
    loss_rows = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty((rows, classes), dtype=student.dtype, device=student.device)
    if target is not None:
        target = target.to(torch.int64).contiguous()
        bad = (target != ignore_index) & ((target < 0) | (target >= classes))
        if bool(bad.any()):
            raise ValueError(
                f"target: class indices must be in [0, {classes}) or equal ignore_index={ignore_index}; "
                f"got {target[bad][:5].tolist()}"
            )
    run_distill_rows(student, teacher, target, temperature, alpha, ignore_index, loss_rows, grad)
    return loss_rows, grad


def run_distill_rows(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float,
                     alpha: float, ignore_index: int, loss_rows: Tensor, grad: Tensor) -> None:
    """Calls the native kernel into given outputs (unit column strides, target int64)."""
    rows, classes = student.shape
    if rows == 0:
        return
    args = (
        student.data_ptr(), student.stride(0), dtype_code(student),
        teacher.data_ptr(), teacher.stride(0), dtype_code(teacher),
        0 if target is None else target.data_ptr(), int(ignore_index),
        float(temperature), float(alpha), loss_rows.data_ptr(), grad.data_ptr(), rows, classes,
    )
    if student.device.type == "cuda":
        require_cuda_kernels("distill_rows_cuda")
        with torch.cuda.device(student.device):
            native.distill_rows_cuda(*args, stream_handle(student.device))
    else:
        native.distill_rows_cpu(*args)


@_fake("distill_rows")
def _distill_rows_fake(student, teacher, target, temperature, alpha, ignore_index):
    rows, classes = student.shape
    return student.new_empty((rows,), dtype=torch.float32), student.new_empty((rows, classes))


def _distill_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    # The gradient output is never differentiated; without this autograd would fill a (B, C)
    # buffer of zeros for it on every backward.
    ctx.set_materialize_grads(False)


def _distill_rows_backward(ctx, grad_loss_rows, _grad_of_grad):
    # The forward already holds d(loss_i)/d(student_i); backward only scales it by each row's
    # upstream gradient, in place: the buffer is ours (the public function drops that output),
    # and a second backward through a retained graph is refused by autograd's version check
    # rather than reading a scaled buffer. The teacher gets no gradient, by design.
    (grad,) = ctx.saved_tensors
    # contiguous(): after a mean/sum the upstream gradient is an expanded scalar, and a
    # stride-0 broadcast operand sends aten::mul down a slow path (15x here).
    scale = grad_loss_rows.to(grad.dtype).contiguous().unsqueeze(1)
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        # Being traced (torch.compile / AOT autograd): stay functional, the compiler plans memory.
        return grad * scale, None, None, None, None, None
    with torch.no_grad():
        grad.mul_(scale)
    return grad, None, None, None, None, None


torch.library.register_autograd("fasttl::distill_rows", _distill_rows_backward, setup_context=_distill_rows_setup,
                                lib=_LIB)
distill_rows = torch.ops.fasttl.distill_rows.default


def _no_context():
    return contextlib.nullcontext()


def _address(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def adam_step(*, params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Optional[Tensor]],
              exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
              max_exp_avg_sqs: Sequence[Optional[Tensor]], steps: Sequence[Tensor], lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool,
              maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """One fused Adam/AdamW step, in place, over params of one device and dtype (one native
    call). The optimizer (fasttl/optim.py) has checked dtypes, shapes and contiguity; steps are
    fp32 0-dim tensors on the params' device, already incremented."""
    if not params:
        return
    device = params[0].device
    if device.type == "cuda":
        require_cuda_kernels("adam_step")
    with torch.cuda.device(device) if device.type == "cuda" else _no_context():
        native.adam_step(
            device.type == "cuda",
            [_address(t) for t in params], [_address(t) for t in grads], [_address(t) for t in masters],
            [_address(t) for t in exp_avgs], [_address(t) for t in exp_avg_sqs],
            [_address(t) if amsgrad else 0 for t in max_exp_avg_sqs], [t.numel() for t in params],
            [_address(t) for t in steps], dtype_code(params[0]), dtype_code(grads[0]),
            masters[0] is not None, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            bool(decoupled_weight_decay), bool(amsgrad), bool(maximize), _address(grad_scale), _address(found_inf),
            stream_handle(device),
        )


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
    src = src.contiguous()
    n, channels = src.shape[0], src.shape[1]
    hw = src[0, 0].numel() if n and channels else 1
    _native_call(src.device, "pool_store", src.data_ptr(), dtype_code(src), n, channels, hw, cache.data_ptr(),
                 dtype_code(cache), _address(scales), rows.data_ptr())


@_fake("pool_store")
def _pool_store_fake(src, cache, scales, rows):
    return None


pool_store = torch.ops.fasttl.pool_store.default


@_kernel("gather")
def _gather_kernel(cache: Tensor, scales: Optional[Tensor], indices: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[i] = cache[indices[i]] dequantized to out_dtype (float32 or bfloat16), contiguous."""
    out = torch.empty((indices.numel(), cache.shape[1]), dtype=out_dtype, device=cache.device)
    _native_call(cache.device, "gather", cache.data_ptr(), dtype_code(cache), _address(scales), indices.data_ptr(),
                 indices.numel(), cache.shape[1], out.data_ptr(), dtype_code(out))
    return out


@_fake("gather")
def _gather_fake(cache, scales, indices, out_dtype):
    return cache.new_empty((indices.shape[0], cache.shape[1]), dtype=out_dtype)


gather = torch.ops.fasttl.gather.default
