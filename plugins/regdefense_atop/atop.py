"""AToP: adversarial training on purification (Lin et al., ICLR 2024; the authors' code and OpenReview replies).

A frozen classifier f (the run's model, typically from ``--init`` a clean run) is protected by a trainable
purifier g applied to a random transform t of the input. Two phases on the shared loop:

* ``phase = "pretrain"``: reconstruction only, L = ‖g(t(x)) − x‖₁ (+ the hinge GAN term if ``gan_weight``);
* ``phase = "finetune"`` (AToP): L = ‖g(t(x_ref)) − x_ref‖₁ + λ·CE(f(g(t(x'))), y) (CE from epoch
  ``ce_start_epoch``), x' from FGSM on f alone (``attack = "classifier"``, as the authors) or through g∘t∘f
  (``attack = "defended"``, adaptive). x_ref is x' (``recon_target = "adv"``, the published equation) or x.

The purifier's output is in [0, 1] by construction (no [−1, 1] mix-up) and feeds f directly. The GAN term is
the non-detached hinge loss unless ``gan_g_detached`` (the authors' code detaches it, which gives g no
gradient). What evaluation, checkpoints' ``best.pt`` choice and export see is ``Defended(g∘t, f)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.attacks.adapter import model_mode, pgd
from regdefense.base import checkpoint
from regdefense.base.errors import ConfigError
from regdefense.host.contract import APPLIES_WEIGHTS, Key
from regdefense.host.defense import Defense, step_size
from regdefense_atop.networks import Discriminator, build_purifier
from regdefense_atop.transforms import Defended, Purified, RandomTransform


class AToP(Defense):
    """Fine-tunes a purifier in front of a frozen classifier."""

    name = "atop"
    publishes = (Key("outputs.adv", "compute_loss"),)
    reads = (APPLIES_WEIGHTS,)

    @dataclass
    class Config:
        phase: Literal["pretrain", "finetune"] = option("finetune", "purifier pre-training or AToP fine-tuning")
        transform: Literal["rt1", "rt2", "rt3"] = option("rt2", "random transform (paper's main setting: rt2)")
        block_size: int | None = option(
            None, "mask block side in pixels (none: 1/8 of the image side, as 32 of 256)", ge=1
        )
        missing_rate: float = option(0.25, "fraction of blocks masked (code: 0.25)", ge=0, le=1)
        sigma: float = option(0.25, "std of the Gaussian noise of rt2/rt3 on [0,1] images (code: 0.25)", ge=0)
        per_sample: bool = option(False, "a mask per image instead of one per batch (code: per batch)")
        n_masks: int = option(4, "rt3: number of complementary masks", ge=2)
        purifier: str = option("unet", "'unet', or 'python:module:callable' for your own generator")
        purifier_width: int = option(32, "U-Net base width", ge=4)
        purifier_init: str = option("", "start the purifier from a pre-training run directory or checkpoint")
        lam: float = option(0.05, "λ: weight of the classification term (code: 0.05 for CIFAR-10)", ge=0)
        ce_start_epoch: int = option(
            2, "epochs of reconstruction only before the CE term starts (code: 2)", ge=0, epoch="starts"
        )
        attack: Literal["classifier", "defended"] = option(
            "classifier", "fine-tuning adversary: FGSM on the classifier alone (authors) or through g∘t∘f"
        )
        attack_steps: int = option(1, "attack iterations (1: FGSM)", ge=1)
        recon_target: Literal["adv", "clean"] = option("adv", "reconstruct x' (published equation) or x")
        gan_weight: float = option(0.0, "weight of the hinge GAN term (0: no discriminator)", ge=0)
        gan_g_detached: bool = option(False, "replicate the code's detached GAN term (no gradient to g)")
        d_lr: float = option(1e-4, "discriminator learning rate (Adam, betas 0.5, 0.999)", gt=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.transform: RandomTransform | None = None

    # --- set-up -------------------------------------------------------------------------------

    @hookimpl
    def regdefense_add_modules(self, trainer):
        c = self.config
        ch, h, w = trainer.data.input_shape
        self.transform = RandomTransform(
            c.transform, c.block_size or max(1, min(h, w) // 8), c.missing_rate, c.sigma, c.per_sample, c.n_masks
        )
        purifier = build_purifier(c.purifier, ch, min(h, w), c.purifier_width)
        if c.purifier_init:
            path = Path(c.purifier_init)
            payload = checkpoint.load(path / "checkpoints" / "best.pt" if path.is_dir() else path)
            if "atop_purifier" not in payload.get("modules", {}):
                raise ConfigError(
                    f"atop.purifier_init: {path} holds no atop purifier (train one with atop.phase=pretrain)"
                )
            purifier.load_state_dict(payload["modules"]["atop_purifier"])
        trainer.raw_model.requires_grad_(False)  # the classifier is frozen: only the purifier is optimised
        modules = {"atop_purifier": purifier}
        if c.gan_weight:
            modules["atop_discriminator"] = Discriminator(ch).requires_grad_(False)  # own optimizer, below
        return modules

    @hookimpl
    def regdefense_fit_start(self, trainer):
        if self.config.gan_weight:
            self.d_opt = torch.optim.Adam(
                trainer.modules["atop_discriminator"].parameters(), lr=self.config.d_lr, betas=(0.5, 0.999)
            )

    def purified(self, trainer) -> Purified:
        assert self.transform is not None, "regdefense_add_modules builds the transform"
        return Purified(trainer.modules["atop_purifier"], self.transform)

    # --- per batch ----------------------------------------------------------------------------

    @hookimpl
    def regdefense_batch_start(self, trainer):
        trainer.raw_model.eval()  # BN statistics of the frozen classifier stay as they are

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        if c.phase == "pretrain":
            return step.inputs
        target = model if c.attack == "classifier" else Defended(self.purified(trainer), model)
        eps = trainer.eps
        alpha = step_size(eps, None, c.attack_steps, 1.0 if c.attack_steps == 1 else 2.5)  # FGSM's step is ε
        with trainer.attack_autocast():
            return pgd(
                target,
                step.inputs,
                step.targets,
                eps=eps,
                alpha=alpha,
                steps=c.attack_steps,
                norm=trainer.norm,
                start=None if c.attack_steps == 1 else "uniform",
            )

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        c = self.config
        purified = self.purified(trainer)
        ref = step.adv_inputs if c.recon_target == "adv" else step.inputs
        rec = purified(ref)
        terms = {"recon": F.l1_loss(rec, ref)}
        if c.phase == "finetune" and trainer.state.epoch >= c.ce_start_epoch:
            out = rec if ref is step.adv_inputs else purified(step.adv_inputs)
            with model_mode(model, False):
                logits = model(out)
            step.outputs["adv"] = logits
            terms["task"] = c.lam * trainer.adv_mean(trainer.ce(logits, step.targets, reduction="none"), step, logits)
        if c.gan_weight:
            d = trainer.modules["atop_discriminator"]
            mask = torch.zeros_like(rec[:, :1])
            fake = rec.detach() if c.gan_g_detached else rec
            terms["gan"] = c.gan_weight * -d(fake, mask).mean()
            step.stash[self.name] = (ref.detach(), rec.detach(), mask)
        return terms

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        if not self.config.gan_weight:
            return
        real, fake, mask = step.stash[self.name]
        d = trainer.modules["atop_discriminator"].requires_grad_(True)
        loss = 0.5 * (F.relu(1 - d(real, mask)).mean() + F.relu(1 + d(fake, mask)).mean())
        self.d_opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.dist.reduce_grads(d.parameters(), step.batch_size)
        self.d_opt.step()
        d.requires_grad_(False)
        step.logs["atop_d_loss"] = loss.detach()

    @hookimpl
    def regdefense_eval_model(self, trainer):
        return Defended(self.purified(trainer), trainer.model).eval()

    def state_dict(self):
        return {"d_opt": self.d_opt.state_dict()} if self.config.gan_weight else {}

    def load_state_dict(self, state):
        if self.config.gan_weight and "d_opt" in state:
            self.d_opt.load_state_dict(state["d_opt"])
