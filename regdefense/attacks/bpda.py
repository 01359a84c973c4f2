"""Adaptive views of a model for the masking checks: BPDA with the identity through a non-differentiable step.

A defense that quantises, JPEG-compresses, denoises without gradients or simply detaches its input gives a gradient
attack nothing to follow, and PGD reports robustness that is not there (Athalye et al. 2018, "Obfuscated Gradients").
BPDA replaces the step by the identity on the backward pass: forward ``f(x)``, backward as if ``f(x) = x``.

:func:`bpda_view` finds that step in one of two ways:

- declared: the model has a ``bpda_model`` attribute (AToP's purified model does), which is used as is;
- exposed: a submodule receives an input of the image's shape that no longer depends differentiably on the image
  (detached, or with a zero Jacobian as after rounding). The view re-attaches that input as
  ``x + (input - x).detach()`` — the input's value, the image's gradient.

A step inside one module's ``forward`` with no submodule after it cannot be found; such a model should declare a
``bpda_model``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from regdefense.attacks.adapter import model_mode


def find_nondifferentiable(model: nn.Module, x: Tensor) -> str | None:
    """The name of the first submodule (in call order) whose image-shaped input does not depend differentiably on
    ``x``, or None. One forward and a few vector-Jacobian products on a couple of inputs."""
    seen: list[tuple[str, Tensor]] = []
    names = {m: n for n, m in model.named_modules() if n}

    def pre(module, args):
        if args and isinstance(args[0], Tensor) and args[0].shape == xb.shape and module in names:
            if all(n != names[module] for n, _ in seen):
                seen.append((names[module], args[0]))

    xb = x[:4].detach().clone().requires_grad_(True)
    handles = [m.register_forward_pre_hook(pre) for m in names]
    try:
        with model_mode(model, False), torch.enable_grad():
            model(xb)
            for name, inp in seen:
                if not inp.requires_grad:
                    return name
                (g,) = torch.autograd.grad(
                    inp, xb, grad_outputs=torch.randn_like(inp), retain_graph=True, allow_unused=True
                )
                if g is None or not bool(g.abs().sum() > 0):
                    return name
    finally:
        for h in handles:
            h.remove()
    return None


class StraightThrough(nn.Module):
    """``model`` with the input of its submodule ``name`` re-attached to the image: forward unchanged, backward as if
    every step before that submodule were the identity."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x: Tensor) -> Tensor:
        done: list[Any] = []

        def pre(module, args):
            if done or args[0].shape != x.shape:
                return None
            done.append(True)
            return (x + (args[0] - x).detach(), *args[1:])

        handle = self.model.get_submodule(self.name).register_forward_pre_hook(pre)
        try:
            return self.model(x)
        finally:
            handle.remove()


def bpda_view(model: nn.Module, x: Tensor) -> tuple[nn.Module, str] | None:
    """A BPDA view of ``model`` and what it straightens, or None when the model has no non-differentiable step."""
    declared = getattr(model, "bpda_model", None)
    if isinstance(declared, nn.Module):
        return declared, "the model's declared bpda_model"
    name = find_nondifferentiable(model, x)
    if name is None:
        return None
    return StraightThrough(
        model, name
    ), f"the input of submodule '{name}' (it does not depend differentiably on the image)"
