"""ATGR: adversarial training with input-gradient regularisation (seed 001, Eq. 13).

L = CE(f(x), y) + β1·CE(f(x̃), y) + β2·‖∇_x̃ CE(f(x̃), y)‖², β1 = β2 = 1, by double backprop. A loss
wrapper on any base objective: scales its adversarial ``task`` term by β1, adds the clean CE and the
penalty. ``reduction`` picks the penalty's scale (see ``penalties.input_gradient_penalty``): the default
per-sample mean is B times larger than the squared gradient of the batch-mean loss. The raw penalty (before
β2) is logged as ``log_atgr_raw_penalty``. ATGR's detection use: the evaluation report's detection AUROC.
Expect gradient masking (the paper's own ATGR rows are one class predicted everywhere): evaluate with
AutoAttack and read the sanity checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from regdefense import hookimpl, option
from regdefense.host.contract import Key
from regdefense.host.defense import Defense
from regdefense_regularized.penalties import input_gradient_penalty


class ATGR(Defense):
    """Adds β2·‖∇_x̃ CE‖² (double backprop) and the clean CE to whatever objective is active."""

    name = "atgr"
    reads = (Key("outputs.adv", "compute_loss", silent=True),)  # reuses the objective's forward when published

    @dataclass
    class Config:
        beta1: float = option(1.0, "β1: weight of the adversarial CE (scales the base objective's task term)", ge=0)
        beta2: float = option(1.0, "β2: weight of the input-gradient penalty", ge=0)
        clean_weight: float = option(1.0, "weight of CE on the clean inputs (0 if the base objective has one)", ge=0)
        reduction: Literal["per_sample_mean", "batch_mean_grad", "per_sample_sum"] = option(
            "per_sample_mean", "penalty scale: (1/B)Σ‖∇ℓᵢ‖² | ‖∇ mean ℓ‖² (B× smaller) | Σ‖∇ℓᵢ‖² (B× larger)"
        )

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        if not isinstance(step.adv_inputs, dict):
            step.adv_inputs = step.adv_inputs.detach().requires_grad_(True)  # lets the penalty reuse the base forward
        terms = yield
        c = self.config
        adv = step.adv_inputs
        logits = step.outputs.get("adv") if model is trainer.model else None
        raw = input_gradient_penalty(model, adv, step.targets, c.reduction, logits)
        step.logs["atgr_raw_penalty"] = raw.detach()
        if "task" in terms:
            terms["task"] = c.beta1 * terms["task"]
        if c.clean_weight:
            terms["clean"] = c.clean_weight * trainer.ce(model(step.inputs), step.targets)
        terms["grad_penalty"] = c.beta2 * raw
        return terms
