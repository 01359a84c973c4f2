"""Defensive distillation (Papernot et al., S&P 2016), a baseline of seed 001's tables — and a classic case of
gradient masking that evaluation must see through (Carlini & Wagner 2016).

Two runs with this defense:

1. the teacher: ``teacher = ""``: cross-entropy of softmax(z/T) against the true labels;
2. the student: ``teacher = RUN_DIR`` (the teacher's run, its ``best.pt``, or a checkpoint file): cross-entropy of
   softmax(z/T) against the teacher's softmax(z_teacher/T), the soft labels.

Both networks are deployed at temperature 1: the student's logits are then about T times larger than a normally
trained network's, the softmax saturates, and the cross-entropy gradient underflows — gradient-based attacks
fail while the model is no more robust. ``regdefense evaluate`` flags it (zero input gradients, a black-box
attack beating the white-box one); margin-loss attacks (C&W, APGD-DLR, Square) still break it.

Defaults: T = 100 (the paper's MNIST and CIFAR-10 setting). No adversarial examples are involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from regdefense import hookimpl, option
from regdefense.base import checkpoint
from regdefense.base.errors import ConfigError, first_line
from regdefense.host.contract import Key
from regdefense.host.defense import Defense
from regdefense.host.losses import soft_ce


class Distillation(Defense):
    """Train at temperature T on hard labels (teacher) or on a teacher's soft labels (student)."""

    name = "distillation"
    publishes = (Key("outputs.adv", "compute_loss"),)

    @dataclass
    class Config:
        temperature: float = option(100.0, "T of the softmax during training (the paper: 100)", gt=0)
        teacher: str = option(
            "", "the teacher: a run directory (its best.pt) or a checkpoint file; empty: this run trains the teacher"
        )

    @hookimpl
    def regdefense_add_modules(self, trainer):
        if not self.config.teacher:
            return None
        path = Path(self.config.teacher)
        ckpt = path / "checkpoints" / "best.pt" if path.is_dir() else path
        payload = checkpoint.load(ckpt)
        teacher = trainer.build_network("auto")
        try:
            teacher.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise ConfigError(
                f"distillation.teacher: the weights in {ckpt} do not fit this run's model: {first_line(exc, 200)}"
            ) from None
        return {"distillation_teacher": teacher.eval().requires_grad_(False)}

    @hookimpl
    def regdefense_compute_loss(self, trainer, step, model):
        t = self.config.temperature
        logits = model(step.adv_inputs)
        step.outputs["adv"] = logits
        if not self.config.teacher:
            return {"task": trainer.ce(logits / t, step.targets)}
        teacher = trainer.modules["distillation_teacher"].eval()
        with torch.no_grad():
            soft = F.softmax(teacher(step.inputs) / t, dim=1)
        return {"task": soft_ce(logits / t, soft).mean()}
