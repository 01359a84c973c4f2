"""N-FGSM (de Jorge et al., NeurIPS 2022): one FGSM step from a large noisy start, without projecting back.

η ~ U(−k·ε, k·ε) (k = ``noise``, 2 in the paper), kept inside the image range; one signed gradient step of
α (= ε by default) from x + η; the result is kept inside the image range but not projected onto the ε-ball, so the
training perturbation reaches (k + 1)·ε. Train on CE(f(x + δ), y). The reference code keeps the model in train mode
for the attack step and offers an optional clip (``clip``·ε, off by default). A single-step method: the loop's
catastrophic-overfitting guard compares FGSM and PGD accuracy every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.attacks.adapter import model_mode
from regdefense.host.contract import adversary
from regdefense.host.defense import Defense, SingleStepBudget


class NFGSM(Defense):
    """Noise of k·ε, one FGSM step of α = ε, no projection to the ε-ball."""

    name = "n_fgsm"
    publishes = adversary("info.x_init")
    single_step = True
    norms = ("linf",)

    @dataclass
    class Config(SingleStepBudget):
        eps: float | None = option(None, "perturbation budget ε (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(None, "step size (none: 1.0·ε, the paper's)", gt=0)
        noise: float = option(2.0, "k: the start is x + U(−k·ε, k·ε) (0: no noise)", ge=0)
        clip: float | None = option(
            None, "project the perturbation onto the clip·ε ball (none: no projection, the paper's)", gt=0
        )
        attack_mode: Literal["eval", "train"] = option(
            "train", "BN/dropout mode during the attack step (train, as the reference code)"
        )

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        eps, alpha = c.resolve(trainer)
        x, y = step.inputs.detach(), step.targets
        eta = torch.empty_like(x).uniform_(-c.noise * eps, c.noise * eps) if c.noise > 0 else torch.zeros_like(x)
        eta = (x + eta).clamp(0, 1) - x
        with trainer.attack_autocast(), model_mode(model, c.attack_mode == "train"), torch.enable_grad():
            eta.requires_grad_(True)
            loss = F.cross_entropy(model(x + eta).float(), y)
            (grad,) = torch.autograd.grad(loss, eta)
        delta = (x + eta.detach() + alpha * grad.sign()).clamp(0, 1) - x
        if c.clip is not None:
            delta = delta.clamp(-c.clip * eps, c.clip * eps)
        step.info["x_init"] = (x + eta).detach()
        return (x + delta).detach()
