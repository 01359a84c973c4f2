"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

L = BCE(p(x'), y) + β · (1/B) Σᵢ KL(p(xᵢ) ‖ p(x'ᵢ)) · (1 − p_y(xᵢ)), where
BCE = −log p_y(x') − log(1 − max_{k≠y} p_k(x')) (the boosted CE), x' from CE-PGD started at
x + 0.001·N(0, I), and the clean probabilities are not detached (reference code). β = 6 (WRN; 5 for ResNet-18).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.host.contract import APPLIES_WEIGHTS, PGD_INFO, Key, adversary
from regdefense.host.defense import Budget, Defense
from regdefense.host.losses import kl


def boosted_ce(adv_logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample −log p_y(x') − log(1.0001 − max_{k≠y} p_k(x')) (MART's reference constants); ``smoothing``
    smooths the CE part (``train.label_smoothing``)."""
    probs = F.softmax(adv_logits, dim=1)
    top2 = probs.argsort(dim=1)[:, -2:]
    other = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    return F.cross_entropy(adv_logits, y, reduction="none", label_smoothing=smoothing) - torch.log(
        1.0001 - probs.gather(1, other[:, None]).squeeze(1) + 1e-12
    )


class MART(Defense):
    """MART: boosted CE on adversarial examples plus a KL term weighted by 1 − p_y(x)."""

    name = "mart"
    publishes = (*adversary(*PGD_INFO), Key("outputs.clean", "compute_loss"), Key("outputs.adv", "compute_loss"))
    reads = (APPLIES_WEIGHTS,)

    @dataclass
    class Config(Budget):
        beta: float = option(6.0, "weight of the weighted KL term (Wang et al.: 6 for WRN, 5 for ResNet-18)", ge=0)

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        return c.pgd(trainer, model, step, start=0.001 * torch.randn_like(step.inputs), clip_start=False)

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        clean, adv = model(step.inputs), model(step.adv_inputs)
        step.outputs.update(clean=clean, adv=adv)
        true_p = F.softmax(clean, dim=1).gather(1, step.targets[:, None]).squeeze(1)
        robust = (kl(clean, adv) * (1.0000001 - true_p)).mean()
        return {
            "task": trainer.adv_mean(boosted_ce(adv, step.targets, trainer.config.train.label_smoothing), step, adv),
            "robust": self.config.beta * robust,
        }
