"""Library attacks that compute the wrong thing, corrected in the smallest subclass that fixes it.

torchattacks' ``CW`` and ``UPGD(loss="margin")`` (3.5.1) take "the largest logit other than the true class" as
``max((1 - onehot) * z)``, which is 0 instead of the largest non-true logit whenever all the non-true logits
are negative (``CW`` takes the true logit as ``max(onehot * z)`` too, 0 when it is negative). The loss and
its gradient then vanish and such a point is never attacked: the robust accuracy of the same classifier
changes when a constant is added to every logit (on a nearest-centroid digits classifier, whose logits are all
negative, torchattacks' CW left all 89.7 % correct points untouched; after a +10 shift, or with this fix, 1.7 %
remained). The subclasses below use the C&W margin ``z_y − max_{j≠y} z_j`` with the true class
masked to −∞, and change nothing else. :func:`regdefense.attacks.adapter.resolve_attack` substitutes them for the
library names, so ``torchattacks:CW(...)`` in a spec, a suite or a defense (EATR) gets the corrected attack.

ART's ``CarliniL2Method`` / ``CarliniLInfMethod`` mask the true class correctly and need no fix.
"""

from __future__ import annotations

import torch
import torchattacks
from torch import Tensor


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``z_y − max_{j≠y} z_j`` per sample; invariant to adding a constant to every logit."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    return true - logits.masked_fill(mask, float("-inf")).amax(dim=1)


class CW(torchattacks.CW):
    """torchattacks' C&W-L2 with the margin of the true (or target) class computed correctly."""

    def f(self, outputs: Tensor, labels: Tensor) -> Tensor:
        m = margin(outputs, labels)
        return torch.clamp(-m if self.targeted else m, min=-self.kappa)


class UPGD(torchattacks.UPGD):
    """torchattacks' UPGD whose ``loss="margin"`` (C&W-L∞ in PGD form) computes the margin correctly."""

    def margin_loss(self, images: Tensor, labels: Tensor, target_labels: Tensor) -> Tensor:
        outputs = self.get_logits(images)
        if self.targeted:
            return -torch.clamp(-margin(outputs, target_labels), min=0).sum()
        return -torch.clamp(margin(outputs, labels), min=0).sum()


#: torchattacks names whose class is replaced, with what the fix is, for listings and reports
FIXED = {
    "CW": (CW, "margin with the true class masked to -inf (torchattacks takes max((1-onehot)*z))"),
    "UPGD": (UPGD, "loss='margin' with the true class masked to -inf"),
}
