"""Small helpers the baseline defenses share (budgets and attack-mode handling)."""

from __future__ import annotations

from typing import Any


def budget(
    trainer: Any, eps: float | None, alpha: float | None, steps: int, alpha_factor: float = 2.5
) -> tuple[float, float]:
    """The ε (the defense's own, ramped, or the run's current ε) and step size (default ``alpha_factor·ε/steps``)."""
    e = trainer.ramp(eps) if eps is not None else trainer.eps
    return e, (alpha if alpha is not None else alpha_factor * e / steps)
