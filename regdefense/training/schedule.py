"""Learning-rate schedules: the main schedule of ``[train]`` and an optional warm-up in front of it.

The warm-up multiplies the main schedule's rate by a factor that is ``warmup_factor`` at the start and 1 after
``warmup_epochs`` (``linear``: rising linearly at each scheduler step, per batch or per epoch; ``constant``:
``warmup_factor`` throughout, as DYNAT's
code runs its first epoch at 0.02 = 0.2 × 0.1). It never changes the main schedule's own values: the main
scheduler steps on its undamped rates, so the milestones stay in absolute epochs.
"""

from __future__ import annotations

from typing import Any

import torch

from regdefense.base.config import TrainConfig


def build_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainConfig, batches_per_epoch: int, peak_lr: float | None = None
):
    """The scheduler ``[train]`` asks for, stepped once per epoch or once per optimizer step (``schedule_step``);
    ``peak_lr``: the rate after linear scaling (default ``t.lr``)."""
    per_epoch = batches_per_epoch if t.schedule_step == "iter" else 1
    total = max(1, t.epochs * per_epoch)
    sched = torch.optim.lr_scheduler
    main: sched.LRScheduler
    if t.schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=total)
    elif t.schedule == "onecycle":
        main = sched.OneCycleLR(optimizer, max_lr=peak_lr or t.lr, total_steps=total, pct_start=t.onecycle_pct)
    else:
        milestones = (
            []
            if t.schedule == "constant"
            else sorted(int(round((m * t.epochs if m < 1 else m) * per_epoch)) for m in t.milestones)
        )
        if milestones and t.lr_factors is not None:  # a factor per stage, not a power of gamma
            factors = [1.0, *t.lr_factors]
            main = sched.LambdaLR(optimizer, lambda i: factors[sum(i >= m for m in milestones)])
        else:
            main = sched.MultiStepLR(optimizer, milestones=milestones, gamma=t.gamma)
    if t.warmup_epochs <= 0:
        return main
    return Warmup(main, steps=t.warmup_epochs * per_epoch, factor=t.warmup_factor, shape=t.warmup)


class Warmup:
    """Scale a scheduler's rates by a warm-up factor (``step``, ``state_dict``, ``load_state_dict`` as a scheduler)."""

    def __init__(self, main: Any, steps: float, factor: float, shape: str) -> None:
        self.main, self.steps, self.factor, self.shape = main, steps, factor, shape
        self.optimizer = main.optimizer
        self.t = 0
        self.undamped = [g["lr"] for g in self.optimizer.param_groups]
        self._apply()

    def multiplier(self, t: int) -> float:
        if t >= self.steps:
            return 1.0
        if self.shape == "constant":
            return self.factor
        return self.factor + (1 - self.factor) * t / self.steps

    def _apply(self) -> None:
        m = self.multiplier(self.t)
        for group, lr in zip(self.optimizer.param_groups, self.undamped):
            group["lr"] = lr * m

    def step(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.undamped):
            group["lr"] = lr  # the main schedule steps on its own rates
        self.main.step()
        self.undamped = [g["lr"] for g in self.optimizer.param_groups]
        self.t += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "t": self.t, "undamped": list(self.undamped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.t, self.undamped = int(state["t"]), list(state["undamped"])
        self._apply()
