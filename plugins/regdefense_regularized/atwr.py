"""ATWR: adversarial training with weight regularisation (seed 001, Eq. 12).

L = CE(f(x), y) + λ1·CE(f(x̃), y) + λ2·‖W‖², λ1 = 1, λ2 = 0.005. A loss wrapper: it scales the active
objective's adversarial ``task`` term by λ1, adds the clean CE (``clean_weight``; set 0 when the base already
has a clean term, e.g. ``trades``) and the weight term. On ``pgd_at`` it is exactly the paper's loss, with the
paper's mixed clean+adversarial batches. ‖W‖² runs over conv and linear weights by default
(``all_params`` adds biases and BN parameters). Note 2·λ2·W = 0.01·W: like SGD weight decay 0.01, on top of
any optimizer weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass

from regdefense import hookimpl, option
from regdefense.host.defense import Defense
from regdefense_regularized.penalties import weight_l2


class ATWR(Defense):
    """Adds λ2·‖W‖² (and the clean CE) to whatever objective is active."""

    name = "atwr"

    @dataclass
    class Config:
        lambda1: float = option(1.0, "λ1: weight of the adversarial CE (scales the base objective's task term)", ge=0)
        lambda2: float = option(0.005, "λ2: weight of ‖W‖²", ge=0)
        clean_weight: float = option(1.0, "weight of CE on the clean inputs (0 if the base objective has one)", ge=0)
        all_params: bool = option(False, "‖W‖² over every parameter instead of conv/linear weights only")

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        c = self.config
        if "task" in terms:
            terms["task"] = c.lambda1 * terms["task"]
        if c.clean_weight:
            terms["clean"] = c.clean_weight * trainer.ce(model(step.inputs), step.targets)
        terms["weight_l2"] = c.lambda2 * weight_l2(model, c.all_params)
        return terms
