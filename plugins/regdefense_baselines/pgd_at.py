"""PGD adversarial training (Madry et al., ICLR 2018).

min_θ E[ max_{‖δ‖≤ε} CE(f_θ(x + δ), y) ]: the inner maximisation is projected gradient ascent with a
random start (L∞ sign steps or L2 normalised steps); the outer loss is cross-entropy on the
adversarial batch, or with ``clean_weight = w`` the mixed objective
(1 − w)·CE(f(x_adv), y) + w·CE(f(x), y) (w = 0.5 is a clean ∪ adversarial batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from regdefense import hookimpl, option
from regdefense.attacks.adapter import resolve_attack
from regdefense.host.contract import PGD_GRAD, PGD_INFO, adversary
from regdefense.host.defense import Budget, Defense


class PGDAT(Defense):
    """PGD-AT: train on projected-gradient adversarial examples."""

    name = "pgd_at"
    publishes = adversary(*PGD_INFO, PGD_GRAD, when="not attack")  # a library attack reports nothing per sample

    @dataclass
    class Config(Budget):
        random_start: bool = option(True, "start from a uniform draw in the ε-ball")
        clean_weight: float = option(
            0.0,
            "weight of clean CE: 0 trains on adversarial batches only, 0.5 on mixed clean+adversarial batches",
            ge=0,
            le=1,
        )
        attack: str = option(
            "",
            "use a library attack instead of the built-in PGD, "
            "e.g. torchattacks:PGD(eps=8/255,alpha=2/255,steps=10) (ignores the ε ramp)",
        )

        def __post_init__(self) -> None:
            if self.attack:
                resolve_attack(self.attack)  # fail at configuration time, not at the first batch

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self._library_attack = (
            resolve_attack(self.config.attack, train_mode=self.config.train_mode) if self.config.attack else None
        )

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        if self._library_attack is not None:
            return self._library_attack(model, step.inputs, step.targets)
        if c.resolve(trainer)[0] == 0:
            return step.inputs
        return c.pgd(trainer, model, step, start="uniform" if c.random_start else None)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model, phase):
        terms = yield
        w = self.config.clean_weight
        if w > 0 and "task" in terms:
            terms["task"] = (1 - w) * terms["task"]
            terms["clean"] = w * trainer.ce(model(step.inputs), step.targets)
        return terms
