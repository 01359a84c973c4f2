"""HAT, helper-based adversarial training (Rade & Moosavi-Dezfooli, ICLR 2022).

A term added to whatever objective is active (TRADES in the paper, PGD-AT in its AT variant):
γ·CE(f(x_hr), ŷ_hr) on helper examples x_hr = x + h·(x' − x), twice as far as the adversary's x' with h = 2, labelled
ŷ_hr = argmax f_std(x') by a **standard-trained** helper model (``helper``: a run directory, checkpoint, export,
``hf:`` or ``robustbench:`` target of a model trained without defenses on the same data). Helper examples teach the
model not to push its margin beyond what the adversary needs: less clean accuracy lost for the same robustness.

As in the reference code (``core/utils/hat.py``): the helper label is the standard model's prediction on x' (not on
x_hr), x_hr is not clipped to the image range, the helper model is frozen in eval mode, and the term is a batch-mean
cross-entropy. The paper's CIFAR-10 setting is TRADES with β = 2.5 and γ = 0.5.

The AT variant (the objective is the loop's CE on x', e.g. ``pgd_at``) is the reference's ``at_hat_loss``:
CE(f(x), y) + β·CE(f(x'), y) + γ·CE(f(x_hr), ŷ_hr), so HAT adds the clean term and weighs the adversarial one by β
(``hat.beta``); ``pgd_at.clean_weight`` must stay 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regdefense import hookimpl, option
from regdefense.base.errors import ConfigError
from regdefense.host.defense import Defense
from regdefense.training.restore import load_model


class HAT(Defense):
    """Adds γ·CE on helper examples x + h·(x' − x), labelled by a standard-trained model."""

    name = "hat"

    @dataclass
    class Config:
        helper: str | None = option(
            None, "the standard-trained helper: a run directory, checkpoint, export, hf:ORG/NAME or robustbench:NAME"
        )
        h: float = option(2.0, "helper examples at x + h·(x' − x) (the reference's --h: 2)", gt=0)
        gamma: float = option(0.5, "γ: weight of the helper term (the README's CIFAR-10 command: 0.5)", ge=0)
        beta: float = option(
            1.0,
            "β: weight of CE(f(x'), y) in the AT variant, beside CE(f(x), y) (at_hat_loss's default: 1; "
            "TRADES' β is trades.beta)",
            ge=0,
        )

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.model: torch.nn.Module | None = None
        self.at_variant = False

    @hookimpl
    def regdefense_fit_start(self, trainer):
        if not self.config.helper:
            raise ConfigError(
                "hat needs a standard-trained helper model: -o hat.helper=RUN (train one with "
                "`regdefense train --defense none` on the same data)"
            )
        impls = trainer.hook.regdefense_compute_loss.get_hookimpls()
        objective = next((i.plugin_name for i in reversed(impls) if not (i.wrapper or i.hookwrapper)), "core")
        self.at_variant = objective == "core"  # the loop's CE on x': at_hat_loss
        pgd_at = dict(trainer.pm.list_name_plugin()).get("pgd_at")
        if self.at_variant and pgd_at is not None and pgd_at.config.clean_weight > 0:
            raise ConfigError(
                "hat's AT variant adds the clean term itself: leave pgd_at.clean_weight at 0 "
                "(the reference's at_hat_loss: CE(x) + hat.beta·CE(x') + hat.gamma·CE(helper))"
            )
        self.model = load_model(self.config.helper, device=str(trainer.device)).eval().requires_grad_(False)
        with torch.no_grad():
            x = trainer.data.test.floats(torch.arange(min(2, len(trainer.data.test)))).to(trainer.device)
            classes = self.model(x).shape[1]
        if classes != trainer.data.num_classes:
            raise ConfigError(
                f"hat.helper={self.config.helper} predicts {classes} classes; the run's data has "
                f"{trainer.data.num_classes}: the helper must be trained on the same data"
            )

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        adv = step.adv_inputs
        if model is not trainer.model or not isinstance(adv, torch.Tensor) or self.model is None:
            return terms  # an evaluation forward, or an adversary with several batches
        x = step.inputs
        x_hr = x + self.config.h * (adv.detach() - x)
        with torch.no_grad():
            y_hr = self.model(adv.detach()).argmax(1)
        if self.at_variant:
            terms["task"] = self.config.beta * terms["task"]
            terms["clean"] = trainer.ce(model(x), step.targets)
        terms["helper"] = self.config.gamma * trainer.ce(model(x_hr), y_hr)
        step.logs["hat_helper_agrees"] = (y_hr == step.labels).float().mean()
        return terms
