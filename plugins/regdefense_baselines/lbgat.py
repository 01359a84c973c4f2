"""LBGAT (Cui et al., ICCV 2021): learnable boundary-guided adversarial training.

A natural guide network f_n is trained jointly (same optimizer) on clean CE; the robust model f_r is
pulled toward the guide's clean logits: L = MSE(f_r(x'), f_n(x)) + CE(f_n(x), y) + β·KL(p_r(x) ‖ p_r(x')),
x' from TRADES' KL maximisation on f_r. The guide's logits are not detached (reference code).
β = 0 ("LBGAT0", CIFAR-10), 6 for CIFAR-100. The guide is saved and restored with the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from regdefense import hookimpl, option
from regdefense.host.contract import APPLIES_WEIGHTS, PGD_INFO, Key, adversary
from regdefense.host.defense import Budget, Defense
from regdefense.host.losses import kl


class LBGAT(Defense):
    """Boundary-guided AT: a clean guide network's logits are the robust model's targets."""

    name = "lbgat"
    publishes = (*adversary(*PGD_INFO), Key("outputs.adv", "compute_loss"), Key("outputs.guide", "compute_loss"))
    reads = (APPLIES_WEIGHTS,)

    @dataclass
    class Config(Budget):
        beta: float = option(0.0, "weight of the TRADES KL term (LBGAT0: 0 on CIFAR-10; 6 on CIFAR-100)", ge=0)
        guide: str = option("auto", "architecture of the guide (auto: the run's model architecture)")
        detach_guide: bool = option(False, "stop the MSE term's gradient into the guide")

    @hookimpl
    def regdefense_add_modules(self, trainer):
        return {"lbgat_guide": trainer.build_network(self.config.guide)}

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        return c.kl_pgd(trainer, model, step)

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        guide = trainer.modules["lbgat_guide"](step.inputs)
        target = guide.detach() if self.config.detach_guide else guide
        adv = model(step.adv_inputs)
        step.outputs.update(adv=adv, guide=guide)
        terms = {
            "task": trainer.adv_mean((adv - target).pow(2).mean(dim=1), step, adv),
            "guide": trainer.ce(guide, step.labels),
        }
        if self.config.beta:
            terms["robust"] = self.config.beta * kl(model(step.inputs), adv).mean()
        return terms
