"""MAIL (Wang et al., NeurIPS 2021): probabilistic-margin-aware instance reweighting.

PM(x') = max_{k≠y} p_k(x') − p_y(x') (detached, on the adversarial output); ω = 3·sigmoid(s·(PM + b))
(the reference ``weight_assign`` multiplies by 3, so weights lie in (0, 3); ``scale`` sets the factor),
applied to the adversarial term of whatever objective is active (MAIL-AT: the adversarial CE; MAIL-TRADES:
the per-example KL; MAIL-MART: the boosted CE). After ``burn_in_epochs`` of plain training.
Defaults: MAIL-AT's b = −0.5, s = 10 (MAIL-TRADES: b = 0, s = 2); no renormalisation (reference code);
burn-in 75 of 120 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.host.contract import Key
from regdefense.host.defense import Defense


def mail_weights(
    adv_logits: torch.Tensor,
    labels: torch.Tensor,
    bias: float,
    slope: float,
    normalize: bool = False,
    scale: float = 3.0,
) -> torch.Tensor:
    """ω = scale·sigmoid(slope·(max_{k≠y} p_k − p_y + bias)), or normalised to mean 1 instead of scaled."""
    p = F.softmax(adv_logits.float(), dim=1)
    p_y = p.gather(1, labels[:, None]).squeeze(1)
    p_other = p.scatter(1, labels[:, None], -1.0).amax(dim=1)
    w = torch.sigmoid(slope * (p_other - p_y + bias))
    return w * len(w) / w.sum() if normalize else scale * w


#: mean weight below which a reweighted epoch warns (3·sigmoid(10·(0 − 0.5)) = 0.02 on an untrained model)
WEAK_WEIGHTS = 0.1


class MAIL(Defense):
    """Reweights the adversarial term by the probabilistic margin of each adversarial point."""

    name = "mail"
    requires = ("make_adversarial",)  # it reweights an adversarial term: without an adversary there is none
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
            75,
            "epochs of the base method before reweighting (reference: MAIL from epoch 75 "
            "of 120, resumed from the base model of epoch 70; see the mail page)",
            ge=0,
            epoch="starts",
        )
        bias: float = option(-0.5, "b (MAIL-AT -0.5; MAIL-TRADES 0)")
        slope: float = option(10.0, "s (MAIL-AT 10; MAIL-TRADES 2)", ge=0)
        normalize: bool = option(False, "rescale the weights to mean 1 per batch (replaces scale)")
        scale: float = option(3.0, "factor on the sigmoid (reference code: 3)", gt=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self._warned = False

    def weights(self, step, adv_logits) -> torch.Tensor:
        c = self.config
        w = mail_weights(adv_logits, step.targets, c.bias, c.slope, c.normalize, c.scale)
        step.logs["mail_weight_mean"] = w.mean().detach()
        return w

    @hookimpl
    def regdefense_epoch_end(self, trainer, metrics):
        mean = metrics.get("log_mail_weight_mean")
        if mean is not None and mean < WEAK_WEIGHTS and not self._warned:
            self._warned = True
            trainer.echo(
                f"warning: mail's weights average {mean:.3f} in epoch {metrics['epoch']}: on a model that "
                f"is not yet trained every margin is about 0, so every weight is about "
                f"{self.config.scale:g}·sigmoid({self.config.slope:g}·{self.config.bias:g}) and the adversarial "
                f"term is scaled down accordingly (the model barely learns). The reference starts MAIL from a "
                f"trained base: raise mail.burn_in_epochs, or set mail.normalize=true"
            )

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step):
        if trainer.state.epoch >= self.config.burn_in_epochs and self.weights not in step.weighters:
            step.weighters.append(self.weights)
        return (yield)
