"""CIFAR-style networks (3×3 stem, no max-pool): ResNet-18/34/50, PreActResNet-18, WideResNet."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.base.errors import ConfigError
from regdefense.models._registry import register_model
from regdefense.models.small import _no_pretrained


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != out:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cin = 64
        expansion: int = getattr(block, "expansion")
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for s in [1 if i == 0 else 2] + [1] * (n - 1):
                blocks.append(block(self.cin, planes, s))
                self.cin = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(512 * expansion, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Conv2d(cin, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet(nn.Module):
    def __init__(self, layers: list[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        cin, stages = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for s in [1 if i == 0 else 2] + [1] * (n - 1):
                blocks.append(PreActBlock(cin, planes, s))
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


#: WideResNet activations: ReLU (Zagoruyko & Komodakis, TRADES, AWP) or SiLU/Swish (Gowal et al. 2020, Rebuffi et al.
#: 2021, Wang et al. 2023)
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


class WideBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, drop: float, act: str = "relu", bn_momentum: float = 0.1
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop, self.act = drop, ACTIVATIONS[act]
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = self.act(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        y = self.act(self.bn2(self.conv1(o)))
        if self.drop > 0:
            y = F.dropout(y, p=self.drop, training=self.training)
        return self.conv2(y) + skip


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis), as used by TRADES/AWP (WRN-34-10); with ``act="silu"`` and
    ``bn_momentum=0.01`` the Swish WideResNets of the extra-data line of work (Gowal et al. 2020's model zoo, used by
    Rebuffi et al. 2021 and Wang et al. 2023). Those differ from this one in two details kept as they are here: they
    pad stride-2 convolutions TensorFlow-style ("SAME": one pixel right and bottom) where this pads one on each side,
    and they initialise convolutions N(0, 2/(k²·out)) where this keeps PyTorch's default."""

    def __init__(
        self,
        depth: int,
        widen: int,
        in_channels: int,
        num_classes: int,
        drop: float = 0.0,
        act: str = "relu",
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ConfigError(f"wideresnet activation must be one of {', '.join(ACTIVATIONS)}, got '{act}'")
        self.act = ACTIVATIONS[act]
        if (depth - 4) % 6:
            raise ConfigError(f"wideresnet depth must be 6n+4 (e.g. 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            stages.append(
                nn.Sequential(
                    *[
                        WideBlock(
                            cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1, drop, act, bn_momentum
                        )
                        for j in range(n)
                    ]
                )
            )
            cin = w
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model
def resnet18(in_channels: int, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool)."""
    _no_pretrained("resnet18", pretrained)
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes)


@register_model
def resnet34(in_channels: int, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """CIFAR-style ResNet-34."""
    _no_pretrained("resnet34", pretrained)
    return ResNet(BasicBlock, [3, 4, 6, 3], in_channels, num_classes)


@register_model
def resnet50_cifar(in_channels: int, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """CIFAR-style ResNet-50 (bottleneck blocks)."""
    _no_pretrained("resnet50_cifar", pretrained)
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels, num_classes)


@register_model
def preact_resnet18(in_channels: int, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """PreAct ResNet-18 (Rice et al., fast AT)."""
    _no_pretrained("preact_resnet18", pretrained)
    return PreActResNet([2, 2, 2, 2], in_channels, num_classes)


@register_model
def wideresnet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    pretrained: bool = False,
    depth: int = 34,
    widen: int = 10,
    drop: float = 0.0,
    activation: str = "relu",
    bn_momentum: float = 0.1,
) -> nn.Module:
    """WideResNet of model.depth and model.widen (default 34-10); model.activation=silu for the Swish variant.

    ``model.bn_momentum`` = 0.01 with it, as Gowal et al.'s zoo has it."""
    _no_pretrained("wideresnet", pretrained)
    return WideResNet(depth, widen, in_channels, num_classes, drop, activation, bn_momentum)


@register_model
def wrn28_10_swish(in_channels: int, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """WideResNet-28-10 with SiLU and BatchNorm momentum 0.01 (Wang et al. 2023's 67.31 % CIFAR-10 model)."""
    _no_pretrained("wrn28_10_swish", pretrained)
    return WideResNet(28, 10, in_channels, num_classes, act="silu", bn_momentum=0.01)


@register_model
def wrn70_16_swish(in_channels: int, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """WideResNet-70-16 with SiLU and BatchNorm momentum 0.01 (Wang et al. 2023's 70.69 % CIFAR-10 model)."""
    _no_pretrained("wrn70_16_swish", pretrained)
    return WideResNet(70, 16, in_channels, num_classes, act="silu", bn_momentum=0.01)


@register_model
def wrn34_10(in_channels: int, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """WideResNet-34-10 (TRADES, AWP, DYNAT)."""
    _no_pretrained("wrn34_10", pretrained)
    return WideResNet(34, 10, in_channels, num_classes)
