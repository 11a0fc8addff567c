"""Plain-PyTorch references of every fasttl op. The tests compare the kernels with these in
float64, and the benchmarks time them as "what a user would otherwise write"."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, alpha=0.5,
                      reduction="mean", ignore_index=-100, label_smoothing=0.0, weight=None):
    """Eager PyTorch distillation loss (Hinton et al. 2015) built from log_softmax, kl_div and
    cross_entropy; same semantics as :func:`fasttl.distillation_loss`, in the input dtype, any
    leading dims ((..., C) logits, (...) target)."""
    T = float(temperature)
    factor = 1.0  # what the rows' class weights were divided by (scaled_to_one)
    log_q = F.log_softmax(student_logits / T, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / T, dim=-1)
    p = log_p.exp()
    # 0 log 0 = 0: a class the teacher rules out (logit -inf) adds nothing, as kl_div's xlogy does
    # for probability targets; also where the student rules it out too (log q = -inf).
    pointwise = torch.where(p == 0, torch.zeros_like(log_q), p * (log_p - log_q))  # NaN still propagates
    soft = pointwise.sum(-1) * (T * T)
    if target is None:
        rows = soft
        counted = torch.ones_like(rows)
    else:
        counted = (target != ignore_index).to(soft.dtype)
        classes = student_logits.shape[-1]
        hard = F.cross_entropy(student_logits.reshape(-1, classes), target.reshape(-1), reduction="none",
                               ignore_index=ignore_index, label_smoothing=label_smoothing).reshape(target.shape)
        # A term of weight 0 is left out, not multiplied: a masked logit makes it inf, and 0 * inf is NaN.
        mixed = (alpha * soft if alpha else torch.zeros_like(soft)) + ((1.0 - alpha) * hard if alpha != 1 else 0.0)
        rows = torch.where(counted > 0, mixed, torch.zeros_like(soft))
        if weight is not None:
            picked = weight[target.clamp(0, classes - 1)].to(soft.dtype)  # chosen, not times 0: inf * 0 is NaN
            counted = torch.where(counted > 0, picked, torch.zeros_like(picked))
            if reduction != "none":
                counted, factor = scaled_to_one(counted)
            rows = rows * counted
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum() * factor
    total = counted.sum()
    if weight is not None and target is not None:  # by the weights' sum, as cross_entropy (0 over rows: +-inf)
        present = (target != ignore_index).any()
        return rows.sum() / torch.where(present, total, torch.ones_like(total))
    return rows.sum() / torch.where(total != 0, total, torch.ones_like(total))


def scaled_to_one(weights):
    """The rows' class weights divided by the largest in size, and that factor: a weighted mean is
    the same for weights scaled by one factor, and weights of at most 1 neither overflow a float32
    sum (1e38 each) nor lose digits as denormals (1e-45). No host sync."""
    largest = weights.abs().amax() if weights.numel() else weights.new_zeros(())
    factor = torch.where(largest > 0, largest, torch.ones_like(largest))
    return weights / factor, factor


def distillation_loss_kl_div(student_logits, teacher_logits, target, *, temperature=1.0, alpha=0.5):
    """The loss as users usually write it (and the fastest eager form: kl_div with log_target
    takes log-probabilities on both sides, no exp of the teacher's): the batch mean of
    :func:`distillation_loss` (no ignore_index, no smoothing)."""
    T = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.log_softmax(teacher_logits.detach() / T, dim=-1),
                    reduction="batchmean", log_target=True) * (T * T)
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, target)


def distillation_row_grad(student_logits, teacher_logits, target=None, *, temperature=1.0, alpha=0.5,
                          ignore_index=-100, label_smoothing=0.0):
    """d(loss_i)/d(student_i) of each row of :func:`distillation_loss` ``reduction="none"``, as
    differentiable torch ops (the double backward of the fused op):
    alpha T (softmax(s/T) - softmax(t/T)) + (1 - alpha) (softmax(s) - (1 - eps) onehot(y) - eps / C)."""
    T = float(temperature)
    soft = T * (F.softmax(student_logits / T, dim=-1) - F.softmax(teacher_logits.detach() / T, dim=-1))
    if target is None:
        return soft
    classes = student_logits.shape[-1]
    counted = (target != ignore_index).unsqueeze(-1)
    onehot = F.one_hot(torch.where(counted.squeeze(-1), target, torch.zeros_like(target)), classes)
    smoothed = (1.0 - label_smoothing) * onehot.to(student_logits.dtype) + label_smoothing / classes
    hard = F.softmax(student_logits, dim=-1) - smoothed
    return torch.where(counted, alpha * soft + (1.0 - alpha) * hard, torch.zeros_like(soft))


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
