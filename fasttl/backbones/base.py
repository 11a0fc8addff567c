"""What every fasttl backbone offers: feature map, pooled features, its ImageNet classifier and
its preprocessing."""
from __future__ import annotations

import abc
import copy
import dataclasses
import hashlib
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from fasttl.util.errors import OptionError


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone: RGB, scaled to [0, 1], resized so the shorter
    side is input_size / crop_fraction, center-cropped to input_size (eval), then normalized as
    (x - mean) / std per channel."""

    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    crop_fraction: float = 1.0
    min_input_size: int = 32

    def with_size(self, size: int) -> "Preprocessing":
        from fasttl.util.checks import check_image_size, plain_number

        size = check_image_size("image_size", plain_number(size), OptionError)  # (never int() of 32.9, or '32')
        if size < self.min_input_size:
            raise OptionError(f"image_size: {size} px is below this backbone's minimum of {self.min_input_size} px")
        return dataclasses.replace(self, input_size=int(size))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Backbone(nn.Module, abc.ABC):
    """A pretrained image network split into a feature extractor and its original classifier.

    * ``forward_features(x)`` -> feature map (N, C, H, W)
    * ``pool(feature_map)`` -> pooled features (N, feature_dim) (global average pooling)
    * ``forward_pooled(x)`` -> both in one call
    * ``classify(pooled)`` -> the original ImageNet logits (N, 1000), ``forward(x)`` the same from images
    * ``feature_dim``, ``preprocessing`` (:class:`Preprocessing`), ``stages()`` (feature blocks from
      input to output, for partial unfreezing and per-stage learning rates)
    * ``forward_taps(x, taps)`` -> the feature maps of the last ``taps`` intermediate stages, then
      the final one: what multi-stage features pool (``tap_channels()`` their channels, input to
      output, the last being ``feature_dim``)
    """

    name: str = "backbone"
    feature_dim: int = 0
    preprocessing: Preprocessing

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) -> feature map (N, C, H', W')."""

    @abc.abstractmethod
    def classifier(self) -> nn.Module:
        """The original classifier: pooled features -> logits."""

    @abc.abstractmethod
    def stages(self) -> List[nn.Module]:
        """Feature blocks from input to output."""

    @staticmethod
    def pool(feature_map: Tensor) -> Tensor:
        return feature_map.mean(dim=(2, 3)) if feature_map.dim() == 4 else feature_map

    def forward_pooled(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_features(x))

    def tap_channels(self) -> List[int]:
        """Channels of each feature map `forward_taps` can return, from input to output; the last
        is the final map's (`feature_dim`). A backbone without taps has only that one."""
        return [self.feature_dim]

    def check_taps(self, taps: int) -> None:
        available = len(self.tap_channels()) - 1
        if isinstance(taps, bool) or not isinstance(taps, int) or not 0 <= taps <= available:
            raise OptionError(f"features: {self.name} has {available} intermediate stages to pool, asked for {taps!r}; "
                              "pass --features head (its final pooled features)")

    def forward_taps(self, x: Tensor, taps: int) -> List[Tensor]:
        """The feature maps of the last `taps` intermediate stages, then the final feature map."""
        self.check_taps(taps)
        return [self.forward_features(x)]

    def tapped_channels(self, taps: int) -> List[int]:
        """The widths of the pooled maps `forward_taps(x, taps)` gives, in its order (a feature
        cache's "layout")."""
        self.check_taps(taps)
        return self.tap_channels()[-(taps + 1):]

    def tapped_dim(self, taps: int) -> int:
        """Width of the pooled multi-stage vector: the tapped stages' channels plus the final map's."""
        return sum(self.tapped_channels(taps))

    def classify(self, pooled: Tensor) -> Tensor:
        return self.classifier()(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.forward_pooled(x))

    def freeze(self) -> "Backbone":
        """Eval mode and no gradients: the frozen feature extractor of feature transfer."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def conv_bn_pairs(self) -> List[Tuple[nn.Module, str, str]]:
        """(parent, conv attribute, batch-norm attribute) of each convolution whose output feeds a
        BatchNorm2d and nothing else; what :meth:`for_extraction` folds. None by default."""
        return []

    def for_extraction(self) -> "Backbone":
        """A frozen copy for feature extraction, each batch norm folded into the convolution
        before it (one pass over the activations less per layer; the same function up to float
        rounding). The backbone itself is left as it is."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        frozen = copy.deepcopy(self).freeze()
        for parent, conv_name, bn_name in frozen.conv_bn_pairs():
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"conv_bn_pairs: {conv_name}/{bn_name} of {type(parent).__name__} are "
                                f"{type(conv).__name__}/{type(bn).__name__}, expected Conv2d/BatchNorm2d")
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
        return frozen

    def weights_hash(self) -> str:
        """SHA-256 over the state dict (names, shapes, dtypes and values): identifies the weights."""
        digest = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            digest.update(key.encode())
            tensor = value.detach().cpu().contiguous()
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()


def pooled_taps(backbone: "Backbone", x: Tensor, taps: int = 0) -> Tensor:
    """Images -> the pooled feature vector a feature cache stores: the global average of each
    tapped map (the last `taps` intermediate stages, then the final map), concatenated in that
    order. `taps=0` is the usual pooled features."""
    maps = backbone.forward_taps(x, taps)
    return torch.cat([backbone.pool(m) for m in maps], 1) if len(maps) > 1 else backbone.pool(maps[0])


class PooledFeatures(nn.Module):
    """`pooled_taps` as a module (what ONNX export traces)."""

    def __init__(self, backbone: "Backbone", taps: int = 0):
        super().__init__()
        self.backbone = backbone
        self.taps = int(taps)
        self.feature_dim = backbone.tapped_dim(self.taps)

    def forward(self, x: Tensor) -> Tensor:
        return pooled_taps(self.backbone, x, self.taps)


class CustomBackbone(Backbone):
    """Any user ``nn.Module`` as a backbone: ``features`` maps images to a feature map (N, C, H, W)
    or to features (N, C); ``head`` (optional) maps pooled features to class logits."""

    def __init__(self, features: nn.Module, feature_dim: int, preprocessing: Preprocessing,
                 head: nn.Module = None, name: str = "custom"):
        super().__init__()
        self.features = features
        self.head = head if head is not None else nn.Identity()
        self.feature_dim = int(feature_dim)
        self.preprocessing = preprocessing
        self.name = name

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def classifier(self) -> nn.Module:
        return self.head

    def stages(self) -> List[nn.Module]:
        children = list(self.features.children())
        return children if children else [self.features]


def load_state_dict_strict(module: nn.Module, state_dict: dict, source: str) -> None:
    """Loads `state_dict` only when it fits `module` tensor for tensor: the same keys, shapes and
    kinds of number (a float weight stored as integers would be cast to a model that answers
    nothing); else one WeightsError naming the first tensor that does not fit."""
    from fasttl.backbones.weights import WeightsError

    own = module.state_dict()
    for key, tensor in state_dict.items():
        if key in own and isinstance(tensor, torch.Tensor):
            wanted = own[key]
            if tensor.shape != wanted.shape:
                raise WeightsError(f"weights: {source} does not fit {type(module).__name__}: {key} is "
                                   f"{tuple(tensor.shape)}, the model's {tuple(wanted.shape)}")
            if wanted.is_floating_point() and not tensor.is_floating_point():
                raise WeightsError(f"weights: {source} does not fit {type(module).__name__}: {key} holds "
                                   f"{tensor.dtype} values where the model has {wanted.dtype} weights")
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise WeightsError(f"weights: {source} does not fit {type(module).__name__}: "
                           f"missing keys {list(missing)[:5]}, unexpected keys {list(unexpected)[:5]}")


def imagenet_mean_std() -> Tuple[Sequence[float], Sequence[float]]:
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
