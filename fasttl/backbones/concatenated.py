"""Backbones side by side: each image goes through every one of them, and the pooled (multi-stage)
features are concatenated, first backbone first. A linear head on the concatenation of two
ImageNet backbones beat either alone on CIFAR-10 subsets (benchmarks/RESULTS.md, "Budget
planner"); the head's block scaling (fasttl.heads.solver.block_scaling) gives each backbone's
stages the same weight, so neither drowns the other.

It has pooled features only (no single feature map, no ImageNet classifier, no stages to
unfreeze): what feature transfer (linear, mlp) and feature caches need, not fine-tuning."""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

from torch import Tensor, nn

from fasttl.backbones.base import Backbone
from fasttl.util.errors import OptionError

SEPARATOR = "+"
MAX_PARTS = 3  # each part costs a full pass over every image


def split_name(name: str) -> List[str]:
    """The backbone names of a concatenation "a+b" (one name for a single backbone)."""
    return name.split(SEPARATOR)


def check_parts(name: str, known: Sequence[str], joinable: Sequence[str]) -> List[str]:
    """The parts of `name`, each a `joinable` backbone, distinct, at most MAX_PARTS; else one
    OptionError (a `known` one that can't join named as such)."""
    parts = split_name(name)
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise OptionError(f"backbone: unknown {unknown[0]!r}; choose from {list(known)}, or join {MAX_PARTS} of "
                          f"{', '.join(joinable)} at most with {SEPARATOR!r} (efficientnet_lite0{SEPARATOR}"
                          "efficientnet_lite1)")
    apart = next((p for p in parts if p not in joinable), None)
    if apart is not None:
        raise OptionError(f"backbone: {apart} can't be joined with {SEPARATOR!r}: its weights come from a --weights "
                          f"file, one per backbone; join {', '.join(joinable)}, or pass {apart} alone")
    if len(parts) > MAX_PARTS:
        raise OptionError(f"backbone: {name!r} joins {len(parts)} backbones; join 2 to {MAX_PARTS}")
    twice = next((p for p in parts if parts.count(p) > 1), None)
    if twice is not None:
        raise OptionError(f"backbone: {name!r} names {twice} twice; join 2 to {MAX_PARTS} different backbones")
    return parts


class ConcatenatedBackbone(Backbone):
    """`parts` run on the same images (they must share their preprocessing: mean, std, crop);
    `forward_taps(x, taps)` gives each part's last `taps` stages and final map, part after part."""

    def __init__(self, parts: Sequence[Backbone]):
        super().__init__()
        first = parts[0].preprocessing
        for part in parts[1:]:
            theirs = part.preprocessing
            if (theirs.mean, theirs.std, theirs.crop_fraction) != (first.mean, first.std, first.crop_fraction):
                raise OptionError(f"backbone: {parts[0].name} and {part.name} prepare images differently (mean, std "
                                  "or crop); join backbones that prepare images alike")
        self.parts = nn.ModuleList(parts)
        self.name = SEPARATOR.join(p.name for p in parts)
        self.feature_dim = sum(p.feature_dim for p in parts)
        self.preprocessing = dataclasses.replace(first, input_size=max(p.preprocessing.input_size for p in parts),
                                                 min_input_size=max(p.preprocessing.min_input_size for p in parts))

    def _no_single(self, what: str):
        return OptionError(f"backbone: {self.name} joins backbones and has pooled features only, no {what}; train a "
                           f"head on its features (fasttl run --backbone {self.name}: linear or mlp) and use that "
                           "run, or pass one backbone")

    def forward_features(self, x: Tensor) -> Tensor:
        raise self._no_single("single feature map")

    def forward_pooled(self, x: Tensor) -> Tensor:
        import torch

        return torch.cat([p.forward_pooled(x) for p in self.parts], 1)

    def classifier(self) -> nn.Module:
        raise self._no_single("ImageNet classifier")

    def stages(self) -> List[nn.Module]:
        raise self._no_single("stages to fine-tune")

    def tap_channels(self) -> List[int]:
        return [self.feature_dim]

    def check_taps(self, taps: int) -> None:
        for part in self.parts:
            part.check_taps(taps)

    def tapped_channels(self, taps: int) -> List[int]:
        return [c for part in self.parts for c in part.tapped_channels(taps)]

    def forward_taps(self, x: Tensor, taps: int) -> List[Tensor]:
        self.check_taps(taps)
        return [m for part in self.parts for m in part.forward_taps(x, taps)]

    def conv_bn_pairs(self):
        return [pair for part in self.parts for pair in part.conv_bn_pairs()]
