"""ResNet-18/34/50 (He et al. 2016) with torchvision's parameter names, so a torchvision
ImageNet state dict the user provides (weights=PATH) loads as it is."""
from __future__ import annotations

from typing import List, Optional, Type, Union

from torch import Tensor, nn

from fasttl.backbones.base import Backbone, Preprocessing, imagenet_mean_std


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (torchvision v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


_CONFIGS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
            "resnet50": (Bottleneck, [3, 4, 6, 3])}


class ResNet(Backbone):
    def __init__(self, name: str = "resnet18", num_classes: int = 1000):
        super().__init__()
        if name not in _CONFIGS:
            raise ValueError(f"name: unknown ResNet {name!r}; choose from {sorted(_CONFIGS)}")
        block, layers = _CONFIGS[name]
        self.name = name
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.feature_dim = 512 * block.expansion
        mean, std = imagenet_mean_std()
        self.preprocessing = Preprocessing(input_size=224, mean=tuple(mean), std=tuple(std), crop_fraction=0.875,
                                           min_input_size=32)
        del self.in_planes

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int):
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.in_planes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def classifier(self) -> nn.Module:
        return self.fc

    def tap_channels(self) -> List[int]:
        """The outputs of layer1 to layer3, then layer4's (`feature_dim`)."""
        return [self.feature_dim // 8, self.feature_dim // 4, self.feature_dim // 2, self.feature_dim]

    def forward_taps(self, x: Tensor, taps: int) -> List[Tensor]:
        self.check_taps(taps)
        maps = []
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            x = layer(x)
            if i >= 3 - taps:
                maps.append(x)
        return maps + [self.layer4(x)]

    def conv_bn_pairs(self):
        pairs = [(self, "conv1", "bn1")]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                count = 3 if isinstance(block, Bottleneck) else 2
                pairs += [(block, f"conv{i}", f"bn{i}") for i in range(1, count + 1)]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        return pairs

    def stages(self) -> List[nn.Module]:
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]


def load_resnet(name: str, pretrained: bool = True, weights: str = None) -> ResNet:
    from fasttl.backbones.base import load_state_dict_strict
    from fasttl.backbones.weights import read_state_dict

    model = ResNet(name)
    if pretrained and weights is None:
        raise FileNotFoundError(
            f"{name}: fasttl ships no ResNet weights and never downloads them. Save torchvision's ImageNet "
            f"state dict for {name} to a file (for example ~/.cache/fasttl/{name}.pth) and pass "
            f"weights=PATH (CLI: --weights PATH), or pretrained=False for random weights."
        )
    if weights is not None:
        load_state_dict_strict(model, read_state_dict(weights), weights)
    return model
