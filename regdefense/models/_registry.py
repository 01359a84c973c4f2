"""The zoo's registry of architectures, apart from the package's face so that model files import it (as timm's
``_registry``), never ``regdefense.models`` itself."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from regdefense.base.errors import ConfigError
from regdefense.base.registry import Registry

#: architectures by name; a third party adds one under the ``regdefense.models`` entry-point group (a factory taking
#: ``in_channels, num_classes, image_size, pretrained`` and its own options)
MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model",
    "regdefense.models",
    error=ConfigError,
    hint=", timm:NAME for any timm model or robustbench:NAME for a RobustBench zoo architecture",
)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    return MODELS.register(fn.__name__, fn)


class Normalize(nn.Module):
    """Subtract a mean and divide by a std per channel, kept as buffers (RobustBench's contract)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
