"""ZeroGrad and MultiGrad (Golgooni et al., 2021): FGSM steps that skip the input-gradient coordinates they cannot
trust, against catastrophic overfitting.

- ``zerograd``: FGSM-RS (δ₀ ~ U(−ε, ε) inside the image range) whose gradient coordinates below the ``q``-quantile of
  their sample's |∇| are set to zero before the signed step α; the result is projected onto the ε-ball and the
  image range.
- ``multigrad``: the input gradient at ``samples`` random points of the ε-ball; a coordinate whose signs do not agree
  in at least ``threshold`` of them is zeroed (all of them by default); the step of α starts from x itself (not from
  a random point) and is projected onto the ε-ball and the image range.

As in the authors' code: α = 2·ε by default (so the projected step is ±ε where the gradient is kept), the quantile
is taken per sample over all its coordinates, MultiGrad's random points are evaluated one after the other (the
reference's default, not its batched variant), and the model stays in train mode for every attack forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.attacks.adapter import model_mode
from regdefense.base.errors import ConfigError
from regdefense.host.contract import adversary
from regdefense.host.defense import Defense, SingleStepBudget


def _random_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) - x


def _input_grad(model, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    delta = delta.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x + delta).float(), y)  # batch mean, as theirs: the quantile sees their values
    return torch.autograd.grad(loss, delta)[0].detach()


def _finish(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    return (x + delta.clamp(-eps, eps)).clamp(0, 1).detach()


def quantile_mask(grad: torch.Tensor, q: float) -> torch.Tensor:
    """``grad`` with each sample's coordinates below the ``q``-quantile of its |grad| set to zero."""
    flat = grad.abs().flatten(1)
    cut = torch.quantile(flat, q, dim=1).view(-1, *[1] * (grad.dim() - 1))
    return torch.where(grad.abs() < cut, torch.zeros_like(grad), grad)


def consensus(grads: list[torch.Tensor], threshold: int) -> torch.Tensor:
    """Σ sign(gᵢ), zero where fewer than ``threshold`` of the signs agree (|Σ| < 2·threshold − k)."""
    g = sum(torch.sign(gi) for gi in grads)
    assert isinstance(g, torch.Tensor)
    return torch.where(g.abs() < 2 * threshold - len(grads), torch.zeros_like(g), g)


class _SingleStep(Defense):
    single_step = True
    publishes = adversary("info.x_init")
    norms = ("linf",)

    def budget(self, trainer) -> tuple[float, float]:
        return self.config.resolve(trainer)


class ZeroGrad(_SingleStep):
    """FGSM-RS without the smallest q-fraction of each sample's gradient coordinates."""

    name = "zerograd"

    @dataclass
    class Config(SingleStepBudget):
        alpha_factor: ClassVar[float] = 2.0

        eps: float | None = option(None, "perturbation budget ε (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(None, "step size (none: 2·ε, the authors' code)", gt=0)
        q: float = option(0.35, "quantile of |∇| below which coordinates are zeroed (0.35 for CIFAR-10)", ge=0, le=1)
        attack_mode: Literal["eval", "train"] = option("train", "BN/dropout mode during the attack (train, as theirs)")

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        eps, alpha = self.budget(trainer)
        x, y = step.inputs.detach(), step.targets
        delta = _random_start(x, eps)
        step.info["x_init"] = (x + delta).detach()
        with trainer.attack_autocast(), model_mode(model, self.config.attack_mode == "train"), torch.enable_grad():
            grad = _input_grad(model, x, delta, y)
        return _finish(x, delta + alpha * quantile_mask(grad, self.config.q).sign(), eps)


class MultiGrad(_SingleStep):
    """A signed step from x along the gradient coordinates whose signs agree at several random points."""

    name = "multigrad"

    @dataclass
    class Config(SingleStepBudget):
        alpha_factor: ClassVar[float] = 2.0

        eps: float | None = option(None, "perturbation budget ε (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(None, "step size (none: 2·ε, the authors' code)", gt=0)
        samples: int = option(3, "random points whose gradient signs are compared", ge=1)
        threshold: int | None = option(None, "keep a coordinate when this many signs agree (none: all samples)", ge=1)
        attack_mode: Literal["eval", "train"] = option("train", "BN/dropout mode during the attack (train, as theirs)")

    def __init__(self, config=None) -> None:
        super().__init__(config)
        c = self.config
        if c.threshold is not None and c.threshold > c.samples:
            raise ConfigError(f"multigrad.threshold ({c.threshold}) cannot exceed multigrad.samples ({c.samples})")

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        eps, alpha = self.budget(trainer)
        x, y = step.inputs.detach(), step.targets
        step.info["x_init"] = x
        with trainer.attack_autocast(), model_mode(model, c.attack_mode == "train"), torch.enable_grad():
            grads = [_input_grad(model, x, _random_start(x, eps), y) for _ in range(c.samples)]
        agreed = consensus(grads, c.threshold or c.samples)
        return _finish(x, alpha * agreed.sign(), eps)
