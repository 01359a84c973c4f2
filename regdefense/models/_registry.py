"""The zoo's registry of architectures, apart from the package's face so that model files import it (as timm's
``_registry``), never ``regdefense.models`` itself."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


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
