"""TRADES (Zhang et al., ICML 2019).

L = CE(f(x), y) + β · (1/B) Σᵢ KL(p(xᵢ) ‖ p(x'ᵢ)), with x' maximising the same KL from x + 0.001·N(0, I)
(label-free, eval-mode BN during the attack). The clean side is not detached (as in the reference code).
Defaults: β = 6, ε = the run's, 10 steps of 2.5·ε/10 (TRADES' CIFAR script: ε = 0.031, step 0.007).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from regdefense import hookimpl, option
from regdefense.attacks import kl_pgd, pgd
from regdefense.contract import APPLIES_WEIGHTS, PGD_INFO, Key, adversary
from regdefense.losses import kl
from regdefense_baselines._common import budget


class TRADES:
    """TRADES: clean CE plus β·KL between clean and adversarial predictions."""

    name = "trades"
    publishes = (*adversary(*PGD_INFO), Key("outputs.clean", "compute_loss"), Key("outputs.adv", "compute_loss"))
    reads = (APPLIES_WEIGHTS,)

    @dataclass
    class Config:
        beta: float = option(6.0, "weight of the robust KL term (Zhang et al.: 6)", ge=0)
        eps: float | None = option(None, "perturbation budget (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(None, "attack step size (none: 2.5·ε/steps)", gt=0)
        steps: int = option(10, "attack iterations", ge=1)
        norm: Literal["linf", "l2"] | None = option(None, "perturbation norm (none: the run's)")
        attack_mode: Literal["eval", "train"] = option("eval", "BN/dropout mode during the attack")
        attack: Literal["kl", "ce"] = option("kl", "inner maximisation: TRADES' label-free KL, or CE-PGD against "
                                                   "step.targets (what dynamic-label defenses such as DYNAT-Inner need)")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        eps, alpha = budget(trainer, c.eps, c.alpha, c.steps)
        with trainer.attack_autocast():
            if c.attack == "ce":
                return pgd(model, step.inputs, step.targets, eps=eps, alpha=alpha, steps=c.steps,
                           norm=c.norm or trainer.norm, start=0.001 * torch.randn_like(step.inputs),
                           train_mode=c.attack_mode == "train", info=step.info, clip_start=False)
            return kl_pgd(model, step.inputs, eps=eps, alpha=alpha, steps=c.steps, norm=c.norm or trainer.norm,
                          train_mode=c.attack_mode == "train", info=step.info, kappa_labels=step.targets)

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        clean, adv = model(step.inputs), model(step.adv_inputs)
        step.outputs.update(clean=clean, adv=adv)
        return {"task": trainer.ce(clean, step.targets),
                "robust": self.config.beta * trainer.adv_mean(kl(clean, adv), step, adv)}
