"""The models the strategies train: heads on a backbone, the small from-scratch CNN (the student
and the baseline), and the domain-adversarial pieces."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """A compact CNN for images at their native resolution (8 to 64 px): the distillation
    student and the from-scratch baseline."""

    WIDTH = 32
    FEATURE_DIM = 4 * WIDTH  # the penultimate width at the default WIDTH

    def __init__(self, num_classes: int, width: int = WIDTH):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, width), block(width, width), nn.MaxPool2d(2),
                                      block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(4 * width, num_classes))
        self.feature_dim = 4 * width  # what `features` gives the classifier (and --distill-features projects)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BackboneWithHead(nn.Module):
    """A backbone's pooled features into a new head: the fine-tuned (or feature-transfer) model.
    `taps` > 0: multi-stage features (the pooled maps of the last `taps` stages and the final
    map, concatenated, as the feature cache stores them). `mirror_average`: the logits are the
    mean of the image's and its horizontal mirror's, as a run with --mirror-views test predicts."""

    def __init__(self, backbone, head: nn.Module, taps: int = 0, mirror_average: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.taps = int(taps)
        self.mirror_average = bool(mirror_average)

    def forward(self, x: Tensor) -> Tensor:
        from fasttl.backbones.base import pooled_taps

        logits = self.head(pooled_taps(self.backbone, x, self.taps))
        if self.mirror_average:
            logits = (logits + self.head(pooled_taps(self.backbone, x.flip(-1), self.taps))) / 2
        return logits


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


class GradientReversal(nn.Module):
    """Identity forward, gradient times -strength backward (Ganin and Lempitsky 2015)."""

    def __init__(self, strength: float = 1.0):
        super().__init__()
        self.strength = strength

    def forward(self, x: Tensor) -> Tensor:
        return _ReverseGradient.apply(x, self.strength)


class DANN(nn.Module):
    """Domain-adversarial network on cached features: a trainable bottleneck shared by a label
    classifier and, through gradient reversal, a domain classifier."""

    def __init__(self, feature_dim: int, num_classes: int, bottleneck: int = 256, mean=None, std=None):
        super().__init__()
        from fasttl.heads.train import Standardize

        mean = torch.zeros(feature_dim) if mean is None else mean
        std = torch.ones(feature_dim) if std is None else std
        self.bottleneck = nn.Sequential(Standardize(mean, std), nn.Linear(feature_dim, bottleneck), nn.ReLU(),
                                        nn.Dropout(0.2))
        self.classifier = nn.Linear(bottleneck, num_classes)
        self.reverse = GradientReversal(0.0)
        self.domain = nn.Sequential(nn.Linear(bottleneck, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.bottleneck(features))

    def domain_logits(self, features: Tensor) -> Tensor:
        return self.domain(self.reverse(self.bottleneck(features))).squeeze(1)
