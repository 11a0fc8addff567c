"""Long-tailed training data: detecting it and correcting a head for it by logit adjustment
(Menon et al., "Long-tail learning via logit adjustment", ICLR 2021). A head fit to imbalanced
data learns the training prior pi into its bias; subtracting tau * log(pi) from its logits targets
the balanced error instead (tau = 1 is Bayes-optimal for it when the head is calibrated). tau is
chosen on the validation split by balanced accuracy (ties to the lower class-balanced loss), so
a test set with the training prior is served by tau = 0 when validation says so."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

# The largest over smallest training class count from which a head is corrected: below it the
# data count as balanced and nothing changes (CIFAR-10's random subsets stay far below 2).
IMBALANCE_RATIO = 3.0
# tau values tried on validation (0: no correction).
LOGIT_ADJUSTMENTS = (0.0, 0.5, 1.0, 1.5, 2.0)


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(labels.long().cpu(), minlength=num_classes)


def imbalance_ratio(labels: Tensor, num_classes: int) -> float:
    """Largest over smallest count among the classes that have training images."""
    counts = class_counts(labels, num_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def log_prior(labels: Tensor, num_classes: int) -> Tensor:
    """log pi per class from the training labels (a class without images counts as one)."""
    counts = class_counts(labels, num_classes).clamp(min=1).double()
    return (counts / counts.sum()).log().float()


def balanced_scores(logits: Tensor, labels: Tensor, num_classes: int) -> Dict[str, float]:
    """Balanced accuracy (mean recall) and class-balanced cross-entropy over the classes present."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    hits = (logits.argmax(1) == labels).float()
    present = class_counts(labels, num_classes).to(logits.device) > 0
    counts = class_counts(labels, num_classes).to(logits.device).clamp(min=1).float()
    recall = torch.zeros(num_classes, device=logits.device).index_add_(0, labels, hits) / counts
    loss = torch.zeros(num_classes, device=logits.device).index_add_(0, labels, losses) / counts
    return {"val_balanced_accuracy": float(recall[present].mean()), "val_balanced_loss": float(loss[present].mean())}


def best_adjustment(logits: Tensor, labels: Tensor, prior: Tensor, num_classes: int) -> Dict[str, float]:
    """The tau of LOGIT_ADJUSTMENTS whose adjusted logits score best on validation, with its scores."""
    best = None
    for tau in LOGIT_ADJUSTMENTS:
        scores = balanced_scores(logits - tau * prior.to(logits.device), labels, num_classes)
        key = (scores["val_balanced_accuracy"], -scores["val_balanced_loss"])
        if best is None or key > best[0]:
            best = (key, dict(scores, logit_adjustment=tau))
    return best[1]


def adjust_bias(head: torch.nn.Module, tau: float, prior: Tensor) -> None:
    """Folds the adjustment into the head's last Linear, so every later use (predict, export,
    LP-FT's start) computes the adjusted logits."""
    if tau:
        with torch.no_grad():
            head[-1].bias.sub_(tau * prior.to(head[-1].bias.device, head[-1].bias.dtype))
