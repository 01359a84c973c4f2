"""Training for randomized smoothing: Gaussian augmentation, SmoothAdv and MACER.

The three train a base classifier f whose Gaussian-smoothed classifier g(x) = argmax_c P(f(x + N(0, σ²I)) = c) is
certified by ``regdefense evaluate RUN --certify smoothing --sigma σ`` (:mod:`regdefense.evaluation.smoothing`). Each
is one
defense on the loop; the pages under ``docs/defenses/`` give the papers' settings.

* ``gaussian_aug`` (Cohen, Rosenfeld & Kolter 2019, ``locuslab/smoothing`` ``train.py``): the adversary's place is
  taken by noise, x + σ·N(0, I), not clipped to [0, 1]; the loop's objective trains on it.
* ``smoothadv`` (Salman et al. 2019, ``Hadisalman/smoothing-adversarial`` ``train_pgd.py``, ``attacks.py``
  ``PGD_L2``): m noise draws δ₁..δ_m per image, then T steps of L2 PGD from 0 on the soft smoothed classifier's loss
  −log((1/m) Σ_j softmax(f(x' + δ_j))_y) (normalised gradient, step 2ε/T, clipped to [0, 1], then projected on the
  ε-ball), with the model in eval mode; ε grows over ``warmup_epochs`` as min(ε, (epoch + 1)·ε/warmup). The loss is
  CE on x' + δ₁, or on all m copies with ``multi_noise``. The same draws serve the attack and the loss.
* ``macer`` (Zhai et al. 2020, ``RuntianZ/macer`` ``macer.py``): k noisy copies of each clean image, in train mode;
  L = (1/B)[Σᵢ −log((1/k) Σ_j softmax(f(xᵢ + δᵢⱼ))_{yᵢ} + 1e-10) + λ·(σ/2)·Σᵢ∈H (Φ⁻¹(p̂₂) − Φ⁻¹(p̂₁) + γ)], p̂ the
  average of softmax(β·f) over the copies, p̂₁ ≥ p̂₂ its top two, H the points whose top class is the label and whose
  gap |Φ⁻¹(p̂₂) − Φ⁻¹(p̂₁)| is finite and at most γ (the hinge). No adversary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.base.errors import ConfigError
from regdefense.host.defense import Defense, step_size
from regdefense.host.discovery import providers

#: defenses that make no sense under a smoothing defense, and why (checked at the start of training)
NOT_WITH = {
    "ibp": "IBP's loss bounds the L∞ ball around the clean input and never sees the Gaussian noise",
    "gairat": "its per-sample weights come from how many PGD steps an L∞/L2 adversary needed, which noise has not",
    "mail": "its per-sample weights come from an adversary's margins, which noise has not",
}


def refuse_stacks(trainer, name: str, also: dict[str, str] | None = None) -> None:
    """Refuse, by name, an active defense listed in :data:`NOT_WITH` (or ``also``)."""
    bad = NOT_WITH | (also or {})
    for other, _ in trainer.pm.list_name_plugin():
        if other in bad and other != name:
            raise ConfigError(f"{name} cannot stack with {other}: {bad[other]}")


def gaussian_copies(x: torch.Tensor, copies: int, sigma: float) -> torch.Tensor:
    """``copies`` draws of σ·N(0, I) per image, shaped (B, copies, C, H, W), from the global generator."""
    return sigma * torch.randn((len(x), copies, *x.shape[1:]), device=x.device, dtype=x.dtype)


class GaussianAug(Defense):
    """Train on x + N(0, σ²I) (Cohen et al.): the base classifier of a smoothed one."""

    name = "gaussian_aug"

    @dataclass
    class Config:
        sigma: float = option(0.25, "σ of the training noise (certify with the same σ)", gt=0)

    @hookimpl
    def regdefense_fit_start(self, trainer):
        refuse_stacks(trainer, self.name)

    @hookimpl
    def regdefense_make_adversarial(self, step):
        return step.inputs + self.config.sigma * torch.randn_like(step.inputs)


def smooth_pgd(model, x, y, noise, eps: float, steps: int) -> torch.Tensor:
    """Salman et al.'s PGD on the soft smoothed classifier: x' with ‖x' − x‖₂ ≤ ε, x' in [0, 1], maximising
    −log mean_j softmax(f(x' + noise[:, j]))_y (noise: B × m × C × H × W). Runs in the model's current mode."""
    b, m = noise.shape[:2]
    delta = torch.zeros_like(x)
    lr = step_size(eps, None, steps, 2.0)  # Salman et al.: 2ε/T
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(((x + delta).unsqueeze(1) + noise).flatten(0, 1))
        soft = F.softmax(logits, dim=1).view(b, m, -1).mean(1)
        loss = F.nll_loss(torch.log(soft.clamp(min=1e-20)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            norms = grad.flatten(1).norm(dim=1)
            grad = grad / norms.clamp(min=1e-30).view(-1, *[1] * (x.dim() - 1))
            zero = norms == 0
            if zero.any():  # no gradient: a random direction (drawn only then, as the reference does)
                grad[zero] = -torch.randn_like(grad[zero])
            delta = ((x + delta + lr * grad).clamp(0, 1) - x).renorm(p=2, dim=0, maxnorm=eps)
    return (x + delta).detach()


class SmoothAdv(Defense):
    """SmoothAdv-PGD (Salman et al.): adversarial training of the smoothed classifier."""

    name = "smoothadv"
    norms = ("l2",)

    @dataclass
    class Config:
        sigma: float = option(0.25, "σ of the noise (certify with the same σ)", gt=0)
        eps: float | None = option(None, "L2 budget ε of the attack (none: the run's threat.eps, unramped)", ge=0)
        steps: int = option(10, "T: PGD steps (Salman et al.'s default 10)", ge=1)
        samples: int = option(1, "m: noise draws per image for the attack (the paper's m_train: 1, 2, 4, 8)", ge=1)
        multi_noise: bool = option(False, "train on all m noisy copies (--train-multi-noise), else on the first")
        warmup_epochs: int = option(
            1, "ε = min(ε, (epoch + 1)·ε/warmup) (epoch from 0; Salman et al.'s recipes: 10)", ge=1, epoch="ends"
        )

    @hookimpl
    def regdefense_fit_start(self, trainer):
        refuse_stacks(trainer, self.name)

    def epsilon(self, trainer) -> float:
        c = self.config
        eps = c.eps if c.eps is not None else trainer.eps_full
        return min(eps, (trainer.state.epoch + 1) * eps / c.warmup_epochs)

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c = self.config
        noise = gaussian_copies(step.inputs, c.samples, c.sigma)
        step.stash[self.name] = noise
        eps = self.epsilon(trainer)
        if eps == 0:
            return step.inputs
        was = model.training
        model.eval()  # the reference attacks in eval mode, with the weights' gradients off
        try:
            with trainer.attack_autocast():
                return smooth_pgd(model, step.inputs, step.targets, noise, eps, c.steps)
        finally:
            model.train(was)

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        noise = step.stash[self.name]
        adv = step.adv_inputs
        if self.config.multi_noise:
            inputs = (adv.unsqueeze(1) + noise).flatten(0, 1)
            targets = step.targets.repeat_interleave(noise.shape[1], 0)
        else:
            inputs, targets = adv + noise[:, 0], step.targets
        return {"task": trainer.ce(model(inputs), targets)}


def macer_terms(logits, y, sigma: float, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MACER's two sums over the batch (logits: B × k × K): the classification term and the hinge on the radius
    (before λ and the division by B), and the mask of points inside the hinge."""
    avg = F.softmax(logits, dim=2).mean(1)
    classification = F.nll_loss(torch.log(avg + 1e-10), y, reduction="sum")
    top = F.softmax(beta * logits, dim=2).mean(1).topk(2)
    with torch.no_grad():
        gap = torch.special.ndtri(top.values[:, 1]) - torch.special.ndtri(top.values[:, 0])
        hinged = (top.indices[:, 0] == y) & torch.isfinite(gap) & (gap.abs() <= gamma)
    # Φ⁻¹ again on the selected points only, as the reference does: a gradient through an infinite Φ⁻¹(0) or Φ⁻¹(1)
    # of an unselected point would be NaN even under a mask
    p1, p2 = top.values[hinged, 0], top.values[hinged, 1]
    radius = (torch.special.ndtri(p2) - torch.special.ndtri(p1) + gamma).sum() * sigma / 2
    return classification, radius, hinged


class MACER(Defense):
    """MACER (Zhai et al.): maximise the smoothed classifier's certified radius, attack-free."""

    name = "macer"

    @dataclass
    class Config:
        sigma: float = option(0.25, "σ of the noise (certify with the same σ)", gt=0)
        samples: int = option(16, "k: noisy copies per image (the reference's gauss_num)", ge=1)
        lam: float = option(12.0, "λ: weight of the radius term (reference: 12 at σ = 0.25)", ge=0)
        gamma: float = option(8.0, "γ: hinge on the radius gap (reference: 8)", ge=0)
        beta: float = option(16.0, "β: inverse temperature of the radius term's softmax (reference: 16)", gt=0)
        lam_warmup_epochs: int = option(
            0,
            "epochs trained with λ = 0 first (not in the reference: the digits from scratch need it)",
            ge=0,
            epoch="starts",
        )

    @hookimpl
    def regdefense_fit_start(self, trainer):
        refuse_stacks(trainer, self.name)
        for other in providers(trainer.pm, "regdefense_make_adversarial"):
            if other != self.name:
                raise ConfigError(
                    f"macer cannot stack with {other}: MACER trains on its own noisy copies of the clean batch, so "
                    f"{other}'s adversarial examples would be computed and never used"
                )

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        c, x = self.config, step.inputs
        noisy = (x.unsqueeze(1) + gaussian_copies(x, c.samples, c.sigma)).flatten(0, 1)
        logits = model(noisy).view(len(x), c.samples, -1)
        classification, radius, hinged = macer_terms(logits, step.targets, c.sigma, c.beta, c.gamma)
        step.logs["macer_hinged"] = hinged.float().mean().detach()
        lam = c.lam if trainer.state.epoch >= c.lam_warmup_epochs else 0.0
        return {"task": classification / len(x), "radius": lam * radius / len(x)}
