"""The model zoo: ``create_model(name, ...)`` and ``list_models()``.

Every model maps [0,1] inputs (N×C×H×W) to logits. Architectures register themselves with
:func:`register_model`; a factory receives ``in_channels``, ``num_classes``, ``image_size`` and
``pretrained`` plus its own keyword arguments.
"""

from __future__ import annotations

from torch import nn

from regdefense.base.errors import ConfigError
from regdefense.data.registry import spec_of
from regdefense.models import cifar, small, tv  # noqa: F401  (the zoo's architectures register themselves)
from regdefense.models._registry import MODELS, Normalize, register_model
from regdefense.models.robustbench_zoo import architecture
from regdefense.models.timm_models import create_timm

__all__ = ["MODELS", "Normalize", "create_model", "default_model", "list_models", "register_model"]


def list_models() -> list[str]:
    return MODELS.names()


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    pretrained: bool = False,
    normalize: tuple[list[float], list[float]] | None = None,
    dataset: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build architecture ``name``.

    :param normalize: ``(mean, std)`` to put in front of the network as buffers, or None.
    :param dataset: the data's name (picks a ``robustbench:NAME`` architecture's leaderboard).
    :param kwargs: architecture options (e.g. ``depth``, ``widen`` for ``wideresnet``); None values
        are dropped so they never override an architecture's defaults.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("timm:"):
        extra = {k: kwargs.pop(k) for k in ("weights", "input_size") if k in kwargs}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("depth", "widen", "activation", "bn_momentum")}
        if kwargs:
            raise ConfigError(
                f"timm models take model.pretrained, model.weights and model.input_size, not "
                f"{', '.join(sorted(kwargs))}"
            )
        net = create_timm(
            name[5:],
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            pretrained=pretrained,
            **extra,
        )
        return nn.Sequential(Normalize(*normalize), net) if normalize is not None else net
    if name.startswith("robustbench:"):
        if normalize is not None:
            raise ConfigError("RobustBench zoo models normalise inside; set model.normalize=false")
        return architecture(name, num_classes=num_classes, pretrained=pretrained, dataset=dataset)
    factory = MODELS.get(name)  # an unknown name: one line listing the zoo
    if "weights" in kwargs:
        raise ConfigError(
            f"model.weights loads a local file into a timm model; '{name}' is not one (use --init for a "
            f"regdefense checkpoint)"
        )
    try:
        net = factory(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size, pretrained=pretrained, **kwargs
        )
    except TypeError as exc:
        raise ConfigError(f"model '{name}' does not take these options: {exc}") from None
    if normalize is not None:
        net = nn.Sequential(Normalize(*normalize), net)
    return net


def default_model(dataset: str, image_size: int | None = None) -> str:
    """The architecture ``model.name = "auto"`` picks: the dataset's own (digits, MNIST), else one sized for its
    images — ``digits_cnn`` below 16 px, ``small_cnn`` below 32 px, ``resnet18`` from 32 px (an 11M-parameter CIFAR
    ResNet for 8×8 images, as a folder of them used to get, is not a sensible default)."""
    spec = spec_of(dataset)
    if spec is not None and spec.model is not None:
        return spec.model
    if image_size is None:
        return "resnet18"
    return "digits_cnn" if image_size < 16 else "small_cnn" if image_size < 32 else "resnet18"
