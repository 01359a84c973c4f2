"""FGSM-PGK (Jia et al., TPAMI 2024; FGSM-PGI, ECCV 2022): fast AT with prior-guided initialisation.

Per-sample buffers indexed by dataset index: a prior perturbation Δ and a momentum M, reset every
``reset_every`` epochs (Δ ← ±α corners, clipped to ε; M ← 0). Per batch (x, y, idx):

1. δ₀ = Δ[idx]; ŷ = label-smoothed targets (``smoothing`` on the true class); z₀ = f(x + δ₀) in train mode;
2. g = ∇_δ₀ CE(z₀, ŷ); δ₁ = Π_ε(δ₀ + α·sign g); z₁ = f(x + δ₁);
3. L = CE(z₁, ŷ) + λ·MSE(z₁, z₀) — MSE on logits over B×K, z₀ not detached;
4. after the step: r = acc(z₁)/acc(z₀) on the batch; M[idx] ← g/‖g‖₁·(2 − r) + μ·M[idx];
   Δ[idx] ← δ₀ + α·sign M[idx] clipped to the ε-ball and to [0, 1] − x (the reference clips the stored prior
   to this batch's image; x + δ₀ itself is not clipped before the first forward, as in the reference). r is published
   as ``step.info["acc_ratio"]`` for ``ema``'s
   adaptive decay (``-o ema.adaptive_tau=0.82``). The initial point and its logits are published as
   ``step.info["x_init"]`` and ``step.outputs["init"]`` (RegMix's AMR uses them).

Defaults: CIFAR-10 reference values: α = ε = 8/255, smoothing 0.5, λ = 5.6, μ = 0.3, reset every 10 epochs
(CIFAR-100/Tiny-ImageNet: 0.8, 1, 0.1, 40). Buffers cost 2·N·C·H·W numbers (≈1.2 GB for CIFAR-10 in float32,
≈1.5 TB for ImageNet at 224 px): ``buffers`` puts them on the device, in host memory or memory-mapped on disk
(``auto``: where they fit, see :mod:`regdefense.base.buffers`), ``precision=float16`` halves them. `regdefense train
--check` prints the size and the place before training. Buffers off the device are refilled at a reset from a
generator seeded by (train.seed, epoch), identical on every process, instead of drawn on rank 0 and broadcast; disk
buffers are not copied into checkpoints (the checkpoint names their files), so a resumed run continues from the
buffers' latest state rather than the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from regdefense import hookimpl, option
from regdefense.attacks.adapter import project
from regdefense.base import buffers
from regdefense.host.contract import APPLIES_WEIGHTS, Key, adversary
from regdefense.host.defense import Defense, StepBudget
from regdefense.host.losses import smooth_one_hot, soft_ce


class FGSMPGK(Defense):
    """Single-step AT from a per-sample prior perturbation, with a logit-consistency term."""

    name = "fgsm_pgk"
    publishes = (
        *adversary("info.x_init", "outputs.init"),
        Key("outputs.adv", "compute_loss"),
        Key("info.acc_ratio", "batch_end"),
    )
    reads = (APPLIES_WEIGHTS,)
    single_step = True
    norms = ("linf",)

    @dataclass
    class Config(StepBudget):
        eps: float | None = option(None, "perturbation budget (none: the run's threat.eps)", ge=0)
        alpha: float | None = option(None, "FGSM step from the prior (none: ε)", gt=0)
        smoothing: float = option(
            0.5, "probability of the true class in the smoothed targets (C10 0.5, C100 0.8)", gt=0, le=1
        )
        lam: float = option(5.6, "weight of the MSE consistency term (C10 5.6, C100 1)", ge=0)
        momentum: float = option(0.3, "μ of the prior's momentum buffer (C10 0.3, C100 0.1)", ge=0, le=1)
        reset_every: int = option(10, "reset the buffers every this many epochs (C10 10, C100 40)", ge=1, epoch="every")
        buffers: Literal["auto", "device", "host", "disk"] = option(
            "auto",
            "where the per-sample prior and momentum live (auto: the device if they take under a quarter of "
            "its memory, else host memory, else memory-mapped files in the run directory)",
        )
        precision: Literal["float32", "float16"] = option("float32", "storage type of the buffers")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.prior: torch.Tensor | None = None
        self.mom: torch.Tensor | None = None
        self.where = "device"  #: where the buffers live, decided at fit_start

    def _eps_alpha(self, trainer) -> tuple[float, float]:
        return self.config.resolve(trainer)

    def _shape_dtype(self, trainer) -> tuple[tuple[int, ...], torch.dtype]:
        dtype = torch.float16 if self.config.precision == "float16" else torch.float32
        return (getattr(trainer, "index_size", trainer.train_size), *trainer.data.input_shape), dtype  # extra rows too

    def memory_needs(self, trainer) -> dict[str, tuple[int, str]]:
        """Bytes of the per-sample buffers and where they would go (for ``train --check``)."""
        shape, dtype = self._shape_dtype(trainer)
        n = 2 * buffers.nbytes(shape, dtype)
        return {
            f"{self.name} prior + momentum ({self.config.precision})": (
                n,
                buffers.place(n, trainer.device, self.config.buffers),
            )
        }

    @hookimpl
    def regdefense_fit_start(self, trainer):
        shape, dtype = self._shape_dtype(trainer)
        self.where = buffers.place(2 * buffers.nbytes(shape, dtype), trainer.device, self.config.buffers)
        folder = Path(trainer.run_dir) / "buffers" if trainer.run_dir is not None else None
        rank = f"-rank{trainer.dist.rank}" if trainer.dist.enabled else ""
        self.prior, self.mom = (
            buffers.allocate(
                shape,
                where=self.where,
                device=trainer.device,
                dtype=dtype,
                path=folder / f"{self.name}-{n}{rank}.bin" if folder else None,
            )
            for n in ("prior", "momentum")
        )

    @hookimpl
    def regdefense_epoch_start(self, trainer, epoch):
        if epoch % self.config.reset_every == 0:
            eps, alpha = self._eps_alpha(trainer)
            if self.where == "device":
                self.prior.copy_((alpha * torch.empty_like(self.prior).uniform_(-eps, eps).sign()).clamp(-eps, eps))
                trainer.dist.broadcast_(self.prior)  # one prior for all processes
                self.mom.zero_()
                return
            gen = torch.Generator().manual_seed(trainer.config.train.seed * 100_003 + epoch)  # the same on every rank
            for i in range(0, len(self.prior), 4096):
                chunk = torch.empty(self.prior[i : i + 4096].shape).uniform_(-eps, eps, generator=gen).sign()
                self.prior[i : i + 4096] = (alpha * chunk).clamp(-eps, eps).to(self.prior.dtype)
                self.mom[i : i + 4096] = 0

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        eps, alpha = self._eps_alpha(trainer)
        x = step.inputs
        # the stored prior is within ε and was clipped to the image range when it was written; as in the
        # reference code the first forward takes x + δ₀ as it is (an augmented x may leave [0, 1] slightly)
        delta0 = buffers.rows(self.prior, step.index, x).clamp(-eps, eps).requires_grad_(True)
        soft = smooth_one_hot(step.targets, trainer.data.num_classes, self.config.smoothing)
        with trainer.autocast():
            z0 = model(x + delta0)  # train mode, as the reference code: this forward also updates BN statistics
            (g,) = torch.autograd.grad(soft_ce(z0, soft).mean(), delta0, retain_graph=True)
        step.outputs["init"] = z0  # graph kept: the consistency term back-propagates into this branch too
        step.info["x_init"] = (x + delta0).detach()
        step.stash[self.name] = {"delta0": delta0.detach(), "grad": g.detach(), "soft": soft}
        return (x + project(delta0.detach() + alpha * g.sign(), x, eps, "linf")).detach()

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        s = step.stash[self.name]
        z1 = model(step.adv_inputs)
        step.outputs["adv"] = z1
        terms = {"task": trainer.adv_mean(soft_ce(z1, s["soft"]), step, z1)}
        own = model is trainer.model
        z0 = step.outputs.get("init") if own else None  # AWP clears it when it perturbs the weights
        if z0 is None and (self.config.lam or own):
            z0 = model(step.info["x_init"])
            if own:
                step.outputs["init"] = z0
        if self.config.lam:
            terms["consistency"] = self.config.lam * (z1 - z0).pow(2).mean()
        return terms

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        s, idx = step.stash[self.name], step.index
        eps, alpha = self._eps_alpha(trainer)
        with torch.no_grad():
            acc0 = (step.outputs["init"].argmax(1) == step.targets).float().mean()
            acc1 = (step.outputs["adv"].argmax(1) == step.targets).float().mean()
            ratio = torch.where(acc0 > 0, acc1 / acc0.clamp_min(1e-12), torch.ones_like(acc0))
            g = s["grad"]
            m = g / g.abs().sum().clamp_min(1e-12) * (2 - ratio) + self.config.momentum * buffers.rows(self.mom, idx, g)
            trainer.dist.set_rows(self.mom, idx, m)  # buffer[idx] = value, on every process
            trainer.dist.set_rows(self.prior, idx, project(s["delta0"] + alpha * m.sign(), step.inputs, eps, "linf"))
        step.info["acc_ratio"] = ratio

    def state_dict(self):
        if self.where == "disk":  # the files are the state: a checkpoint names them instead of copying them
            return {"files": [self.prior.untyped_storage().filename, self.mom.untyped_storage().filename]}
        return {"prior": self.prior, "momentum": self.mom}

    def load_state_dict(self, state):
        if "files" in state:
            if self.where == "disk" and state["files"] == self.state_dict()["files"]:
                return
            for buf, name in zip((self.prior, self.mom), state["files"]):
                buf.copy_(torch.from_file(name, shared=False, size=buf.numel(), dtype=buf.dtype).view(buf.shape))
            return
        self.prior.copy_(state["prior"])
        self.mom.copy_(state["momentum"])
