"""What keeps a long run safe: non-finite loss detection and clean interruption by SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch
from torch import Tensor

from regdefense.errors import UserError


class NonFiniteLoss(UserError):
    """A loss term became NaN or infinite."""


class TrainingInterrupted(UserError):
    """The run was stopped by a signal after writing a checkpoint; the message says how to resume."""

    exit_code = 130


class NonFiniteGuard:
    """Finds the first batch whose loss terms are not finite, without a host sync per step.

    ``record`` keeps, on the device, the global step and the per-term finiteness of the first bad
    batch; ``check`` (every ``every`` steps and at each epoch's end) reads it once and raises
    :class:`NonFiniteLoss`. In ``skip`` mode the loop asks :meth:`bad_now` before each optimizer step
    instead (one sync per step: the price of deciding before the update).
    """

    def __init__(self, mode: str = "stop", every: int = 50) -> None:
        self.mode, self.every = mode, every
        self.first: Tensor | None = None  # global step of the first bad batch, -1 while none
        self.terms: Tensor | None = None  # finiteness of each term at that batch
        self.names: list[str] = []
        self.where: dict[int, tuple[int, int]] = {}  # global step -> (epoch, batch), for the message
        self.skipped = 0

    @staticmethod
    def finite(losses: dict[str, Tensor]) -> Tensor:
        return torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])

    def bad_now(self, losses: dict[str, Tensor], dist) -> bool:
        bad = (~self.finite(losses)).any().float()
        return bool(dist.sum_(bad.reshape(1)).item() > 0)  # every process skips the same batches

    def record(self, losses: dict[str, Tensor], global_step: int, epoch: int, batch: int) -> None:
        ok = self.finite(losses)
        if self.first is None or list(losses) != self.names:
            self.names = list(losses)
            self.first = torch.full((), -1, dtype=torch.long, device=ok.device)
            self.terms = torch.ones_like(ok)
        new = (self.first < 0) & ~ok.all()
        self.first = torch.where(new, torch.full_like(self.first, global_step), self.first)
        self.terms = torch.where(new, ok, self.terms)
        self.where[global_step] = (epoch, batch)
        if len(self.where) > 4 * self.every:
            self.where = dict(list(self.where.items())[-2 * self.every:])

    def check(self, last_good: str) -> None:
        if self.first is None:
            return
        first = int(self.first)
        if first < 0:
            self.where.clear()
            return
        epoch, batch = self.where.get(first, (-1, -1))
        terms = [n for n, ok in zip(self.names, self.terms.tolist()) if not ok]
        raise NonFiniteLoss(
            f"loss term(s) {', '.join(terms)} became NaN or infinite at epoch {epoch + 1}, batch {batch + 1} "
            f"(step {first + 1}); last good checkpoint: {last_good}. Lower train.lr, set train.grad_clip, check "
            f"the data, or set train.nonfinite=skip to skip such batches")


class Interrupt:
    """SIGINT/SIGTERM set a flag the loop reads after each step; a second signal aborts at once."""

    def __init__(self, echo) -> None:
        self.signum: int | None = None
        self.echo = echo

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.echo(f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                  f"(send it again to stop at once, without one)")

    @contextmanager
    def installed(self):
        """Handle the signals while training (main thread only: elsewhere signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def requested(self, dist, global_step: int, every: int = 20) -> bool:
        """Whether to stop now; under torch.distributed the processes agree every ``every`` steps."""
        if not dist.enabled:
            return self.signum is not None
        if global_step % every:
            return False
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        return bool(dist.sum_(flag.to(dist.device)).item() > 0)
