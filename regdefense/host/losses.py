"""Loss pieces several defenses share, with the KL direction spelled out.

In PyTorch ``F.kl_div(input=log q, target=p)`` computes KL(p ‖ q); :func:`kl` takes logits of both
sides in the order of the formula, so ``kl(p_logits, q_logits)`` is KL(p ‖ q).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl(p_logits: Tensor, q_logits: Tensor, reduction: str = "none") -> Tensor:
    """KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) per sample (``reduction="none"``), or its ``"mean"``/``"sum"``."""
    per = F.kl_div(
        F.log_softmax(q_logits, dim=1), F.log_softmax(p_logits, dim=1), reduction="none", log_target=True
    ).sum(dim=1)
    return per if reduction == "none" else (per.mean() if reduction == "mean" else per.sum())


def smooth_one_hot(labels: Tensor, num_classes: int, on_value: float) -> Tensor:
    """Label-smoothed targets: ``on_value`` on the true class, the rest spread evenly (FGSM-PGK's ŷ)."""
    off = (1.0 - on_value) / (num_classes - 1)
    out = torch.full((len(labels), num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], on_value)


def soft_ce(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Per-sample cross-entropy against a probability vector: −Σ_k t_k log softmax(z)_k."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1)
