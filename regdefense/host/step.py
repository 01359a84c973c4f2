"""``Step``: the working state of one training batch, handed to every per-batch hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class Step:
    """One batch on its way through the loop.

    ``labels`` are the true labels and are never overwritten; ``targets`` are what the task term
    trains on (dynamic or soft labels replace them). ``index`` holds dataset indices, for
    defenses that keep per-sample state. ``adv_inputs`` is what ``regdefense_make_adversarial``
    returned (a tensor, or a dict of tensors for defenses that train on several adversarial
    batches). ``outputs`` holds logits other hooks may reuse, ``losses`` the named loss terms of
    the last objective, and ``stash`` per-plugin scratch space keyed by plugin name.

    ``info`` carries what the adversary learned per sample for modifiers to use (``info["kappa"]``:
    GAIRAT's count of iterations still classified correctly). ``weighters`` are per-sample weighting
    functions ``fn(step, adv_logits) -> weights`` that modifiers such as GAIRAT and MAIL register;
    objectives apply them to their adversarial term through :meth:`Trainer.adv_mean`. ``logs`` holds
    scalars to log per epoch (as ``log_<name>`` means in ``metrics.jsonl``) without adding them to the loss,
    such as ATGR's raw penalty.
    """

    inputs: Tensor
    labels: Tensor
    index: Tensor
    targets: Tensor | None = None
    adv_inputs: Tensor | dict[str, Tensor] | None = None
    outputs: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    stash: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, Tensor] = field(default_factory=dict)
    weighters: list[Callable[["Step", Tensor], Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = self.labels

    @classmethod
    def from_batch(cls, batch, device: torch.device) -> "Step":
        """Build a step from a loader batch ``(x, y, index)`` and move it to ``device``."""
        x, y, index = batch
        nb = device.type == "cuda"
        return cls(
            inputs=x.to(device, non_blocking=nb),
            labels=y.to(device, non_blocking=nb),
            index=index.to(device, non_blocking=nb),
        )

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])
