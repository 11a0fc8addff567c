"""The linear head solved exactly: multinomial logistic regression on cached features, full batch,
by L-BFGS, along a path of L2 strengths chosen on a validation split.

    minimize  mean_i CE(W x_i + b, y_i) + (weight_decay / 2) * ||W||^2      (x scaled: block_scaling)

With the features in memory (or on the GPU) each L-BFGS iteration is two matmuls over the
training set, so the whole path costs less than a few epochs of minibatch training, and every
strength is solved to convergence instead of to a fixed epoch budget. Each strength starts from
the previous solution (strongest first), which is what makes the path cheap."""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttl.heads import imbalance

# Strongest first, in 1-2-5 steps: the path spans what CIFAR-10 subsets of 100 to 5,000 images per
# class chose. On full CIFAR-10 (4-stage features) half-decade steps left 0.26 points of validation
# accuracy between two of them (0.8518 at 0.01 and 0.003, 0.8544 at 0.005).
WEIGHT_DECAYS = (5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4)
# The path stops after this many strengths in a row that score below the best on validation.
PATIENCE = 3
# Used when no validation split can be held out (one image per class): a strong prior, as so few
# images call for; it lies between the path's 0.5 and 0.2, where its choices on CIFAR-10 subsets
# of a few hundred images per class fall.
DEFAULT_WEIGHT_DECAY = 0.3
# L-BFGS iterations per strength on the path: enough to rank strengths (each starts from the last
# one's solution); the refit of the chosen one runs to solve()'s default.
PATH_MAX_ITER = 60
SOLVER = "L-BFGS, full batch"  # as a head's choice names it (metrics.json)


def block_scaling(features: Tensor, widths: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """(mean, scale) per feature: features centered, and each block (one tapped stage's pooled
    map, in the layout's order) divided by one number, its RMS times sqrt(width / last width),
    so every stage carries the same total variance as the final map. Per-feature
    standardization instead lifts the many near-constant channels of early stages to the
    weight of the informative ones: on a CIFAR-10 subset it scored 0.9 points lower on average
    over 0 to 4 tapped stages (benchmarks/RESULTS.md, "Feature transfer")."""
    if sum(widths) != features.shape[1]:
        widths = [features.shape[1]]
    mean = features.mean(0)
    scale = torch.empty_like(mean)
    start = 0
    for width in widths:
        block = features[:, start:start + width] - mean[start:start + width]
        top = float(block.abs().max()) if block.numel() else 0.0
        # the RMS as top * RMS(block / top): squares of features near 1e20 overflow float32 (inf, and a
        # block of zero weights), their ratios to the largest do not
        rms = top * float((block / top).pow(2).mean().sqrt()) if 0 < top < float("inf") else top
        scale[start:start + width] = max(rms, 1e-12) * (width / widths[-1]) ** 0.5
        start += width
    return mean, scale


def solve(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, init: Optional[Tuple[Tensor, Tensor]] = None,
          max_iter: int = 100, tolerance: float = 1e-4) -> Tuple[Tensor, Tensor, Dict[str, float]]:
    """(W, b, record) minimizing the objective above on scaled `x` (N, D), labels `y` (N,)."""
    d = x.shape[1]
    weight = torch.zeros(num_classes, d, device=x.device) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, device=x.device) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tolerance, tolerance_change=1e-10, line_search_fn="strong_wolfe")
    calls = [0]

    def closure():
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(torch.addmm(bias, x, weight.t()), y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        calls[0] += 1
        return loss

    started = time.perf_counter()
    optimizer.step(closure)  # returns the first evaluation's loss, not the final one
    with torch.no_grad():
        loss = float(F.cross_entropy(torch.addmm(bias, x, weight.t()), y) + 0.5 * weight_decay * weight.pow(2).sum())
    if not math.isfinite(loss):
        from fasttl.heads.fit import DivergedError

        raise DivergedError(f"linear head: the objective is {loss} at weight decay {weight_decay}; the features hold "
                            "non-finite values or are far out of scale")
    record = {"weight_decay": weight_decay, "objective": loss, "evaluations": calls[0],
              "seconds": time.perf_counter() - started}
    return weight.detach(), bias.detach(), record


def view_logits(weight: Tensor, bias: Tensor, views: Sequence[Tensor]) -> Tensor:
    """Logits averaged over views of the same samples (plain and mirrored)."""
    return torch.stack([torch.addmm(bias, v, weight.t()) for v in views]).mean(0)


def fit_path(train_x: Tensor, train_y: Tensor, val_views: List[Tensor], val_y: Tensor, num_classes: int,
             weight_decays: Sequence[float] = WEIGHT_DECAYS, patience: int = PATIENCE,
             progress: bool = False, prior: Optional[Tensor] = None, val_logits: Optional[Dict[float, Tensor]] = None
             ) -> Tuple[float, List[Dict[str, float]], Tuple[Tensor, Tensor]]:
    """Solves each strength (strongest first, warm-started) on scaled training rows and
    scores it on the validation views; returns (chosen strength, one record per strength
    solved, the chosen solution). The choice is the best validation accuracy, ties to the lower
    validation loss; the path stops `patience` strengths after the best. With `prior` (the
    training classes' log prior, for long-tailed data) each strength is scored with its best
    logit adjustment by balanced accuracy instead (fasttl.heads.imbalance), recorded in its record.
    `val_logits`, a dict, receives each strength's validation logits (cross-validation pools them)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(weight_decays), unit="strength", desc="linear head: regularization path",
                   dynamic_ncols=True)
    path, best, solution, since_best = [], None, None, 0
    try:
        for weight_decay in weight_decays:
            weight, bias, record = solve(train_x, train_y, num_classes, weight_decay, init=solution,
                                         max_iter=PATH_MAX_ITER)
            solution = (weight, bias)
            logits = view_logits(weight, bias, val_views)
            if val_logits is not None:
                val_logits[weight_decay] = logits
            record.update(val_loss=float(F.cross_entropy(logits, val_y)),
                          val_accuracy=float((logits.argmax(1) == val_y).float().mean()))
            score = (record["val_accuracy"], -record["val_loss"])
            if prior is not None:
                record.update(imbalance.best_adjustment(logits, val_y, prior, num_classes))
                score = (record["val_balanced_accuracy"], -record["val_balanced_loss"])
            path.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(val_accuracy=f"{record['val_accuracy']:.4f}")
            if best is None or score > best[0]:
                best, since_best = (score, weight_decay, solution), 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    finally:
        if bar is not None:
            bar.close()
    return best[1], path, best[2]
