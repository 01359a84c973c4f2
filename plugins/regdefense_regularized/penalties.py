"""The two regularisers of seed 001 (Pham, Ho & Doan 2025), shared by atwr, atgr and eatr."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["per_sample_mean", "batch_mean_grad", "per_sample_sum"]


def weight_l2(model: nn.Module, all_params: bool = False) -> Tensor:
    """‖W‖² = Σ w² over the weight tensors (parameters with more than one dimension: conv and linear
    weights, not biases or BN affine parameters), or over every parameter with ``all_params``."""
    params = [p for p in model.parameters() if p.requires_grad and (all_params or p.dim() > 1)]
    return torch.stack([p.pow(2).sum() for p in params]).sum()


def input_gradient_penalty(
    model: nn.Module,
    x_adv: Tensor,
    targets: Tensor,
    reduction: Reduction = "per_sample_mean",
    logits: Tensor | None = None,
) -> Tensor:
    """‖∇_x̃ CE(f(x̃), y)‖² by double backprop (``create_graph=True``), so it is differentiable in the weights.

    * ``per_sample_mean`` (default): (1/B)·Σᵢ ‖∇_x̃ᵢ ℓᵢ‖², the exact per-sample gradients (of the summed loss).
    * ``batch_mean_grad``: ‖∇_x̃ (1/B)Σᵢ ℓᵢ‖² = (1/B²)·Σᵢ ‖∇ℓᵢ‖² — B times smaller (what differentiating
      PyTorch's default mean-reduced CE gives).
    * ``per_sample_sum``: Σᵢ ‖∇_x̃ᵢ ℓᵢ‖² — B times larger.

    ``logits`` may be the model's output on ``x_adv`` already computed with ``x_adv.requires_grad``.
    """
    if logits is None or not x_adv.requires_grad:
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
    per = F.cross_entropy(logits, targets, reduction="none")
    (g,) = torch.autograd.grad(per.sum(), x_adv, create_graph=True)
    sq = g.flatten(1).pow(2).sum(dim=1)
    b = per.shape[0]
    if reduction == "per_sample_mean":
        return sq.mean()
    if reduction == "batch_mean_grad":
        return sq.sum() / (b * b)
    return sq.sum()
