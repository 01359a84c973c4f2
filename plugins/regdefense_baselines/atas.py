"""ATAS, fast AT with adaptive step size (Huang et al., IEEE TIP 2023).

Per-sample state kept across epochs, indexed by dataset index (as FGSM-PGK's buffers): the last perturbation δᵢ and
a moving average Gᵢ of the squared input-gradient norm. Per batch, from x_adv = clip_[0,1](x + δ[idx]):

- warm-up (the first ``warmup_epochs``): one signed step of α = ``step_size``·ε;
- after: g = ∇ CE(f(x_adv), y) (batch mean, model in eval mode), Gᵢ ← (1 − β)·‖gᵢ‖² + β·Gᵢ, and a per-sample step
  αᵢ = clip(2u / (1 + √Gᵢ / c), ``min_step``·u, ``max_step``·u) — hard examples (large gradients) take small steps;
  the unit u is the run's ε (``step_scale=eps``, the default) or 8/255 whatever ε (``fixed``, the authors' code);
- x' = clip_[0,1](Π_ε(x_adv + αᵢ·sign g)); δ[idx] ← x' − x; train on CE(f(x'), y).

δ starts uniform in the ε-ball and is drawn again every ``reset_every`` epochs (not before the last one). Defaults:
the authors' CIFAR script (c = 0.01, β = 0.5, steps between 4/255 and 14/255 at ε = 8/255, 5 warm-up epochs, reset
every 10). Their code keeps the step constants in 255ths at every ε (2·8/255, 4/255, 14/255 also at ε = 12 and
16/255); the default scales them with ε instead — the same at 8/255, and a step that keeps its proportion to the
budget at other ε and on other data (at the digits' ε = 0.2 the largest fixed step would be 0.27ε) — and
``step_scale=fixed`` is theirs. Buffers: N·C·H·W numbers for δ plus N for G (``buffers``: where they live, as
FGSM-PGK's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.attacks.adapter import model_mode
from regdefense.base import buffers
from regdefense.base.errors import ConfigError
from regdefense.host.contract import adversary
from regdefense.host.defense import Defense, resolve_eps


class ATAS(Defense):
    """One signed step per sample from its last perturbation, its size adapted to its gradient-norm history."""

    name = "atas"
    publishes = adversary("info.x_init")
    single_step = True
    norms = ("linf",)

    @dataclass
    class Config:
        eps: float | None = option(None, "perturbation budget ε (none: the run's threat.eps)", ge=0)
        c: float = option(0.01, "c: the step is 2u / (1 + √G / c) (tuned for batches of 128)", gt=0)
        beta: float = option(0.5, "β: momentum of the squared gradient norm G", ge=0, le=0.999)
        min_step: float = option(0.5, "smallest step, in the step unit (the authors': 4/255 = 0.5·8/255)", gt=0)
        max_step: float = option(1.75, "largest step, in the step unit (the authors': 14/255 = 1.75·8/255)", gt=0)
        step_scale: Literal["eps", "fixed"] = option(
            "eps",
            "the unit u of the adaptive step (numerator 2u, bounds min_step·u and max_step·u): the run's ε, or 8/255 "
            "whatever ε (fixed: the authors' code at ε = 12 and 16/255; the two agree at 8/255)",
        )
        step_size: float = option(1.0, "the warm-up's constant step, in ε", gt=0)
        warmup_epochs: int = option(5, "epochs with the constant step before the adaptive one", ge=0, epoch="ends")
        reset_every: int = option(
            10, "draw δ again every this many epochs (never before the last)", ge=1, epoch="every"
        )
        attack_mode: Literal["eval", "train"] = option("eval", "BN/dropout mode during the attack (eval, as theirs)")
        buffers: Literal["auto", "device", "host", "disk"] = option(
            "auto", "where the per-sample δ lives (auto: the device if it fits, else host memory, else disk)"
        )

    def __init__(self, config=None) -> None:
        super().__init__(config)
        c = self.config
        if c.min_step > c.max_step:
            raise ConfigError(f"atas.min_step ({c.min_step}) must not exceed atas.max_step ({c.max_step})")
        self.delta = torch.empty(0)  #: per-sample δ, allocated at fit_start
        self.gnorm = torch.empty(0)  #: per-sample moving average of ‖g‖²
        self.where = "device"

    def _eps(self, trainer) -> float:
        return resolve_eps(trainer, self.config.eps)

    @hookimpl
    def regdefense_fit_start(self, trainer):
        shape = (getattr(trainer, "index_size", trainer.train_size), *trainer.data.input_shape)
        self.where = buffers.place(buffers.nbytes(shape, torch.float32), trainer.device, self.config.buffers)
        folder = Path(trainer.run_dir) / "buffers" if trainer.run_dir is not None else None
        rank = f"-rank{trainer.dist.rank}" if trainer.dist.enabled else ""
        self.delta = buffers.allocate(
            shape,
            where=self.where,
            device=trainer.device,
            dtype=torch.float32,
            path=folder / f"{self.name}-delta{rank}.bin" if folder else None,
        )
        self.gnorm = torch.zeros(shape[0], device=trainer.device)
        self._draw(trainer, 0)

    def _draw(self, trainer, epoch: int) -> None:
        """δ ~ U(−ε, ε), the same on every process (a generator seeded by the run's seed and the epoch)."""
        eps = self._eps(trainer)
        gen = torch.Generator().manual_seed(trainer.config.train.seed * 100_019 + epoch)
        for i in range(0, len(self.delta), 4096):
            part = self.delta[i : i + 4096]
            part.copy_(torch.empty(part.shape).uniform_(-eps, eps, generator=gen).to(part.device))

    @hookimpl
    def regdefense_epoch_start(self, trainer, epoch):
        last = trainer.config.train.epochs
        if epoch > 0 and (epoch + 1) % self.config.reset_every == 0 and epoch + 1 != last:
            self._draw(trainer, epoch)  # the authors' 1-based "epoch % reset == 0 and epoch != epochs"

    def step_sizes(self, grad: torch.Tensor, index: torch.Tensor, eps: float) -> torch.Tensor:
        """Per-sample steps from the updated moving average of ‖g‖² (and that average, stored)."""
        c = self.config
        unit = eps if c.step_scale == "eps" else 8 / 255
        g2 = grad.flatten(1).norm(dim=1) ** 2
        avg = g2 * (1 - c.beta) + self.gnorm[index] * c.beta
        self.gnorm[index] = avg
        return (2 * unit / (1 + avg.sqrt() / c.c)).clamp(c.min_step * unit, c.max_step * unit)

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        c, eps, x = self.config, self._eps(trainer), step.inputs
        x_adv = (x + buffers.rows(self.delta, step.index, x)).clamp(0, 1).detach()
        step.info["x_init"] = x_adv
        with trainer.attack_autocast(), model_mode(model, c.attack_mode == "train"), torch.enable_grad():
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), step.targets), x_adv)
        if trainer.state.epoch < c.warmup_epochs:
            alpha = torch.full((len(x),), c.step_size * eps, device=x.device)
        else:
            alpha = self.step_sizes(grad, step.index, eps)
        moved = x_adv.detach() + alpha.view(-1, *[1] * (x.dim() - 1)) * grad.sign()
        x_next = torch.min(torch.max(moved, x - eps), x + eps).clamp(0, 1).detach()
        trainer.dist.set_rows(self.delta, step.index, x_next - x)
        step.logs["atas_step"] = alpha.mean() / max(eps, 1e-12)
        return x_next

    def state_dict(self):
        return {"delta": self.delta, "gnorm": self.gnorm} if self.where != "disk" else {"gnorm": self.gnorm}

    def load_state_dict(self, state):
        if "delta" in state:
            self.delta.copy_(state["delta"])
        self.gnorm.copy_(state["gnorm"])
