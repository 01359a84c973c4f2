"""DYNAT: dynamic label adversarial training (Liu et al., arXiv 2408.13102; the authors' code).

A guide network f_g is trained at the same time (same optimizer) on clean CE with the true labels. Every batch
the dynamic labels l = argmax f_g(x) are recomputed from the current guide (no gradient: an argmax), and the
target's adversarial term is trained on them:

    L = w_g·CE(f_g(x), y) + w_t·CE(f_t(x'), l)          (+ whatever else the base objective has)

As a loss wrapper DYNAT *replaces* the base objective's ``task`` term by w_t·CE(f_t(x'), l) (through
``trainer.adv_mean``, so GAIRAT and MAIL reweight it, against l) and adds the guide term; the base's other
terms stay: on ``trades`` that is the KL term (DYNAT-TRADES, DYNAT-AWP with ``awp``). With ``inner`` the
adversary attacks the dynamic labels too (``step.targets = l`` before the attack: the paper's "Inner"
optimisation); use ``-o trades.attack=ce`` for DYNAT-Inner on a TRADES objective. Without another adversary,
DYNAT's own (a fallback provider: CE-PGD against the dynamic labels l from x + 0.001·N(0, I), ε 0.031, step 0.007,
10 steps, as the authors' ``dynat_loss``) runs. GAIRAT's κ is counted against the labels the adversary attacks (l
for DYNAT's own adversary and with ``inner``; y otherwise). Robust accuracy is always measured against the true
labels.

Replication switches (research note §4.5): ``guide_mode`` (the code computes l with the guide in train mode,
so BN statistics move), ``clean_bn_pass`` (the code's unused clean forward of the target in train mode),
``awp_probe`` (the code's AWP probe uses the base loss with the true labels) and ``awp_probe_robust_factor``
(its probe weighs the KL term 6 while the outer loss uses 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from regdefense import hookimpl, option
from regdefense.attacks.adapter import model_mode, pgd
from regdefense.host.contract import APPLIES_WEIGHTS, PGD_INFO, Key, adversary
from regdefense.host.defense import Defense, resolve_eps
from regdefense.models import default_model


class DYNAT(Defense):
    """Guide network + dynamic labels for the target's adversarial term."""

    name = "dynat"
    publishes = adversary(*PGD_INFO)  # its own adversary, a fallback: counted only when no other adversary is active
    reads = (APPLIES_WEIGHTS, Key("outputs.adv", "compute_loss", silent=True))

    @dataclass
    class Config:
        guide: str = option(
            "auto",
            "guide architecture (auto: resnet18 for CIFAR-sized data, the zoo's default "
            "for the dataset otherwise, e.g. digits_cnn)",
        )
        target_weight: float = option(1.0, "w_t: weight of CE(f_t(x'), l) (code: 1; its AWP variant: 0.2)", ge=0)
        guide_weight: float = option(1.0, "w_g: weight of the guide's clean CE", ge=0)
        inner: bool = option(False, "the inner maximisation attacks the dynamic labels too (DYNAT-Inner)")
        guide_mode: Literal["train", "eval"] = option("train", "guide mode when computing the labels (code: train)")
        clean_bn_pass: bool = option(False, "replicate the code's unused clean forward of the target (BN statistics)")
        awp_probe: Literal["base", "dynamic"] = option(
            "base", "AWP's probe: the base objective with true labels (code) or with DYNAT's terms"
        )
        awp_probe_robust_factor: float = option(
            1.0, "multiply the base's robust term in AWP's probe (code: 6 with trades.beta=1)", ge=0
        )
        eps: float | None = option(None, "own adversary: budget (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(
            None, "own adversary: step size (none: the code's 0.007 at ε = 8/255, scaled with the run's ε)", gt=0
        )
        steps: int = option(10, "own adversary: iterations", ge=1)
        attack_labels: Literal["dynamic", "true"] = option(
            "dynamic", "own adversary: attack the dynamic labels l (authors' code) or the true labels"
        )

    @hookimpl
    def regdefense_add_modules(self, trainer):
        c, h, w = trainer.data.input_shape
        arch = self.config.guide
        if arch == "auto":  # the paper's ResNet-18 guide on CIFAR-sized data, the dataset's default otherwise
            arch = "resnet18" if min(h, w) >= 32 and c == 3 else default_model(trainer.data.name, min(h, w))
        return {"dynat_guide": trainer.build_network(arch)}

    @hookimpl
    def regdefense_batch_start(self, trainer, step):
        guide = trainer.modules["dynat_guide"]
        with torch.no_grad(), model_mode(guide, self.config.guide_mode == "train"), trainer.autocast():
            labels = guide(step.inputs).argmax(dim=1)
        step.stash[self.name] = labels
        if self.config.inner:
            step.targets = labels

    @hookimpl(trylast=True)
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        eps = resolve_eps(trainer, c.eps)
        labels = step.stash[self.name] if c.attack_labels == "dynamic" else step.labels
        with trainer.attack_autocast():
            return pgd(
                model,
                step.inputs,
                labels,
                eps=eps,
                alpha=c.alpha if c.alpha is not None else 0.007 * (c.eps or trainer.eps_full) / (8 / 255),
                steps=c.steps,
                norm=trainer.norm,
                start=0.001 * torch.randn_like(step.inputs),
                info=step.info,
                clip_start=False,
            )

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model, phase):
        c = self.config
        if phase == "awp" and c.awp_probe == "base":
            dynamic, step.targets = step.targets, step.labels
            try:
                terms = yield
            finally:
                step.targets = dynamic
            if "robust" in terms:
                terms["robust"] = c.awp_probe_robust_factor * terms["robust"]
            return terms
        labels = step.stash[self.name]
        step.targets = labels
        terms = yield
        logits = step.outputs["adv"] if model is trainer.model and "adv" in step.outputs else model(step.adv_inputs)
        terms["task"] = c.target_weight * trainer.adv_mean(trainer.ce(logits, labels, reduction="none"), step, logits)
        if phase == "train":
            if c.clean_bn_pass:
                with torch.no_grad():
                    model(step.inputs)
            guide = trainer.modules["dynat_guide"]
            terms["guide"] = c.guide_weight * trainer.ce(guide(step.inputs), step.labels)
        return terms
