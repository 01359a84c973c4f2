"""AToP's random transforms and the purified / defended modules.

RT1: random block masks. RT2: Gaussian noise, then block masks (the paper's main setting). RT3: noise, then N
complementary masks that together cover the image; each masked copy is in-painted and every pixel is taken from
the copy in which it was missing. Masks are shared by the batch (as the authors' code) unless ``per_sample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class RandomTransform:
    kind: str = "rt2"
    block_size: int = 1
    missing_rate: float = 0.25
    sigma: float = 0.25
    per_sample: bool = False
    n_masks: int = 4

    def _grid(self, h: int, w: int) -> tuple[int, int]:
        return math.ceil(h / self.block_size), math.ceil(w / self.block_size)

    def _expand(self, blocks: Tensor, h: int, w: int) -> Tensor:
        b = self.block_size
        return blocks.repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)[..., :h, :w]

    def masks(self, x: Tensor) -> Tensor:
        """A mask (1 = missing) with ``round(missing_rate · blocks)`` missing blocks, (B or 1)×1×H×W."""
        n, (_, _, h, w) = (x.shape[0] if self.per_sample else 1), x.shape
        gh, gw = self._grid(h, w)
        k = round(self.missing_rate * gh * gw)
        order = torch.rand(n, gh * gw, device=x.device).argsort(dim=1)
        blocks = torch.zeros(n, gh * gw, device=x.device)
        blocks.scatter_(1, order[:, :k], 1.0)
        return self._expand(blocks.view(n, 1, gh, gw), h, w)

    def complementary(self, x: Tensor) -> list[Tensor]:
        """``n_masks`` masks whose missing blocks partition the image (RT3)."""
        n, (_, _, h, w) = (x.shape[0] if self.per_sample else 1), x.shape
        gh, gw = self._grid(h, w)
        group = torch.rand(n, gh * gw, device=x.device).argsort(dim=1) % self.n_masks
        return [self._expand((group == g).float().view(n, 1, gh, gw), h, w) for g in range(self.n_masks)]

    def noisy(self, x: Tensor) -> Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0, 1) if self.kind in ("rt2", "rt3") else x


class Purified(nn.Module):
    """x ↦ purifier(t(x)): a fresh random transform at every call; output in [0, 1]."""

    def __init__(self, purifier: nn.Module, transform: RandomTransform) -> None:
        super().__init__()
        self.purifier, self.transform = purifier, transform

    def forward(self, x: Tensor) -> Tensor:
        t = self.transform
        xn = t.noisy(x)
        if t.kind == "rt3":
            out = torch.zeros_like(x)
            for m in t.complementary(x):
                out = out + m * self.purifier(xn * (1 - m), m.expand(x.shape[0], 1, *x.shape[-2:]))
            return out
        m = t.masks(x).expand(x.shape[0], 1, *x.shape[-2:])
        return self.purifier(xn * (1 - m), m)


class Defended(nn.Module):
    """The defended model classifier ∘ purifier ∘ transform: what evaluation and export see."""

    def __init__(self, purified: Purified, classifier: nn.Module) -> None:
        super().__init__()
        self.purified, self.classifier = purified, classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.purified(x))

    @property
    def bpda_model(self) -> nn.Module:
        """The same model with the purifier's gradient replaced by the identity (BPDA)."""
        return BPDAIdentity(self.purified, self.classifier)


class BPDAIdentity(nn.Module):
    """Forward: classifier(purifier(t(x))); backward: as if the purifier were the identity."""

    def __init__(self, purified: Purified, classifier: nn.Module) -> None:
        super().__init__()
        self.purified, self.classifier = purified, classifier

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            p = self.purified(x)
        return self.classifier(x + (p - x).detach())
