"""GAIRAT (Zhang et al., ICLR 2021): geometry-aware instance-reweighted adversarial training.

κᵢ = the number of attack iterations (of K) at whose start x'ᵢ was still classified correctly (counted
by the adversary from its own forwards). Weight ω(κ) = ½(1 + tanh(λ + 5·(⌊K/2⌋ − κ)/⌊K/2⌋)) ("tanh";
also "sigmoid" and "discrete" (K + 1 − κ)/(K + 1)), normalised to sum to the batch size, applied to the
adversarial term of whatever objective is active (through ``trainer.adv_mean``). Reweighting starts after
``burn_in_epochs``; λ is fixed or moves linearly from ``lambda_max`` to ``lambda_``.
Defaults of the reference code: λ = −1, fixed, tanh, K = 10, reweighting once ``epoch + 1 >= 60`` (its
``--begin_epoch 60`` against a 1-based count), i.e. from our 0-based epoch 59 of 120.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from regdefense import hookimpl, option
from regdefense.base.errors import PluginError
from regdefense.host.contract import Key
from regdefense.host.defense import Defense


def gair_weights(kappa: torch.Tensor, steps: int, lam: float, fn: str = "tanh") -> torch.Tensor:
    """GAIRAT's per-sample weights from κ, normalised to sum to the batch size."""
    kappa = kappa.float()
    if fn == "discrete":
        w = ((steps + 1) - kappa) / (steps + 1)
    else:
        half = max(1, steps // 2)
        z = lam + (half - kappa) * 5 / half
        w = (z.tanh() + 1) / 2 if fn == "tanh" else z.sigmoid()
    return w * len(w) / w.sum()


class GAIRAT(Defense):
    """Reweights the adversarial term by how close each point is to the decision boundary."""

    name = "gairat"
    reads = (
        Key(
            "info.kappa",
            "compute_loss",
            required=True,
            why="GAIRAT's weights are computed from each point's "
            "κ, which only regdefense's own PGD-type adversaries count; a library attack does not",
        ),
        Key("info.steps", "compute_loss", required=True),
    )
    publishes = (
        Key(
            "weighters",
            "compute_loss",
            required=True,
            why="the active objective does not apply per-sample weights (trainer.adv_mean)",
        ),
    )

    @dataclass
    class Config:
        burn_in_epochs: int = option(
            59,
            "epochs of plain training before reweighting (reference: begin_epoch 60, counted from 1, so 59 here)",
            ge=0,
            epoch="starts",
        )
        lambda_: float = option(-1.0, "λ of the weight function (reference: -1)")
        lambda_max: float | None = option(None, "linear schedule: λ at the end of burn-in (none: no schedule)")
        schedule: Literal["fixed", "linear"] = option("fixed", "λ schedule after burn-in")
        weight_fn: Literal["tanh", "sigmoid", "discrete"] = option("tanh", "weight assignment function")

    def current_lambda(self, trainer) -> float:
        """λ of this epoch; ``linear``: λ_max + (e/E)·(λ − λ_max) with e the 1-based epoch and E the run's epochs,
        as the reference's ``adjust_Lambda`` (the fraction runs over the whole run, not from the burn-in's end)."""
        c = self.config
        if c.schedule == "fixed" or c.lambda_max is None:
            return c.lambda_
        frac = min(1.0, (trainer.state.epoch + 1) / trainer.config.train.epochs)
        return c.lambda_max + frac * (c.lambda_ - c.lambda_max)

    def weights(self, step, adv_logits) -> torch.Tensor:
        if "kappa" not in step.info:
            raise PluginError(
                "gairat needs an adversary that reports per-sample kappa (pgd_at, trades, mart, "
                "dynat); a library attack does not"
            )
        return gair_weights(step.info["kappa"], step.info["steps"], self._lam, self.config.weight_fn)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step):
        if trainer.state.epoch >= self.config.burn_in_epochs and self.weights not in step.weighters:
            self._lam = self.current_lambda(trainer)
            step.weighters.append(self.weights)
        return (yield)
