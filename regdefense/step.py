"""``Step``: the working state of one training batch, handed to every per-batch hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    """

    inputs: Tensor
    labels: Tensor
    index: Tensor
    targets: Tensor | None = None
    adv_inputs: Tensor | dict[str, Tensor] | None = None
    outputs: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    stash: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = self.labels

    @classmethod
    def from_batch(cls, batch, device: torch.device) -> "Step":
        """Build a step from a loader batch ``(x, y, index)`` and move it to ``device``."""
        x, y, index = batch
        nb = device.type == "cuda"
        return cls(inputs=x.to(device, non_blocking=nb), labels=y.to(device, non_blocking=nb),
                   index=index.to(device, non_blocking=nb))

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])
