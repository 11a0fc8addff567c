"""nn.Module wrappers of fasttl's functional ops."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fasttl.losses import distillation_loss


class DistillationLoss(nn.Module):
    """Module form of :func:`fasttl.distillation_loss`; see it for the formula.

    Example::

        >>> criterion = fasttl.nn.DistillationLoss(temperature=4.0, alpha=0.9)
        >>> loss = criterion(student(x), teacher(x).detach(), y)
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, reduction: str = "mean",
                 ignore_index: int = -100, label_smoothing: float = 0.0, weight: Optional[Tensor] = None):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        # A buffer, as torch.nn.CrossEntropyLoss's: it moves with .to() and is in the state dict.
        self.register_buffer("weight", weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                                 alpha=self.alpha, reduction=self.reduction, ignore_index=self.ignore_index,
                                 label_smoothing=self.label_smoothing, weight=self.weight)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}")
