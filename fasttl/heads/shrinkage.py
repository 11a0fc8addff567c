"""The linear head as shrinkage linear discriminant analysis: class means and one within-class
covariance pulled toward a multiple of the identity, as scikit-learn's
LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s) fits it. With a few dozen images a class
and a thousand or more feature dimensions, this prior (every class a Gaussian of the same shape)
carries more than the L2 path can: on few-shot 5x40 (benchmarks/RESULTS.md, "Few images") the
cross-validated choice between the two scored about 1 point above the L2 path alone.

The head is still an affine map of the scaled features, so it is saved, exported and fine-tuned
(LP-FT) as the L2 path's is; its logits are divided by a temperature fit on out-of-fold logits
(fasttl.heads.tuning), since LDA's own grow with the feature width (confidences of 1.0 on wrong
images, one-hot distillation targets). Solved in float64 from one eigendecomposition of the
smaller Gram matrix (images x images, or features x features) shared by every shrinkage."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

# The strengths cross-validation tries (near 0: the pooled covariance alone, 1: nearest class mean).
# Few-shot 5x40's cross-validated choices fell between 0.7 and 0.98; below 0.5 none was chosen.
SHRINKAGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SOLVER = "shrinkage LDA (float64)"
# The logit of a class with no rows among those fit (weight 0): below any other, yet finite.
ABSENT_CLASS_BIAS = -1e4
# Within-class spread below this share of the rows' mean square is round-off, not spread.
NO_SPREAD = 1e-20
NEAREST_MEAN_VARIANCE = 1e-6  # of the rows' mean square: the variance assumed where there is none


def fit(x: Tensor, y: Tensor, num_classes: int, shrinkage: float) -> Tuple[Tensor, Tensor]:
    """(W, b), (C, D) and (C,), float32 (float64 for float64 rows), on x's device: the
    discriminant of scaled rows `x` (N, D) with labels `y`, class priors from the label counts.
    `shrinkage` in (0, 1]: at 0 the covariance of fewer images than dimensions has no inverse."""
    return fit_path(x, y, num_classes, [shrinkage])[0]


def fit_path(x: Tensor, y: Tensor, num_classes: int, shrinkages: Sequence[float]) -> List[Tuple[Tensor, Tensor]]:
    """fit() at each of `shrinkages`, sharing one eigendecomposition."""
    for strength in shrinkages:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"shrinkage must lie in (0, 1], got {strength!r}")
    rows = x.double()
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("x: holds NaN or infinite values; shrinkage LDA needs finite features")
    y = y.long()
    n, d = rows.shape
    counts = torch.bincount(y, minlength=num_classes).double()
    means = torch.zeros(num_classes, d, dtype=rows.dtype, device=rows.device).index_add_(0, y, rows)
    means = means / counts.clamp(min=1).unsqueeze(1)
    residual = rows - means[y]
    variance = float(residual.pow(2).sum()) / max(n * d, 1)
    spread = variance > NO_SPREAD * float(rows.pow(2).mean()) if n * d else False
    prior = torch.log(counts.clamp(min=1) / max(n, 1))
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    solved = []
    # Shrinking toward the identity scaled by the covariance's mean variance. Classes that are each
    # one repeated row have none: the nearest class mean then, as a variance far below the rows'
    # scale makes it (the priors only break ties).
    if not spread:
        solved = [means / (NEAREST_MEAN_VARIANCE * float(rows.pow(2).mean()) or 1.0)] * len(shrinkages)
    elif n <= d:  # (a I + c R^T R)^-1 = (I - R^T (I / c + R R^T / a)^-1 R / a) / a, c = (1 - s) / n
        values, vectors = torch.linalg.eigh(residual @ residual.T)
        projected = vectors.T @ (residual @ means.T)  # (n, C)
        for strength in shrinkages:
            alpha, c = strength * variance, (1.0 - strength) / n
            inner = c / (alpha + c * values.clamp(min=0))  # eigenvalues of (I / c + R R^T / a)^-1 / a, scaled
            solved.append((means - (vectors @ (inner.unsqueeze(1) * projected)).T @ residual) / alpha)
    else:  # fewer features than images: the D x D covariance itself
        values, vectors = torch.linalg.eigh(residual.T @ residual / n)
        projected = vectors.T @ means.T  # (D, C)
        for strength in shrinkages:
            scale = 1.0 / (strength * variance + (1.0 - strength) * values.clamp(min=0))
            solved.append((vectors @ (scale.unsqueeze(1) * projected)).T)
    out = []
    for precision_means in solved:
        weight = precision_means.clone()
        bias = -0.5 * (precision_means * means).sum(1) + prior
        weight[counts == 0] = 0.0
        bias[counts == 0] = ABSENT_CLASS_BIAS
        out.append((weight.to(out_dtype), bias.to(out_dtype)))
    return out


# The temperatures temperature() searches, as natural logarithms: LDA's logits on a few dozen images
# a class in 2,000 dimensions run to hundreds (temperatures of 10 to 100). Never below 1: a
# temperature only softens LDA's own confidences (classes that every fold separates would
# otherwise be sharpened without bound).
LOG_TEMPERATURES = (0.0, 12.0)
TEMPERATURE_RANGE = tuple(math.exp(t) for t in LOG_TEMPERATURES)
FLOAT32_ROUNDING = 2.0 ** -24


def is_fitted_temperature(value) -> bool:
    """Whether `value` is a temperature that temperature() returns (in TEMPERATURE_RANGE): what a
    teacher's recorded choice is checked against. Earlier versions returned exp in float32, so a
    float32 rounding past the range's ends is allowed."""
    low, high = TEMPERATURE_RANGE
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        low * (1 - FLOAT32_ROUNDING) <= value <= high * (1 + FLOAT32_ROUNDING)


def temperature(logits: Tensor, labels: Tensor, steps: int = 60) -> float:
    """The T >= 1 minimizing the cross-entropy of logits / T (golden-section search over log T):
    what the chosen LDA head's logits are divided by, fit on its out-of-fold logits."""
    logits, labels = logits.double(), labels.long()

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    low, high = LOG_TEMPERATURES
    ratio = (5 ** 0.5 - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(steps):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)
