"""Classification metrics: accuracy, balanced accuracy (the mean recall of the classes present: what
a long-tailed training set costs the rare classes shows here, not in accuracy), per-class recall
and precision, macro F1, confusion matrix."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(true class, predicted class) counts."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: Tensor, labels: Tensor, classes: List[str]) -> Dict[str, object]:
    logits, labels = logits.float().cpu(), labels.long().cpu()
    n = len(classes)
    predictions = logits.argmax(1)
    cm = confusion_matrix(predictions, labels, n).double()
    true_counts, predicted_counts, hits = cm.sum(1), cm.sum(0), cm.diag()
    recall = torch.where(true_counts > 0, hits / true_counts.clamp(min=1), torch.zeros_like(hits))
    precision = torch.where(predicted_counts > 0, hits / predicted_counts.clamp(min=1), torch.zeros_like(hits))
    f1 = torch.where(recall + precision > 0, 2 * recall * precision / (recall + precision).clamp(min=1e-12),
                     torch.zeros_like(hits))
    present = true_counts > 0
    return {
        "accuracy": float(hits.sum() / max(1, len(labels))),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": float(F.cross_entropy(logits, labels)) if len(labels) else 0.0,
        # null for a class without test images: 0/0 is no score, and 0.0 would read as always wrong
        "per_class_recall": {c: float(r) if n > 0 else None for c, r, n in zip(classes, recall, true_counts)},
        # null for a class never predicted: 0/0 again (its recall, 0.0, says the model missed it)
        "per_class_precision": {c: float(p) if n > 0 else None for c, p, n in zip(classes, precision,
                                                                                  predicted_counts)},
        "confusion_matrix": cm.long().tolist(),
        "classes": list(classes),
        "samples": int(len(labels)),
    }
