"""Per-image random crops and flips, drawn for a whole global batch (the in-memory and streamed loaders share them)."""

from __future__ import annotations

import torch
from torch import Tensor


def draw_augment(b: int, mode: str, gen: torch.Generator, pad: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image random crop offsets and flips for ``augment_batch``, drawn for a whole global batch."""
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5 if mode == "crop_flip" else torch.zeros(b, dtype=torch.bool)
    return dy, dx, flip


def scaled_pad(side: int, pad: int = 4) -> int:
    """The crop padding for images of ``side`` pixels: ``pad`` (4) from 32 px up, an eighth of the side below (1 px on
    the 8×8 digits, where 4 would shift away half the image)."""
    return pad if side >= 32 else max(1, min(pad, side // 8))


def augment_batch(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int | None = None) -> Tensor:
    """Crop each image at offset (dy, dx) from a zero-padded copy, then mirror those with ``flip``. With the default
    ``pad`` the offsets were drawn for 4 px and, on images under 32 px, are scaled to :func:`scaled_pad` (the draws,
    and so every other random stream, stay the same); an explicit ``pad`` is used as given."""
    b, c, h, w = x.shape
    pad, small = (4, scaled_pad(min(h, w))) if pad is None else (pad, pad)
    if small != pad:
        dy = torch.div(dy * small + pad // 2, pad, rounding_mode="floor")
        dx = torch.div(dx * small + pad // 2, pad, rounding_mode="floor")
        pad = small
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    x = x.gather(3, cols)
    return torch.where(flip[:, None, None, None], x.flip(3), x)
