"""IBP certified training (Gowal et al., 2018), with the verified loss of the authors' ``interval-bound-propagation``.

L = κ·CE(f(x), y) + (1 − κ)·CE(ẑ, y), ẑ the worst-case logits interval bound propagation gives over the L∞ ball of
radius ε_t around x, as the reference code builds them: ẑ_j the upper bound of z_j − z_y, ẑ_y = 0, with the last Linear
layer folded into the margins (specification elision, the default). ``elide = false``: the naive per-logit bounds (the
upper bound of z_j less the lower bound of z_y: the same loss as ART's ``AdversarialTrainerCertifiedIBPPyTorch``); a
model whose output is not a Linear layer gets them too, with a warning. See :mod:`regdefense.evaluation.bounds`.

After ``warmup_epochs`` of clean training (ε_t = 0, κ = 1), ε_t grows linearly to ε and κ falls linearly to
``kappa_end`` over ``ramp_epochs``, per batch, then both stay. No adversary runs: the bound is the adversary.
``regdefense evaluate --certify ibp`` reports the verified accuracy of the trained model beside the empirical rows.

The bounds need fixed layers while training: BatchNorm (batch statistics) and active dropout are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regdefense import hookimpl, option
from regdefense.base.errors import ConfigError
from regdefense.evaluation.bounds import UnsupportedLayer, last_linear, trace, worst_case_logits
from regdefense.host.contract import Key
from regdefense.host.defense import Defense, resolve_eps


class IBP(Defense):
    """κ·clean CE + (1 − κ)·CE of IBP's worst-case logits, with Gowal et al.'s ε and κ ramps."""

    name = "ibp"
    publishes = (Key("outputs.clean", "compute_loss"),)
    norms = ("linf",)

    @dataclass
    class Config:
        eps: float | None = option(None, "the certified radius trained for (none: the run's threat.eps)", ge=0)
        kappa_end: float = option(0.5, "κ after the ramp: weight of the clean CE (Gowal et al.: 0.5)", ge=0, le=1)
        warmup_epochs: float = option(0.0, "clean epochs before the ramp (ε_t = 0, κ = 1)", ge=0, epoch="ends")
        ramp_epochs: float = option(10.0, "epochs over which ε_t and κ ramp linearly to their final values", ge=0)
        elide: bool = option(True, "fold the last Linear layer into the margins (Gowal et al.); false: naive bounds")

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.graph = None  #: the model's traced graph, taken once at fit_start

    def schedule(self, epochs_done: float, eps: float) -> tuple[float, float]:
        """(ε_t, κ) after ``epochs_done`` epochs (fractional)."""
        c = self.config
        t = epochs_done - c.warmup_epochs
        frac = 0.0 if t <= 0 else (1.0 if c.ramp_epochs == 0 else min(1.0, t / c.ramp_epochs))
        return frac * eps, 1.0 - frac * (1.0 - c.kappa_end)

    @hookimpl
    def regdefense_fit_start(self, trainer):
        x = trainer.data.train.floats(torch.arange(2)).to(trainer.device)
        y = trainer.data.train.y[:2].to(trainer.device)
        try:
            self.graph = trace(trainer.raw_model)
            worst_case_logits(trainer.raw_model, x, y, 0.0, self.graph, self.config.elide)
        except UnsupportedLayer as exc:
            raise ConfigError(f"ibp cannot train {type(trainer.raw_model).__name__}: {exc}") from None
        if self.config.elide and last_linear(trainer.raw_model, self.graph) is None:
            trainer.echo(
                "warning: ibp: the model's output is not a Linear layer, so the margins cannot be folded "
                "into it (specification elision): the loss uses the naive per-logit bounds"
            )

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        eps = resolve_eps(trainer, self.config.eps)
        done = trainer.state.global_step / max(1, trainer.steps_per_epoch)
        eps_t, kappa = self.schedule(done, eps)
        clean = model(step.inputs)
        step.outputs["clean"] = clean
        terms = {"task": kappa * trainer.ce(clean, step.targets)}
        if kappa < 1.0 and model is trainer.model:
            worst = worst_case_logits(  # the network, not a compiled one
                trainer.raw_model, step.inputs, step.targets, eps_t, self.graph, self.config.elide
            )
            terms["ibp"] = (1.0 - kappa) * trainer.ce(worst, step.targets)
        step.logs["ibp_eps"] = clean.new_tensor(eps_t)
        return terms
