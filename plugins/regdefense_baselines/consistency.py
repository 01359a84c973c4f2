"""Consistency regularisation for adversarial robustness (Tack et al., AAAI 2022).

Each batch is trained on two augmented views of its images (the loader's view and a second, independent draw of the
run's augmentation from the same images), so the active adversary attacks both and the active objective is taken
over the 2B examples; a term pulls the two views' adversarial predictions together:
λ·JS(softmax(f(x'₁)/T), softmax(f(x'₂)/T)), the Jensen-Shannon divergence with temperature T, batch-mean.
Defaults: λ = 1, T = 0.5 (the authors' ``common.py``). Their strong augmentation (AutoAugment and Cutout,
``autoaug_sche``) is not reproduced: the views use ``data.augment`` (crop, crop_flip), which must not be ``none``.
The authors' adversary runs with the model in eval mode (``adv_lib/attack.py`` wraps it in ``EvalBN``), as
``pgd_at``, ``trades`` and ``mart`` do by default (``attack_mode = "eval"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.base.errors import ConfigError
from regdefense.data.augment import augment_batch, draw_augment
from regdefense.data.sources import Split
from regdefense.host.contract import Key
from regdefense.host.defense import Defense

#: defenses keeping per-sample state by dataset index: the two views of one image would share (and fight over) a row
PER_SAMPLE = ("fgsm_pgk", "atas")


def _augment(trainer) -> str:
    """The run's resolved augmentation (``auto`` as the loader resolved it for the data)."""
    return str(getattr(trainer.train_loader, "augment", trainer.config.data.augment) or "none")


def js_divergence(logits1: torch.Tensor, logits2: torch.Tensor, t: float) -> torch.Tensor:
    """½[KL(p₁ ‖ m) + KL(p₂ ‖ m)], m = (p₁ + p₂)/2, pᵢ = softmax(logitsᵢ/T), averaged over the batch. The targets
    are given as log-probabilities, so a probability that underflows to 0 leaves the gradient finite."""
    lp1, lp2 = F.log_softmax(logits1 / t, dim=1), F.log_softmax(logits2 / t, dim=1)
    log_m = torch.log((0.5 * (lp1.exp() + lp2.exp())).clamp(min=1e-8))
    js = F.kl_div(log_m, lp1, reduction="batchmean", log_target=True)
    return 0.5 * (js + F.kl_div(log_m, lp2, reduction="batchmean", log_target=True))


class Consistency(Defense):
    """Two augmented views per image; their adversarial predictions pulled together by a tempered JS term."""

    name = "consistency"
    reads = (Key("outputs.adv", "compute_loss", silent=True),)

    @dataclass
    class Config:
        lam: float = option(1.0, "λ: weight of the JS consistency term (the authors': 1)", ge=0)
        temperature: float = option(0.5, "T: softmax temperature of the JS term (the authors': 0.5)", gt=0)

    @hookimpl
    def regdefense_fit_start(self, trainer):
        if _augment(trainer) == "none" or not isinstance(trainer.data.train, Split):
            raise ConfigError(
                "consistency trains on two augmented views of each image: set data.augment (crop or crop_flip) on "
                "in-memory data"
            )
        for name, _ in trainer.pm.list_name_plugin():
            if name in PER_SAMPLE:
                raise ConfigError(
                    f"consistency cannot stack with {name}: it keeps a per-sample perturbation by dataset index, and "
                    f"the two views of one image would share its row"
                )

    @hookimpl
    def regdefense_batch_start(self, trainer, step):
        """The second view: the same images (by dataset index), augmented again with an independent draw."""
        split, idx = trainer.data.train, step.index
        raw = split.floats(idx.to(split.x.device)).to(step.inputs.device)
        seed = (trainer.config.train.seed * 7919 + trainer.state.global_step) * 104_729 + 17
        params = draw_augment(len(idx), _augment(trainer), torch.Generator().manual_seed(seed))
        view2 = augment_batch(raw, *(p.to(raw.device) for p in params))
        step.inputs = torch.cat([step.inputs, view2])
        step.labels = step.labels.repeat(2)
        step.targets = step.targets.repeat(2) if step.targets is not None else None
        step.index = step.index.repeat(2)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        if model is not trainer.model:
            return terms
        adv = step.outputs.get("adv")
        if adv is None:
            adv = model(step.adv_inputs)
        a1, a2 = adv.chunk(2)
        terms["consistency"] = self.config.lam * js_divergence(a1, a2, self.config.temperature)
        return terms
