"""Numbers an evaluation reports: accuracy intervals, Acc-drop, PSNR, perturbation norms, detection AUROC."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (sensible at 0 %, 100 % and small n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def acc_drop(clean_acc: float, adv_acc: float) -> float:
    """Seed 001, Eq. 21: Acc-drop = Acc-origin − Acc-adv (same units as the inputs; may be negative)."""
    return clean_acc - adv_acc


def psnr(x: Tensor, x_adv: Tensor, peak: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, 10·log10(peak² / MSE); +inf for an unchanged image."""
    mse = (x_adv - x).flatten(1).pow(2).mean(dim=1)
    return 10 * torch.log10(peak**2 / mse)


def auroc(scores_negative: Tensor, scores_positive: Tensor) -> float:
    """Area under the ROC curve for separating positives (higher score) from negatives.

    The Mann–Whitney statistic with ties counted half: P(s_pos > s_neg) + ½·P(s_pos = s_neg).
    """
    neg, pos = scores_negative.double().flatten(), scores_positive.double().flatten()
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = torch.cat([neg, pos])
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inverse, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


def detection_score(logits: Tensor) -> Tensor:
    """How suspicious an input looks: 1 − max softmax probability (higher = more likely adversarial)."""
    return 1 - logits.float().softmax(dim=1).amax(dim=1)


def per_point(x: Tensor, x_adv: Tensor, adv_logits: Tensor) -> dict[str, Tensor]:
    """Per image: PSNR, L∞ and L2 of the perturbation, and the adversarial input's detection score."""
    d = (x_adv - x).flatten(1)
    return {
        "psnr": psnr(x, x_adv),
        "linf": d.abs().amax(dim=1) if d.numel() else torch.zeros(len(x)),
        "l2": d.norm(dim=1),
        "score": detection_score(adv_logits),
    }


def summarise(points: dict[str, Tensor], clean_scores: Tensor, mask: Tensor | None = None) -> dict:
    """A row's PSNR mean (finite values), perturbation norms and detection AUROC from its per-point arrays, over
    ``mask`` (default: every point). Chunks of an evaluation concatenate their arrays and summarise once."""
    sel = torch.ones(len(clean_scores), dtype=torch.bool) if mask is None else mask
    ps, linf, l2 = points["psnr"][sel], points["linf"][sel], points["l2"][sel]
    finite = ps[torch.isfinite(ps)]
    n = int(sel.sum())
    return {
        "psnr_mean": float(finite.mean()) if len(finite) else None,
        "norms": {
            "linf_max": float(linf.max()) if n else 0.0,
            "linf_mean": float(linf.mean()) if n else 0.0,
            "l2_mean": float(l2.mean()) if n else 0.0,
            "changed": int((linf > 0).sum()),
        },
        "auroc": auroc(clean_scores[sel], points["score"][sel]) if n else None,
    }
