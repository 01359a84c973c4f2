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
from regdefense.host.contract import APPLIES_WEIGHTS, PGD_INFO, Key, adversary
from regdefense.host.defense import Budget, Defense
from regdefense.host.losses import kl


class TRADES(Defense):
    """TRADES: clean CE plus β·KL between clean and adversarial predictions."""

    name = "trades"
    publishes = (*adversary(*PGD_INFO), Key("outputs.clean", "compute_loss"), Key("outputs.adv", "compute_loss"))
    reads = (APPLIES_WEIGHTS,)

    @dataclass
    class Config(Budget):
        beta: float = option(6.0, "weight of the robust KL term (Zhang et al.: 6)", ge=0)
        attack: Literal["kl", "ce"] = option(
            "kl",
            "inner maximisation: TRADES' label-free KL, or CE-PGD against "
            "step.targets (what dynamic-label defenses such as DYNAT-Inner need)",
        )

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        if c.attack == "ce":
            return c.pgd(trainer, model, step, start=0.001 * torch.randn_like(step.inputs), clip_start=False)
        return c.kl_pgd(trainer, model, step)

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        clean, adv = model(step.inputs), model(step.adv_inputs)
        step.outputs.update(clean=clean, adv=adv)
        return {
            "task": trainer.ce(clean, step.targets),
            "robust": self.config.beta * trainer.adv_mean(kl(clean, adv), step, adv),
        }
