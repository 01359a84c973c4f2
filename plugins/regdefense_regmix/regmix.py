"""RegMix: AMR (weighted, decomposed KL between the initial and final adversarial outputs) replacing the
base's MSE consistency term, plus AGR (a clean-output target for the adversarial output).

With p_i = softmax(f(x + δ_initial)), p_f = softmax(f(x + δ_final)), p_c = softmax(f(x)):

    AMR = α·KL(p_f ‖ p_i) + β·KL(p_i ‖ p_f)          (α ≠ β: one main, one auxiliary direction)
    AGR = KL(sg(p_c) ‖ p_f)   (default; or CE of f(x + δ_final) against sg(p_c), or against (1 − w)·onehot + w·p_c)
    L   = base objective without its "consistency" term + AMR + λ·AGR

A loss wrapper that never names its base: δ_initial and δ_final come from whatever adversary ran —
``fgsm_pgk`` publishes its prior point and logits (``step.info["x_init"]``, ``step.outputs["init"]``), the
shared ``pgd`` (``pgd_at``, ``trades``...) its random start. Defaults (α = 1, β = 0.5, λ = 1, nothing detached
in AMR, clean side detached in AGR) are the research note's reconstruction, not values from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.base.errors import PluginError
from regdefense.host.contract import Key
from regdefense.host.defense import Defense
from regdefense.host.losses import kl, soft_ce


class RegMix(Defense):
    """AMR + AGR on top of any adversary that reports where its ascent started."""

    name = "regmix"
    reads = (
        Key(
            "info.x_init",
            "compute_loss",
            required=True,
            when="amr",
            why="AMR compares the logits at the start and the end of the adversary's ascent",
        ),
        Key("outputs.init", "compute_loss", silent=True),
        Key("outputs.adv", "compute_loss", silent=True),
    )

    @dataclass
    class Config:
        amr: bool = option(True, "replace the base's MSE consistency term by AMR (false: keep the base's term)")
        alpha: float = option(1.0, "α: weight of KL(p_final ‖ p_initial), the main direction", ge=0)
        beta: float = option(0.5, "β: weight of KL(p_initial ‖ p_final), the auxiliary direction", ge=0)
        amr_detach: Literal["none", "target", "initial", "final"] = option(
            "none",
            "what AMR treats as constant: nothing; the target (first) side of each KL, as in deep mutual "
            "learning; p_initial; or p_final",
        )
        lam: float = option(1.0, "λ: weight of AGR (0 turns it off)", ge=0)
        agr: Literal["kl", "ce_soft", "mix_target"] = option(
            "kl", "AGR form: KL(p_clean ‖ p_final), CE against p_clean, or CE against (1 − w)·onehot + w·p_clean"
        )
        agr_mix: float = option(0.5, "w of the mix_target form", ge=0, le=1)
        agr_detach_clean: bool = option(True, "treat the clean distribution as a constant target")

    def amr(self, z_final: torch.Tensor, z_init: torch.Tensor) -> torch.Tensor:
        c = self.config
        zf_t = z_final.detach() if c.amr_detach in ("target", "final") else z_final
        zi_t = z_init.detach() if c.amr_detach in ("target", "initial") else z_init
        zf_m = z_final.detach() if c.amr_detach == "final" else z_final
        zi_m = z_init.detach() if c.amr_detach == "initial" else z_init
        return c.alpha * kl(zf_t, zi_m).mean() + c.beta * kl(zi_t, zf_m).mean()

    def agr(self, z_final: torch.Tensor, z_clean: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = self.config
        zc = z_clean.detach() if c.agr_detach_clean else z_clean
        if c.agr == "kl":
            return kl(zc, z_final).mean()
        p_clean = F.softmax(zc, dim=1)
        if c.agr == "mix_target":
            p_clean = (1 - c.agr_mix) * F.one_hot(targets, z_final.shape[1]).to(p_clean.dtype) + c.agr_mix * p_clean
        return soft_ce(z_final, p_clean).mean()

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        c = self.config
        own = model is trainer.model
        if isinstance(step.adv_inputs, dict):
            raise PluginError("regmix needs a single adversarial batch; it cannot stack on eatr")
        z_final = step.outputs["adv"] if own and "adv" in step.outputs else model(step.adv_inputs)
        if c.amr:
            if "x_init" not in step.info:
                raise PluginError(
                    "regmix's AMR needs an adversary that reports its starting point "
                    "(fgsm_pgk, pgd_at, trades, ...); a library attack does not"
                )
            z_init = step.outputs["init"] if own and "init" in step.outputs else model(step.info["x_init"])
            terms.pop("consistency", None)
            terms["amr"] = self.amr(z_final, z_init)
        if c.lam:
            terms["agr"] = c.lam * self.agr(z_final, model(step.inputs), step.targets)
        return terms
