"""Fused distillation loss: the public function and its argument checks."""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import Tensor

from fasttl import _ops

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: got {type(x).__name__} (expected a torch.Tensor)")
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (expected float32, bfloat16 or float16 logits)")
    if x.dim() != 2:
        raise ValueError(f"{name}: has shape {tuple(x.shape)} (expected (batch, classes))")


def _check_arguments(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: has shape {tuple(teacher_logits.shape)} "
                         f"(expected student_logits' shape {tuple(student_logits.shape)})")
    if student_logits.size(1) < 1:
        raise ValueError(f"student_logits: has shape {tuple(student_logits.shape)} (expected at least one class)")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits: is on {teacher_logits.device} "
                         f"(expected student_logits' device, {student_logits.device})")
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"target: got {type(target).__name__} (expected a torch.Tensor of class indices)")
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"target: dtype {target.dtype} is not supported (expected int64 or int32 indices)")
        if target.shape != (student_logits.size(0),):
            raise ValueError(f"target: has shape {tuple(target.shape)} (expected ({student_logits.size(0)},))")
        if target.device != student_logits.device:
            raise ValueError(f"target: is on {target.device} "
                             f"(expected student_logits' device, {student_logits.device})")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: is {temperature!r} (expected a finite number > 0)")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: is {alpha!r} (expected a number in [0, 1])")
    if isinstance(ignore_index, bool) or not hasattr(ignore_index, "__index__") or \
            not -2**63 <= operator.index(ignore_index) < 2**63:
        raise TypeError(f"ignore_index: is {ignore_index!r} (expected an int64 class index)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: is {reduction!r} (expected one of {_REDUCTIONS})")


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
        host_readable = target.device.type not in _ops._SYNC_FREE_DEVICE_TYPES and \
            student_logits.device.type not in _ops._SYNC_FREE_DEVICE_TYPES
        if host_readable and not torch.compiler.is_compiling():
            return 1.0 / max(int((target != ignore_index).sum()), 1)
    return None


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      temperature: float = 1.0, alpha: float = 0.5, reduction: str = "mean",
                      ignore_index: int = -100) -> Tensor:
    r"""Knowledge-distillation loss (Hinton et al. 2015), fused into one native pass per row.

    For row :math:`i` with student logits :math:`s_i`, teacher logits :math:`t_i`, target
    :math:`y_i` and temperature :math:`T`::

        loss_i = alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T))
                 + (1 - alpha) * CE(s_i, y_i)

    where ``CE(s, y) = -log softmax(s)_y``. Without ``target`` the loss is the soft term alone
    (``alpha`` taken as 1). Rows whose target equals ``ignore_index`` count in neither term.
    ``reduction="mean"`` divides the sum by the number of counted rows (0 when none count),
    ``"sum"`` adds them, ``"none"`` returns the (B,) per-row losses.

    The forward pass also computes the gradient with respect to ``student_logits`` (online in
    fp32, with the row maxima subtracted); backward only scales it, and for ``"sum"`` and
    ``"mean"`` (the row count known on the host) the reduction's factor is already in it, so a
    backward with upstream gradient 1 (``loss.backward()``) does no work at all. **No gradient flows to the
    teacher**: ``teacher_logits`` is treated as a constant, as it is in distillation.

    Args:
        student_logits: (B, C) float32, bfloat16 or float16; rows may be strided.
        teacher_logits: (B, C), same device; any of the same dtypes.
        target: optional (B,) int64/int32 class indices in [0, C) or ``ignore_index`` (any
            stride). One out of range raises ValueError on the CPU. On CUDA the check needs no
            host sync: the row is left out on the device and the ValueError comes at the next
            fasttl call once the GPU has run this one (or at fasttl._ops.raise_device_errors()).
        temperature: softening temperature T > 0.
        alpha: weight of the soft term, in [0, 1].
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: target value of rows to leave out.

    Returns:
        A scalar (or (B,) for ``"none"``) in the student's dtype. NaN or Inf in the logits
        propagate into the loss, as in PyTorch.

    Example::

        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> teacher = torch.randn(8, 10)
        >>> y = torch.randint(0, 10, (8,))
        >>> fasttl.distillation_loss(student, teacher, y, temperature=4.0, alpha=0.9).backward()
    """
    _check_arguments(student_logits, teacher_logits, target, temperature, alpha, reduction, ignore_index)
    scale = _known_scale(student_logits, target, reduction, ignore_index)
    if scale is not None:
        loss, _ = _ops.distill_loss(student_logits, teacher_logits.detach(), target, float(temperature),
                                    float(alpha), int(ignore_index), scale)
        return loss.to(student_logits.dtype)
    loss_rows, _ = _ops.distill_rows(student_logits, teacher_logits.detach(), target,
                                     float(temperature), float(alpha), int(ignore_index))
    if reduction == "none":
        return loss_rows.to(student_logits.dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        counted = student_logits.size(0) if target is None else (target != ignore_index).sum()
        # An all-ignored batch has loss 0 (not 0/0) and gradient 0.
        total = total / (counted.clamp(min=1) if isinstance(counted, Tensor) else max(counted, 1))
    return total.to(student_logits.dtype)
