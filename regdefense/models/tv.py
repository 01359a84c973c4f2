"""torchvision architectures by name, adapted to small inputs and any number of classes.

Grey-scale inputs are repeated to three channels and inputs smaller than the architecture needs
are resized up inside the model, so ``resnet50`` runs on the 8×8 digits and 28×28 MNIST as is.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.base.errors import ConfigError
from regdefense.models._registry import Normalize, register_model

#: smallest input side each architecture accepts (alexnet's pooling, inception's stem)
_MIN_SIZE = {"alexnet": 63, "inception_v3": 75}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TorchvisionNet(nn.Module):
    """A torchvision network behind channel expansion, resizing (up to ``min_size``, or always to ``input_size``)
    and, with ImageNet weights, ImageNet normalisation. Inputs and perturbations stay at the data's resolution."""

    def __init__(
        self, net: nn.Module, in_channels: int, min_size: int, pretrained: bool, input_size: int | None = None
    ) -> None:
        super().__init__()
        self.net = net
        self.expand = in_channels == 1
        self.min_size = min_size
        self.input_size = input_size
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD) if pretrained else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.expand:
            x = x.expand(-1, 3, -1, -1)
        side = self.input_size or (self.min_size if min(x.shape[-2:]) < self.min_size else None)
        if side is not None and tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return self.net(self.normalize(x))


def _replace_head(net: nn.Module, num_classes: int) -> None:
    name, last = None, None
    for n, m in net.named_modules():
        if isinstance(m, nn.Linear):
            name, last = n, m
    if name is None or last is None:
        raise ConfigError(f"{type(net).__name__} has no Linear layer to replace with a {num_classes}-class head")
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))


def _build(arch: str, in_channels: int, num_classes: int, pretrained: bool, input_size: int | None = None) -> nn.Module:
    import torchvision

    if in_channels not in (1, 3):
        raise ConfigError(f"torchvision model '{arch}' takes 1- or 3-channel images, got {in_channels} channels")
    extra = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    if pretrained:
        try:
            net = torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as exc:  # download failures surface as URLError/OSError/RuntimeError
            raise ConfigError(f"could not load pretrained weights for {arch} (needs a network): {exc}") from None
        if arch == "inception_v3":
            net.aux_logits, net.AuxLogits = False, None
        _replace_head(net, num_classes)
    else:
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    if input_size is not None and input_size < _MIN_SIZE.get(arch, 32):
        raise ConfigError(f"model.input_size {input_size} is below the {_MIN_SIZE.get(arch, 32)} pixels {arch} needs")
    return TorchvisionNet(net, in_channels, _MIN_SIZE.get(arch, 32), pretrained, input_size)


def _factory(arch: str):
    def make(
        in_channels: int, num_classes: int, image_size: int, pretrained: bool = False, input_size: int | None = None
    ) -> nn.Module:
        return _build(arch, in_channels, num_classes, pretrained, input_size)

    make.__name__ = arch
    make.__doc__ = f"torchvision's {arch}, adapted to the dataset's channels, classes and image size."
    return make


for _arch in (
    "resnet50",
    "resnet101",
    "alexnet",
    "mobilenet_v2",
    "densenet121",
    "inception_v3",
    "vgg16",
    "convnext_tiny",
):
    register_model(_factory(_arch))
