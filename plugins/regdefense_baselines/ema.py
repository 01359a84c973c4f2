"""EMA: an exponential moving average of the weights (and BN buffers), used for evaluation.

w̄ ← d·w̄ + (1 − d)·w after every optimizer step, with d = min(decay, (t + 1)/(t + 10)) early on.
With ``adaptive_tau`` set, FGSM-PGK's adaptive decay applies when a defense publishes
``step.info["acc_ratio"]`` = r: d = decay if r < τ, else min(1, 0.99999·r/τ) (reference: τ = 0.82 on
CIFAR-10, 0.9 on CIFAR-100). The averaged copy is what evaluation, ``best.pt`` selection and the final
table see (``regdefense_eval_model``), and it is saved with every checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from regdefense import hookimpl, option
from regdefense.host.contract import Key
from regdefense.host.defense import Defense


class EMA(Defense):
    """Evaluate an exponential moving average of the weights."""

    name = "ema"
    reads = (
        Key(
            "info.acc_ratio",
            "batch_end",
            required=True,
            when="adaptive_tau",
            why="ema.adaptive_tau would be ignored and the fixed decay used; add fgsm_pgk or unset it",
        ),
    )

    @dataclass
    class Config:
        decay: float = option(0.999, "EMA decay per step", ge=0, le=1)
        warmup: bool = option(True, "cap the decay at (t + 1)/(t + 10) so early averages are not stuck at init")
        adaptive_tau: float | None = option(None, "FGSM-PGK's adaptive decay threshold τ (none: fixed decay)", gt=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.model: torch.nn.Module | None = None
        self.updates = 0

    @hookimpl
    def regdefense_fit_start(self, trainer):
        self.model = copy.deepcopy(trainer.raw_model).eval().requires_grad_(False)
        self.updates = 0

    def decay(self, step) -> torch.Tensor | float:
        c = self.config
        d: torch.Tensor | float = c.decay
        ratio = step.info.get("acc_ratio")
        if c.adaptive_tau is not None and ratio is not None:
            d = torch.where(
                ratio < c.adaptive_tau,
                torch.full_like(ratio, c.decay),
                (0.99999 * ratio / c.adaptive_tau).clamp(max=1.0),
            )
        if c.warmup:
            cap = (self.updates + 1) / (self.updates + 10)
            d = torch.clamp(d, max=cap) if isinstance(d, torch.Tensor) else min(d, cap)
        return d

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        d = self.decay(step)
        with torch.no_grad():
            ema = self.model.state_dict()
            for name, value in trainer.raw_model.state_dict().items():
                if value.dtype.is_floating_point:
                    ema[name].mul_(d).add_((1 - d) * value)
                else:
                    ema[name].copy_(value)
        self.updates += 1

    @hookimpl
    def regdefense_eval_model(self, trainer):
        return self.model

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
