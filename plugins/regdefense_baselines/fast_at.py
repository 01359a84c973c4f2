"""Fast AT / FGSM-RS (Wong, Rice & Kolter, ICLR 2020).

δ₀ ~ U(−ε, ε), one signed gradient step of α = 1.25·ε, projection onto the ε-ball and [0, 1]; train on
CE(f(x + δ), y). The reference code keeps the model in train mode for the attack step. A single-step
method: the loop's catastrophic-overfitting guard compares FGSM and PGD accuracy every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from regdefense import hookimpl, option
from regdefense.attacks.adapter import pgd
from regdefense.host.contract import PGD_GRAD, PGD_INFO, adversary
from regdefense.host.defense import Defense, SingleStepBudget


class FastAT(Defense):
    """FGSM with a random start (α = 1.25ε)."""

    name = "fast_at"
    publishes = adversary(*PGD_INFO, PGD_GRAD)
    single_step = True
    norms = ("linf",)

    @dataclass
    class Config(SingleStepBudget):
        alpha_factor: ClassVar[float] = 1.25

        eps: float | None = option(None, "perturbation budget (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(None, "step size (none: 1.25·ε)", gt=0)
        attack_mode: Literal["eval", "train"] = option(
            "train", "BN/dropout mode during the attack step (train, as the reference code)"
        )
        start: Literal["uniform", "zero"] = option(
            "uniform", "the step's start: uniform in the ε-ball (FGSM-RS) or x itself (plain FGSM, GradAlign's)"
        )

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        eps, alpha = c.resolve(trainer)
        with trainer.attack_autocast():
            return pgd(
                model,
                step.inputs,
                step.targets,
                eps=eps,
                alpha=alpha,
                steps=1,
                norm="linf",
                start="uniform" if c.start == "uniform" else None,
                train_mode=c.attack_mode == "train",
                info=step.info,
            )
