"""Plain-PyTorch references of every fasttl op. The tests compare the kernels with these in
float64, and the benchmarks time them as "what a user would otherwise write"."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, alpha=0.5,
                      reduction="mean", ignore_index=-100):
    """Eager PyTorch distillation loss (Hinton et al. 2015) built from log_softmax, kl_div and
    cross_entropy; same semantics as :func:`fasttl.distillation_loss`, in the input dtype."""
    T = float(temperature)
    log_q = F.log_softmax(student_logits / T, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / T, dim=-1)
    soft = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * (T * T)
    if target is None:
        rows = soft
        counted = torch.ones_like(rows, dtype=torch.bool)
    else:
        counted = target != ignore_index
        hard = F.cross_entropy(student_logits, target, reduction="none", ignore_index=ignore_index)
        rows = torch.where(counted, alpha * soft + (1.0 - alpha) * hard, torch.zeros_like(soft))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / counted.sum().clamp(min=1)
