"""The purifier (a small U-Net in-painter/denoiser) and the optional hinge-GAN discriminator."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.base.errors import ConfigError


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


class UNetPurifier(nn.Module):
    """In-paints and denoises: input the masked image and its mask (1 = missing), output a full image in [0, 1].

    Every pixel is regenerated (as AToP's purifier does). ``depth`` downsamplings, chosen from the image
    size when not given (2 for 8×8 digits, 3 for 32×32 CIFAR); trains on the CPU in minutes on the digits.
    """

    def __init__(self, channels: int, image_size: int, width: int = 32, depth: int | None = None) -> None:
        super().__init__()
        if depth is None:
            depth = 0
            while depth < 3 and image_size // 2 ** (depth + 1) >= 2:
                depth += 1
        self.enc = nn.ModuleList()
        c = channels + 1
        widths = [width * 2**i for i in range(depth + 1)]
        for w in widths[:-1]:
            self.enc.append(_block(c, w))
            c = w
        self.mid = _block(c, widths[-1])
        self.dec = nn.ModuleList()
        c = widths[-1]
        for w in reversed(widths[:-1]):
            self.dec.append(_block(c + w, w))
            c = w
        self.out = nn.Conv2d(c, channels, 1)

    def forward(self, masked: Tensor, mask: Tensor) -> Tensor:
        h = torch.cat([masked, mask], dim=1)
        skips = []
        for block in self.enc:
            h = block(h)
            skips.append(h)
            h = F.avg_pool2d(h, 2, ceil_mode=True)
        h = self.mid(h)
        for block, skip in zip(self.dec, reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1))
        return torch.sigmoid(self.out(h))


class Discriminator(nn.Module):
    """A small patch discriminator on [image, mask] for the hinge GAN term."""

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        return self.net(torch.cat([image, mask], dim=1)).flatten(1)


def build_purifier(spec: str, channels: int, image_size: int, width: int) -> nn.Module:
    """``unet`` or ``python:package.module:callable`` — a user's generator factory, called with
    ``(channels=..., image_size=...)`` and returning a module ``(masked_image, mask) -> image in [0,1]``."""
    if spec == "unet":
        return UNetPurifier(channels, image_size, width)
    if spec.startswith("python:"):
        module, _, attr = spec[len("python:") :].partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"atop.purifier '{spec}' cannot be loaded: {exc}") from None
        return factory(channels=channels, image_size=image_size)
    raise ConfigError(f"atop.purifier must be 'unet' or 'python:module:callable', got '{spec}'")
