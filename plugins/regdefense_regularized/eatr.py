"""EATR: ensemble adversarial training with regularisation (seed 001, Eq. 14).

L = CE(f(x), y) + Σ_k γ_k·CE(f(x̃_k), y) + γ5·L_reg over k ∈ {FGSM, PGD, BIM, C&W}, γ1..γ4 = 1, γ5 = 0.001,
L_reg = ‖W‖² (``reg = "weight"``) or the input-gradient penalty on the PGD example (``reg = "gradient"``).
The adversarial examples come from torchattacks with the paper's settings (§5.2): FGSM ε; PGD ε, α = 2/255,
100 steps; BIM ε, α = 2/255, 10 steps; C&W-L2 c = 1, κ = 0, 100 steps, lr 0.001 (unbounded: ε does not apply).
``batch`` chooses how a batch is formed: ``all`` (every attack on the whole batch), ``cycle`` (one attack per
batch, in turn) or ``split`` (a quarter of the batch per attack). Each attack's term is logged separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from regdefense import hookimpl, option
from regdefense.attacks.adapter import resolve_attack
from regdefense.host.contract import APPLIES_WEIGHTS
from regdefense.host.defense import Defense, resolve_eps
from regdefense_regularized.penalties import input_gradient_penalty, weight_l2

ATTACKS = ("fgsm", "pgd", "bim", "cw")


class EATR(Defense):
    """Trains on FGSM, PGD, BIM and C&W examples of every batch, plus a regulariser."""

    name = "eatr"
    reads = (APPLIES_WEIGHTS,)

    @dataclass
    class Config:
        eps: float | None = option(None, "ε of FGSM, PGD and BIM (none: the run's; the paper: 0.1)", ge=0)
        alpha: float = option(2 / 255, "step of PGD and BIM (the paper: 2/255)", gt=0)
        pgd_steps: int = option(100, "PGD iterations (the paper: 100)", ge=1)
        bim_steps: int = option(10, "BIM iterations (torchattacks' default; the paper gives none)", ge=1)
        cw_c: float = option(1.0, "C&W constant c", gt=0)
        cw_steps: int = option(100, "C&W optimisation steps", ge=1)
        cw_lr: float = option(0.001, "C&W learning rate", gt=0)
        gammas: list[float] = option(
            default_factory=lambda: [1.0, 1.0, 1.0, 1.0], help="γ1..γ4: weights of the FGSM, PGD, BIM and C&W terms"
        )
        gamma5: float = option(0.001, "γ5: weight of the regulariser", ge=0)
        reg: Literal["weight", "gradient"] = option(
            "weight", "L_reg: ‖W‖² or the input-gradient penalty on the PGD example"
        )
        clean_weight: float = option(1.0, "weight of CE on the clean inputs", ge=0)
        batch: Literal["all", "cycle", "split"] = option(
            "all", "every attack on the whole batch, one attack per batch in turn, or a quarter of the batch each"
        )

        def __post_init__(self) -> None:
            if len(self.gammas) != 4 or min(self.gammas) < 0:
                from regdefense.base.errors import ConfigError

                raise ConfigError(
                    f"eatr.gammas must be four non-negative weights (FGSM, PGD, BIM, C&W), got {self.gammas}"
                )

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self._attacks: dict[str, object] = {}
        self._eps: float | None = None

    def attacks(self, eps: float) -> dict[str, object]:
        """The four torchattacks attacks through the adapter, rebuilt only when ε changes (warm-up ramp)."""
        if eps != self._eps:
            c = self.config
            self._attacks = {
                "fgsm": resolve_attack(f"torchattacks:FGSM(eps={eps!r})"),
                "pgd": resolve_attack(
                    f"torchattacks:PGD(eps={eps!r}, alpha={c.alpha!r}, steps={c.pgd_steps}, random_start=True)"
                ),
                "bim": resolve_attack(f"torchattacks:BIM(eps={eps!r}, alpha={c.alpha!r}, steps={c.bim_steps})"),
                "cw": resolve_attack(f"torchattacks:CW(c={c.cw_c!r}, kappa=0, steps={c.cw_steps}, lr={c.cw_lr!r})"),
            }
            self._eps = eps
        return self._attacks

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        eps = resolve_eps(trainer, self.config.eps)
        attacks, x, y = self.attacks(eps), step.inputs, step.targets
        if self.config.batch == "all":
            return {k: attacks[k](model, x, y) for k in ATTACKS}
        if self.config.batch == "cycle":
            k = ATTACKS[trainer.state.global_step % 4]
            return {k: attacks[k](model, x, y)}
        parts = torch.arange(len(y), device=y.device).tensor_split(4)
        step.stash[self.name] = dict(zip(ATTACKS, parts))
        return {k: attacks[k](model, x[i], y[i]) for k, i in zip(ATTACKS, parts) if len(i)}

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        c = self.config
        split = step.stash.get(self.name)
        terms = {}
        if c.clean_weight:
            terms["clean"] = c.clean_weight * trainer.ce(model(step.inputs), step.targets)
        for k, gamma in zip(ATTACKS, c.gammas):
            if k not in step.adv_inputs:
                continue
            y = step.targets[split[k]] if split else step.targets
            logits = model(step.adv_inputs[k])
            terms[k] = gamma * trainer.adv_mean(trainer.ce(logits, y, reduction="none"), step, logits)
        if c.reg == "weight":
            terms["reg"] = c.gamma5 * weight_l2(model)
        elif "pgd" in step.adv_inputs:
            y = step.targets[split["pgd"]] if split else step.targets
            raw = input_gradient_penalty(model, step.adv_inputs["pgd"], y)
            step.logs["eatr_raw_penalty"] = raw.detach()
            terms["reg"] = c.gamma5 * raw
        return terms
