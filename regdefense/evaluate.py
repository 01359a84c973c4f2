"""Accuracy under attack: the building blocks the loop's per-epoch check and final table use."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from regdefense.attacks import model_mode

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def correct(model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None = None, *, batch_size: int = 256,
            device: torch.device | str = "cpu") -> Tensor:
    """Per-sample correctness (bool, on the CPU) of ``model`` on ``x`` or on ``attack(model, x, y)``.

    The model is evaluated in eval mode and its previous mode restored.
    """
    out = []
    with model_mode(model, False):
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].to(device)
            yb = y[i:i + batch_size].to(device)
            if attack is not None:
                xb = attack(model, xb, yb)
            with torch.no_grad():
                out.append((model(xb).argmax(1) == yb).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None = None, **kw) -> float:
    """Fraction of samples classified correctly (under ``attack`` if given)."""
    c = correct(model, x, y, attack, **kw)
    return float(c.float().mean()) if len(c) else float("nan")
