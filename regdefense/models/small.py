"""Small CNNs: one sized for the embedded 8×8 digits, and TRADES' MNIST network."""

from __future__ import annotations

import torch
from torch import nn

from regdefense.base.errors import ConfigError
from regdefense.models._registry import register_model


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigError(f"model '{name}' has no pretrained weights; drop --pretrained")


def _digits_cnn(in_channels: int, num_classes: int, image_size: int, width: int, bn: bool) -> nn.Module:
    if image_size < 2:
        raise ConfigError("digits_cnn needs images of at least 2×2 pixels")
    side = image_size // 2
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        norm(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        norm(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@register_model
def digits_cnn(
    in_channels: int, num_classes: int, image_size: int, pretrained: bool = False, width: int = 32
) -> nn.Module:
    """Two 3×3 convolutions, a max-pool and two linear layers (the default for the digits)."""
    _no_pretrained("digits_cnn", pretrained)
    return _digits_cnn(in_channels, num_classes, image_size, width, bn=False)


@register_model
def digits_cnn_bn(
    in_channels: int, num_classes: int, image_size: int, pretrained: bool = False, width: int = 32
) -> nn.Module:
    """digits_cnn with BatchNorm after each convolution (for methods whose early phase can kill ReLUs)."""
    _no_pretrained("digits_cnn_bn", pretrained)
    return _digits_cnn(in_channels, num_classes, image_size, width, bn=True)


class SmallCNN(nn.Module):
    """TRADES' MNIST network: four 3×3 convolutions in two blocks, then 200-200 fully connected."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, drop: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 200),
            nn.ReLU(),
            nn.Dropout(drop),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def small_cnn(
    in_channels: int, num_classes: int, image_size: int, pretrained: bool = False, drop: float = 0.5
) -> nn.Module:
    """TRADES' MNIST network (4 conv + 3 fc), for 28×28 inputs or larger."""
    _no_pretrained("small_cnn", pretrained)
    if image_size < 16:
        raise ConfigError(f"small_cnn needs images of at least 16×16 pixels, got {image_size}; use digits_cnn")
    return SmallCNN(in_channels, num_classes, image_size, drop)
