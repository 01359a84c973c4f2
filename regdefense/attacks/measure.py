"""Measuring primitives: logits, per-point correctness under an attack, accuracy — batched, eval mode, OOM-safe.

The loop's held-out check, the final table and the evaluation suites all measure through these, so they sit below
the loop and import nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from regdefense.attacks.adapter import model_mode
from regdefense.base.errors import UserError, first_line

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _oom_safe(fn: Callable[[int], Any], batch_size: int) -> Any:
    """Call ``fn(batch_size)``, halving the batch size on CUDA out-of-memory (automatic batch size)."""
    while True:
        try:
            return fn(batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            batch_size //= 2


def logits_of(model: nn.Module, x: Tensor, *, batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """The model's logits (on the CPU) for ``x``, batched, in eval mode, without gradients."""

    def run(bs: int) -> Tensor:
        out = []
        with torch.no_grad(), model_mode(model, False):
            for i in range(0, len(x), bs):
                out.append(model(x[i : i + bs].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    return _oom_safe(run, batch_size)


#: what torch says when an attack differentiates an output that does not depend differentiably on the input
_NO_GRAD = ("does not require grad", "appears to not have been used in the graph", "does not have a grad_fn")


def batch_seed(seed: int, first: int) -> int:
    """The seed of the batch starting at point ``first`` of an evaluation seeded ``seed``."""
    return seed * 1_000_003 + first


class NoInputGradient(UserError):
    """A gradient-based attack found no path from the model's output back to its input (a detached forward)."""


@dataclass
class ThreatModel:
    """The ε-ball (and the [0, 1] box) adversarial examples must lie in. :meth:`enforce` projects a batch onto it
    and counts what had to move: an attack from any library that returns points outside the threat model would
    otherwise be counted as a success it is not allowed."""

    eps: float
    norm: str = "linf"
    project: bool = True  #: False: count the points outside (an unbounded attack), leave them where they are
    tol: float = 1e-5  #: float slack (APGD and friends land within ~1e-7 of the boundary)
    outside: int = 0  #: points found outside the ball or the box
    worst: float = 0.0  #: the largest distance found, in the threat norm

    def describe(self, n: int) -> str:
        """What happened, for the report."""
        where = (
            f"{self.outside} of {n} adversarial examples lay outside the {self.norm} ball of ε = {self.eps:.4g} "
            f"or the [0, 1] box (up to {self.worst:.3g})"
        )
        if self.project:
            return where + "; they were projected onto it before being measured"
        return where + "; the attack is unbounded, so its accuracy is not an ε-ball number"

    def distance(self, adv: Tensor, x: Tensor) -> Tensor:
        d = (adv - x).flatten(1)
        return d.abs().amax(1) if self.norm == "linf" else d.norm(dim=1)

    def enforce(self, adv: Tensor, x: Tensor) -> Tensor:
        dist = self.distance(adv.float(), x.float())
        bad = (
            (dist > self.eps + self.tol)
            | (adv.flatten(1).amin(1) < -self.tol)
            | (adv.flatten(1).amax(1) > 1 + self.tol)
        )
        if not bool(bad.any()):
            return adv
        self.outside += int(bad.sum())
        self.worst = max(self.worst, float(dist.max()))
        if not self.project:
            return adv
        delta = adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            scale = (self.eps / dist.clamp_min(1e-12)).clamp(max=1.0)
            delta = delta * scale.view(-1, *[1] * (adv.dim() - 1))
        projected = (x + delta).clamp(0, 1)
        return torch.where(bad.view(-1, *[1] * (adv.dim() - 1)), projected, adv)


def attack_points(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack,
    *,
    measure: nn.Module | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Any = None,
    slot: Any = None,
    seed: int | None = None,
    first_index: int = 0,
    threat: ThreatModel | None = None,
) -> tuple[Tensor, Tensor]:
    """Adversarial versions of ``x`` and, per point, whether ``measure`` (default: ``model``) still classifies them
    correctly; both on the CPU, computed batch by batch.

    :param measure: the model whose predictions count (an attack run on a BPDA view is measured on the real model).
    :param slot: a :class:`regdefense.evaluation.resume.Slot`: its finished points are reused, each new batch is added
        to it.
    :param seed: seed each batch with ``seed`` and its first index (``first_index`` + its position), so a resumed or
        chunked run draws what a whole one draws.
    :param threat: project every adversarial example onto this threat model before it is measured, counting the
        ones that had to move (``threat.outside``).
    :raises NoInputGradient: the attack needed an input gradient the model does not have.
    """
    measure = model if measure is None else measure

    def run(bs: int) -> tuple[Tensor, Tensor]:
        advs, oks, start = [], [], 0
        prev = slot.restored(x) if slot is not None else None
        if prev is not None:
            advs, oks, start = [prev[0]], [prev[1]], slot.done
            if progress is not None:
                progress.update(start)
        for i in range(start, len(x), bs):
            if seed is not None:
                torch.manual_seed(batch_seed(seed, first_index + i))
            xb, yb = x[i : i + bs].to(device), y[i : i + bs].to(device)
            try:
                adv = attack(model, xb, yb).detach()
            except RuntimeError as exc:
                if any(m in str(exc) for m in _NO_GRAD):
                    raise NoInputGradient(
                        f"no input gradient: the model's output does not depend differentiably on "
                        f"its input ({first_line(exc, 120)})"
                    ) from None
                raise
            if threat is not None:
                adv = threat.enforce(adv, xb)
            with torch.no_grad(), model_mode(measure, False):
                ok = (measure(adv).argmax(1) == yb).cpu()
            advs.append(adv.cpu())
            oks.append(ok)
            if slot is not None:
                slot.add(x[i : i + bs], adv, ok)
            if progress is not None:
                progress.update(len(yb))
        if not advs:
            return x.clone(), torch.zeros(0, dtype=torch.bool)
        return torch.cat(advs), torch.cat(oks)

    return _oom_safe(run, batch_size)


def attack_all(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Any = None,
) -> Tensor:
    """Adversarial versions of ``x`` (on the CPU), batched."""
    return attack_points(model, x, y, attack, batch_size=batch_size, device=device, progress=progress)[0]


def correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Per-sample correctness (bool, on the CPU) of ``model`` on ``x`` or on ``attack(model, x, y)``."""
    if attack is not None:
        return attack_points(model, x, y.cpu(), attack, batch_size=batch_size, device=device)[1]
    return logits_of(model, x, batch_size=batch_size, device=device).argmax(1) == y.cpu()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None = None, **kw) -> float:
    """Fraction of samples classified correctly (under ``attack`` if given)."""
    c = correct(model, x, y, attack, **kw)
    return float(c.float().mean()) if len(c) else float("nan")
