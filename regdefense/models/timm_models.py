"""timm architectures by name: ``model.name = "timm:convnext_tiny"``, ``timm:deit_small_patch16_224``, ...

The large-scale robustness work people compare with (Singh et al. 2023, ARES 2.0, RobustBench's ImageNet track)
trains timm's ConvNeXt, DeiT/ViT, Swin and ResNet-50; any of timm's names works here, as the run's model, a DYNAT or
LBGAT guide (``dynat.guide=timm:resnet50``) or an evaluation target. The network is built by ``timm.create_model``
with this data's classes and channels (and, for transformers, its image size); with ``model.pretrained`` it starts
from timm's weights (downloaded through huggingface_hub when online; ``model.weights=FILE`` loads a local file
offline, read as data by :func:`read_weights_file`) and takes inputs in [0, 1] with the weights' own normalisation
inside the model, as RobustBench expects.
Grey-scale inputs and inputs smaller than a transformer's patch grid are handled as for torchvision models:
channels repeated, image resized inside the model (``model.input_size``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.base import checkpoint
from regdefense.base.errors import ConfigError, first_line
from regdefense.models._registry import Normalize

#: inputs smaller than this are resized up inside the model (timm's networks downsample by 32)
MIN_SIDE = 32


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models need the timm package: pip install 'regdefense[timm]'") from None
    return timm


def timm_names(pattern: str = "*") -> list[str]:
    return _timm().list_models(pattern)


def read_weights_file(path: str) -> dict[str, Any]:
    """A local weights file as data: ``.safetensors``, or a torch file read with ``weights_only=True`` (timm's own file
    loading unpickles with ``weights_only=False``), then the state_dict inside it as timm picks it (``state_dict_ema``,
    ``model_ema``, ``state_dict``, ``model``; ``module.`` and ``_orig_mod.`` prefixes removed)."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path)
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"model.weights={path}: not a readable safetensors file: {first_line(exc)}") from None
    else:
        obj = checkpoint.read(path)  # a CheckpointError (a UserError) for anything but tensors and plain containers
    keys = ("state_dict_ema", "model_ema", "state_dict", "model")
    inner = [k for k in keys if isinstance(obj, dict) and obj.get(k) is not None]
    obj = obj[inner[0]] if inner else obj
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ConfigError(f"model.weights={path} holds {type(obj).__name__} that is not a state_dict")
    from timm.models import clean_state_dict

    return clean_state_dict(obj)


class TimmNet(nn.Module):
    """A timm network behind channel expansion, resizing to ``input_size`` and its weights' normalisation."""

    def __init__(self, net: nn.Module, expand: bool, input_size: int | None, normalize: nn.Module) -> None:
        super().__init__()
        self.net, self.expand, self.input_size, self.normalize = net, expand, input_size, normalize

    def forward(self, x: Tensor) -> Tensor:
        if self.expand:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net(self.normalize(x))


def create_timm(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    pretrained: bool = False,
    weights: str | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """``timm.create_model(arch)`` for this data (see the module's docstring)."""
    timm = _timm()
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(
            f"timm has no model '{arch}'"
            + (f"; similar: {', '.join(close)}" if close else "")
            + " (`python -c \"import timm; print(timm.list_models('convnext*'))\"` lists them)"
        )
    expand = in_channels == 1 and pretrained
    kwargs: dict = {"num_classes": num_classes, "in_chans": 3 if expand else in_channels}
    if weights:  # read here, as data; timm then adapts it (its filter, the input conv, a new head for other classes)
        kwargs["pretrained_cfg_overlay"] = {"state_dict": read_weights_file(str(weights))}
    if input_size is None and image_size < MIN_SIDE:  # 8×8 digits through a stride-32 network: resize inside
        input_size = MIN_SIDE
    side = input_size or image_size

    def build(**extra) -> nn.Module:
        try:
            return timm.create_model(arch, pretrained=pretrained or bool(weights), **kwargs, **extra)
        except (OSError, RuntimeError) as exc:
            raise ConfigError(
                f"could not get timm weights for '{arch}': {first_line(exc, 200)} — offline, "
                f"pass model.weights=FILE (a local .safetensors/.pth of that architecture)"
            ) from None

    try:  # transformers fix their patch grid at construction: give them the data's size
        net = build(img_size=side)
    except TypeError:  # convolutional networks take any size and no img_size argument
        net = build()
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    cfg.pop("state_dict", None)  # timm keeps a copy of the overlay in the model's config
    norm = (
        Normalize(list(cfg["mean"]), list(cfg["std"])) if (pretrained or weights) and "mean" in cfg else nn.Identity()
    )
    return TimmNet(net, expand, input_size, norm)
