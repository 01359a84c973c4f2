"""The model zoo: ``create_model(name, ...)`` and ``list_models()``.

Every model maps [0,1] inputs (N×C×H×W) to logits. Architectures register themselves with
:func:`register_model`; a factory receives ``in_channels``, ``num_classes``, ``image_size`` and
``pretrained`` plus its own keyword arguments.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from regdefense.errors import ConfigError, unknown

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _load_all() -> None:
    from regdefense.models import cifar, small, tv  # noqa: F401  (registration side effects)


class Normalize(nn.Module):
    """Subtract a mean and divide by a std per channel, kept as buffers (RobustBench's contract)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def create_model(name: str, *, in_channels: int, num_classes: int, image_size: int, pretrained: bool = False,
                 normalize: tuple[list[float], list[float]] | None = None, dataset: str | None = None,
                 **kwargs) -> nn.Module:
    """Build architecture ``name``.

    :param normalize: ``(mean, std)`` to put in front of the network as buffers, or None.
    :param dataset: the data's name (picks a ``robustbench:NAME`` architecture's leaderboard).
    :param kwargs: architecture options (e.g. ``depth``, ``widen`` for ``wideresnet``); None values
        are dropped so they never override an architecture's defaults.
    """
    _load_all()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("timm:"):
        from regdefense.models.timm_models import create_timm

        extra = {k: kwargs.pop(k) for k in ("weights", "input_size") if k in kwargs}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("depth", "widen", "activation", "bn_momentum")}
        if kwargs:
            raise ConfigError(f"timm models take model.pretrained, model.weights and model.input_size, not "
                              f"{', '.join(sorted(kwargs))}")
        net = create_timm(name[5:], in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                          pretrained=pretrained, **extra)
        return nn.Sequential(Normalize(*normalize), net) if normalize is not None else net
    if name.startswith("robustbench:"):
        from regdefense.models.robustbench_zoo import architecture

        if normalize is not None:
            raise ConfigError("RobustBench zoo models normalise inside; set model.normalize=false")
        return architecture(name, num_classes=num_classes, pretrained=pretrained, dataset=dataset)
    if name not in _REGISTRY:
        raise ConfigError(unknown("model", name, _REGISTRY) + ", timm:NAME for any timm model or robustbench:NAME for "
                                                               "a RobustBench zoo architecture")
    if "weights" in kwargs:
        raise ConfigError(f"model.weights loads a local file into a timm model; '{name}' is not one (use --init for a "
                          f"regdefense checkpoint)")
    try:
        net = _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                              pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model '{name}' does not take these options: {exc}") from None
    if normalize is not None:
        net = nn.Sequential(Normalize(*normalize), net)
    return net


def default_model(dataset: str) -> str:
    """The architecture ``model.name = "auto"`` picks for a dataset."""
    return {"digits": "digits_cnn", "mnist": "small_cnn", "fashion_mnist": "small_cnn"}.get(dataset, "resnet18")
