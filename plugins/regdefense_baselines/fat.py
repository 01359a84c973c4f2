"""FAT: friendly adversarial training (Zhang et al., ICML 2020), a baseline of seed 002's tables.

Trains on "friendly" adversarial examples: PGD-K-τ stops each point τ steps after it is first misclassified
(:func:`regdefense.attacks.adapter.early_stopped_pgd`), so the model learns from points just across the boundary
instead of the most adversarial ones. The outer loss is the active objective on those points (cross-entropy
by default: FAT for AT). τ grows during training (the authors' ``dynamictau``: 0 up to epoch 50, 1 up to 90,
then 2, counting epochs from 1).

Defaults (the authors' CIFAR-10 script): ε 0.031, step 0.007, K 10, ω = 0.001 (noise on each step), uniform
random start. GAIR-FAT: stack with ``gairat`` (κ is counted by the early-stopped attack).

Differences from the reference code: the reference removes frozen points from the batch and concatenates them
back in another order (the loss is a mean, so only the order differs); it draws its step noise only for the
points still moving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from regdefense import hookimpl, option
from regdefense.attacks.adapter import early_stopped_pgd
from regdefense.base.errors import ConfigError
from regdefense.host.contract import PGD_INFO, adversary
from regdefense.host.defense import Defense, StepBudget


class FAT(Defense):
    """Early-stopped PGD (PGD-K-τ): train on the friendliest adversarial points."""

    name = "fat"
    publishes = adversary(*PGD_INFO)
    norms = ("linf",)

    @dataclass
    class Config(StepBudget):
        alpha_factor: ClassVar[float] = 2.5

        eps: float | None = option(None, "perturbation budget (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(None, "step size (none: 2.5·ε/steps; the authors: 0.007 at ε 0.031)", gt=0)
        steps: int = option(10, "K: the most PGD steps", ge=1)
        tau: int = option(0, "τ: steps a point keeps moving after it is misclassified (without a schedule)", ge=0)
        tau_schedule: list[int] = option(
            default_factory=lambda: [50, 90],
            help="epochs (counted from 1) after which τ grows by one (authors: "
            "τ 0 up to 50, 1 up to 90, then 2); [] keeps τ fixed",
        )
        omega: float = option(0.001, "std of the Gaussian noise added to each step", ge=0)
        random_start: bool = option(True, "start from a uniform draw in the ε-ball")

        def __post_init__(self) -> None:
            if sorted(self.tau_schedule) != list(self.tau_schedule):
                raise ConfigError(f"fat.tau_schedule must be increasing epochs, got {self.tau_schedule}")

    def current_tau(self, epoch: int) -> int:
        """τ of the 0-based ``epoch``: ``tau`` plus the number of schedule epochs already passed."""
        return self.config.tau + sum(epoch + 1 > e for e in self.config.tau_schedule)

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        eps, alpha = c.resolve(trainer)
        with trainer.attack_autocast():
            return early_stopped_pgd(
                model,
                step.inputs,
                step.targets,
                eps=eps,
                alpha=alpha,
                steps=c.steps,
                tau=self.current_tau(trainer.state.epoch),
                omega=c.omega,
                random_init=c.random_start,
                info=step.info,
            )
