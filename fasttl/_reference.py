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
    p = log_p.exp()
    # 0 log 0 = 0: a class the teacher rules out (logit -inf) adds nothing, as kl_div's xlogy does
    # for probability targets; also where the student rules it out too (log q = -inf).
    pointwise = torch.where(p == 0, torch.zeros_like(log_q), p * (log_p - log_q))  # NaN still propagates
    soft = pointwise.sum(-1) * (T * T)
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


def pool_store(features, cache_dtype, scales_out=None):
    """Float64 reference of the pool-and-store kernel: pooled rows and, for int8, the quantized
    rows and scales (round half to even, as the kernels)."""
    pooled = features.double().mean(dim=(2, 3)) if features.dim() == 4 else features.double()
    if cache_dtype != torch.int8:
        return pooled, None
    absmax = pooled.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(pooled / scale[:, None]).clamp(-127, 127)
    return q, scale


def gather(cache, indices, scales=None):
    """Float64 reference of the gather kernel."""
    rows = cache[indices].double()
    return rows * scales[indices].double()[:, None] if cache.dtype == torch.int8 else rows
