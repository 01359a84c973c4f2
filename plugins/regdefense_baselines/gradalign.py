"""GradAlign (Andriushchenko & Flammarion, NeurIPS 2020): FGSM training plus a gradient-alignment regulariser.

R = λ·(1 − mean cos(∇_δ CE(f(x + δ₀), y), ∇_η CE(f(x + η), y))), η ~ U(−ε, ε): the input gradient the adversary's
single step used (at its start x + δ₀) against the one at a random point of the ε-ball, by double backprop. Added
as a term to whatever objective is active; the adversary is any that publishes its first gradient
(``info.grad_init``: ``fast_at``, ``pgd_at`` with ``steps=1``). The paper's setting is FGSM from zero
(``fast_at`` with ``start=zero``, α = ε) and λ = 0.2 at ε = 8/255 on CIFAR-10.

As in the reference code: the first gradient is detached (only the one at the random point carries the graph) and
taken through the reference's own clamp of x + δ₀ to [0, 1] (``torch.max(torch.min(·, 1), 0)``: half the gradient
at a pixel exactly at 0 or 1), the random point is not clipped to the image range, samples where either gradient is
zero are left out of the mean, and the model stays in train mode for both gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.host.contract import PGD_GRAD, Key
from regdefense.host.defense import Defense, resolve_eps


def alignment(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Mean cosine between per-sample gradients, over the samples where neither is zero (1: no penalty, when there is
    no such sample). Computed without asking the device anything, so no step waits for it."""
    n1, n2 = g1.flatten(1).norm(dim=1), g2.flatten(1).norm(dim=1)
    keep = (n1 != 0) & (n2 != 0)
    cos = (g1.flatten(1) * g2.flatten(1)).sum(dim=1) / (n1 * n2).clamp_min(1e-30)
    count = keep.sum()
    mean = (cos * keep).sum() / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.ones_like(mean))


def _through_clamp(grad: torch.Tensor, x_init: torch.Tensor | None) -> torch.Tensor:
    """The first gradient as the reference takes it, through its own ``clamp(x + δ₀, 0, 1)``, which is
    ``torch.max(torch.min(x + δ₀, u), l)`` with one-element tensors: the vector-Jacobian product of that very
    function, so a pixel inside (0, 1) keeps its gradient and one exactly at 0 or 1 gets what PyTorch's min/max give
    a tie (half of it on current versions; ``torch.clamp`` would give none). The adversary's own step is unchanged."""
    grad = grad.detach()
    if x_init is None:
        return grad
    with torch.enable_grad():
        z = x_init.detach().to(grad.dtype).requires_grad_(True)
        (out,) = torch.autograd.grad(torch.max(torch.min(z, z.new_ones(1)), z.new_zeros(1)), z, grad)
    return out


class GradAlign(Defense):
    """Adds λ·(1 − cos) between the adversary's input gradient and one at a random point (double backprop)."""

    name = "gradalign"
    norms = ("linf",)  # the random point is uniform in the L∞ ball, as the reference's
    reads = (
        Key(
            PGD_GRAD,
            "compute_loss",
            required=True,
            why="GradAlign aligns the gradient the adversary's step used with one at a random point",
        ),
        Key("info.x_init", "compute_loss", silent=True),
    )

    @dataclass
    class Config:
        weight: float = option(0.2, "λ: weight of 1 − cos (0.2 at ε = 8/255 on CIFAR-10 in the paper)", ge=0)
        eps: float | None = option(None, "radius of the random point (none: the run's current ε)", ge=0)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        if model is not trainer.model or "grad_init" not in step.info:
            return terms  # an evaluation forward, or no adversary step this batch
        eps = resolve_eps(trainer, self.config.eps)
        x = step.inputs.detach()
        eta = torch.empty_like(x).uniform_(-eps, eps).requires_grad_(True)
        loss = F.cross_entropy(model(x + eta).float(), step.targets)
        (g2,) = torch.autograd.grad(loss, eta, create_graph=True)
        cos = alignment(_through_clamp(step.info["grad_init"], step.info.get("x_init")), g2)
        step.logs["gradalign_cos"] = cos.detach()
        terms["gradalign"] = self.config.weight * (1.0 - cos)
        return terms
