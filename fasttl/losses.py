"""Fused distillation loss: the public function and its argument checks."""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fasttl import _device_checks, _op_checks, _ops, _reference

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EAGER_DTYPES = (torch.float64,)  # through the plain-PyTorch formula (fasttl._reference), as torch would
_REDUCTIONS = ("mean", "sum", "none")
_TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)  # what cross_entropy takes, and int32


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: got {type(x).__name__} (expected a torch.Tensor)")
    if x.dtype not in _LOGIT_DTYPES + _EAGER_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (expected float32, bfloat16, float16 or "
                        "float64 logits)")
    if x.dim() < 1:
        raise ValueError(f"{name}: has shape {tuple(x.shape)} (expected (..., classes), e.g. (batch, classes))")


def _check_arguments(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index,
                     label_smoothing, weight) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: has shape {tuple(teacher_logits.shape)} "
                         f"(expected student_logits' shape {tuple(student_logits.shape)})")
    if student_logits.size(-1) < 1:
        raise ValueError(f"student_logits: has shape {tuple(student_logits.shape)} (expected at least one class)")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits: is on {teacher_logits.device} "
                         f"(expected student_logits' device, {student_logits.device})")
    leading = tuple(student_logits.shape[:-1])
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"target: got {type(target).__name__} (expected a torch.Tensor of class indices)")
        if target.dtype not in _TARGET_DTYPES:
            raise TypeError(f"target: dtype {target.dtype} is not supported (expected int64, int32 or uint8 class "
                            "indices; probability targets are what teacher_logits is for)")
        if tuple(target.shape) != leading:
            raise ValueError(f"target: has shape {tuple(target.shape)} (expected {leading}, the logits' shape "
                             "without the class dim)")
        if target.device != student_logits.device:
            raise ValueError(f"target: is on {target.device} "
                             f"(expected student_logits' device, {student_logits.device})")
    _op_checks.check_temperature("temperature", temperature)
    _op_checks.check_number("alpha", alpha, 0.0, 1.0)
    if isinstance(ignore_index, bool) or not hasattr(ignore_index, "__index__") or \
            not -2**63 <= operator.index(ignore_index) < 2**63:
        raise TypeError(f"ignore_index: is {ignore_index!r} (expected an int64 class index)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: is {reduction!r} (expected one of {_REDUCTIONS})")
    _op_checks.check_label_smoothing(label_smoothing)
    if weight is not None:
        _check_weight(weight, student_logits, target, label_smoothing)


def _counted(target: Tensor, ignore_index: int) -> Tensor:
    """The rows whose target is not ignore_index, compared as int64 (as the kernel does): an index
    an int32 target can't hold never matches (torch would wrap 2**32 to 0 and leave out class 0)."""
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _mean_divisor(rows: int, target: Optional[Tensor], ignore_index: int, weights: Optional[Tensor]):
    """What "mean" divides by: the counted rows, or with class weights their weights' sum (as
    cross_entropy: a sum of 0 over counted rows gives +-inf). An all-ignored batch divides by 1:
    its loss is 0 with gradient 0, where torch's losses give NaN. No host sync either way."""
    if target is None:
        return max(rows, 1)
    present = _counted(target, ignore_index)
    total = weights.sum() if weights is not None else present.sum()
    return torch.where(present.any(), total, torch.ones_like(total))


def _check_weight(weight, student_logits: Tensor, target, label_smoothing) -> None:
    classes = student_logits.size(-1)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight: got {getattr(weight, 'dtype', type(weight).__name__)} (expected a floating-point "
                        f"tensor of {classes} class weights)")
    if tuple(weight.shape) != (classes,):
        raise ValueError(f"weight: has shape {tuple(weight.shape)} (expected ({classes},), one weight per class)")
    if weight.dtype == torch.float64 and student_logits.dtype != torch.float64:
        raise TypeError(f"weight: torch.float64 for {student_logits.dtype} logits (expected float32 or the logits' "
                        "dtype; cross_entropy refuses a wider weight too)")
    if weight.device != student_logits.device:
        raise ValueError(f"weight: is on {weight.device} (expected student_logits' device, {student_logits.device})")
    if target is None:
        raise ValueError("weight: class weights need a target (without one, a row has no class to weigh it by)")
    if label_smoothing:
        raise ValueError("weight: not supported together with label_smoothing (torch weighs the smoothed term per "
                         "class, not per row); pass one of them")


def _out_dtype(student_logits: Tensor) -> torch.dtype:
    """As torch's losses: fp32 under autocast (cross_entropy and kl_div are on autocast's fp32
    list), else the logits' dtype."""
    device_type = student_logits.device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        autocast = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta)
        autocast = False
    return torch.float32 if autocast and student_logits.dtype in (torch.float16, torch.bfloat16) else \
        student_logits.dtype


def _eager(student_logits: Tensor, teacher_logits: Tensor) -> bool:
    """float64 logits, torch.func transforms (grad, vmap, jacrev) and forward-mode AD (dual
    tensors) take the plain-PyTorch formula: the fused op has no float64 kernel, and its autograd
    is reverse mode only (a dual tensor through it would lose its tangent without a word)."""
    return (student_logits.dtype in _EAGER_DTYPES or torch._C._are_functorch_transforms_active()
            or any(forward_ad.unpack_dual(x).tangent is not None for x in (student_logits, teacher_logits)))


def _known_scale(student_logits: Tensor, target: Optional[Tensor], reduction: str, ignore_index: int):
    """The factor of a "sum" or "mean" over the rows when it is known without waiting for a GPU
    (None otherwise): then the kernel folds it into the gradient it writes."""
    if reduction == "sum":
        return 1.0
    if reduction == "mean":
        if target is None:
            return 1.0 / max(student_logits.size(0), 1)
        # Counting the rows reads the target: off the sync-free devices (CUDA) and outside
        # torch.compile (where it would break the graph) that costs nothing worth avoiding.
        host_readable = target.device.type not in _device_checks.SYNC_FREE_DEVICE_TYPES + ("meta",) and \
            student_logits.device.type not in _device_checks.SYNC_FREE_DEVICE_TYPES
        if host_readable and not torch.compiler.is_compiling():
            return 1.0 / max(int(_counted(target, ignore_index).sum()), 1)
    return None


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      temperature: float = 1.0, alpha: float = 0.5, reduction: str = "mean",
                      ignore_index: int = -100, label_smoothing: float = 0.0,
                      weight: Optional[Tensor] = None) -> Tensor:
    r"""Knowledge-distillation loss (Hinton et al. 2015), fused into one native pass per row.

    For row :math:`i` with student logits :math:`s_i`, teacher logits :math:`t_i`, target
    :math:`y_i` and temperature :math:`T`::

        loss_i = alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T))
                 + (1 - alpha) * CE(s_i, y_i)

    where ``CE`` is ``torch.nn.functional.cross_entropy`` of the row (with ``label_smoothing``
    eps: ``-(1 - eps) log softmax(s)_y - eps mean_c log softmax(s)_c``). Without ``target`` the
    loss is the soft term alone (``alpha`` taken as 1). Rows whose target equals ``ignore_index``
    count in neither term. ``weight`` (C,) scales each row's loss by its target class's weight,
    and ``"mean"`` then divides by the counted rows' weights, so that with ``alpha=0`` it is
    ``cross_entropy(weight=...)``. ``reduction="mean"`` divides the sum by the number of counted
    rows (0 when none count), ``"sum"`` adds them, ``"none"`` returns the per-row losses.

    The forward pass also computes the gradient with respect to ``student_logits`` (online in
    fp32, with the row maxima subtracted); backward only scales it, and for ``"sum"`` and
    ``"mean"`` (the row count known on the host) the reduction's factor is already in it, so a
    backward with upstream gradient 1 (``loss.backward()``) does no work at all. **No gradient flows to the
    teacher**: ``teacher_logits`` is treated as a constant, as it is in distillation.

    As a torch loss: fp32 under autocast; a double backward (``create_graph=True``) differentiates
    the same gradient written with torch ops; float64 logits and ``torch.func`` transforms take the
    plain-PyTorch formula (``fasttl._reference``). Each row's loss is within 1e-3 relative of the
    float64 formula for any finite input (a row whose fp32 sums can't promise that is redone in
    float64 inside the kernel); a loss beyond float32's range is inf, as in torch's fp32 formula.

    Args:
        student_logits: (..., C) float32, bfloat16, float16 or float64; rows may be strided.
        teacher_logits: the same shape, same device; any of the same dtypes.
        target: optional (...) int64/int32 class indices in [0, C) or ``ignore_index`` (any
            stride). One out of range raises ValueError on the CPU. On CUDA the check needs no
            host sync: the row is left out on the device and the ValueError comes at the next
            fasttl call once the GPU has run this one (or at fasttl.raise_device_errors()).
        temperature: softening temperature T in [0.01, 1000].
        alpha: weight of the soft term, in [0, 1].
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: target value of rows to leave out.
        label_smoothing: eps in [0, 1] of the hard term, as ``cross_entropy``'s.
        weight: optional (C,) class weights (needs ``target``; not with ``label_smoothing``).

    Returns:
        A scalar (or the logits' shape without the class dim, for ``"none"``): fp32 under
        autocast, else in the student's dtype. NaN or Inf in the logits propagate into the loss,
        as in PyTorch.

    Example::

        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> teacher = torch.randn(8, 10)
        >>> y = torch.randint(0, 10, (8,))
        >>> fasttl.distillation_loss(student, teacher, y, temperature=4.0, alpha=0.9).backward()
    """
    _check_arguments(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index,
                     label_smoothing, weight)
    # numpy scalars as Python floats: a numpy scalar times a tensor can become a numpy array
    temperature, alpha, label_smoothing = float(temperature), float(alpha), float(label_smoothing)
    if _eager(student_logits, teacher_logits):
        return _reference.distillation_loss(student_logits, teacher_logits.to(student_logits.dtype),
                                            None if target is None else target.long(), temperature=temperature,
                                            alpha=alpha, reduction=reduction, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing, weight=weight)
    if teacher_logits.dtype in _EAGER_DTYPES:
        teacher_logits = teacher_logits.float()  # the kernel computes in fp32: nothing is lost
    out_dtype = _out_dtype(student_logits)
    leading = student_logits.shape[:-1]
    classes = student_logits.size(-1)
    student, teacher = student_logits.reshape(-1, classes), teacher_logits.detach().reshape(-1, classes)
    target = None if target is None else target.reshape(-1)
    if target is not None and target.dtype == torch.uint8:
        target = target.long()  # the kernel reads int64 or int32 indices
    options = (float(temperature), float(alpha), int(ignore_index))
    scale = None if weight is not None else _known_scale(student, target, reduction, int(ignore_index))
    if scale is not None:
        loss, _ = _ops.distill_loss(student, teacher, target, *options, scale, float(label_smoothing))
        return loss.to(out_dtype)
    loss_rows, _ = _ops.distill_rows(student, teacher, target, *options, float(label_smoothing))
    factor = None
    if weight is not None:
        picked = weight[target.clamp(0, classes - 1)].float()  # an ignored row's weight chosen away, not times 0:
        counted = torch.where(_counted(target, int(ignore_index)), picked, torch.zeros_like(picked))  # inf * 0 = NaN
        if reduction != "none":
            counted, factor = _reference.scaled_to_one(counted)
        loss_rows = loss_rows * counted
    if reduction == "none":
        return loss_rows.reshape(leading).to(out_dtype)
    total = loss_rows.sum() if factor is None or reduction == "mean" else loss_rows.sum() * factor
    if reduction == "mean":
        total = total / _mean_divisor(student.size(0), target, int(ignore_index), None if weight is None else counted)
    return total.to(out_dtype)
