"""What keeps a long run safe: non-finite loss detection and clean interruption by SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from regdefense.errors import UserError


def write_error_log(run_dir: str | Path, exc: BaseException) -> str:
    """``RUN_DIR/error.log``: the failure's message first, then its whole traceback (the defense's frames included).
    Returns where it went, or why it could not be written (the error itself still reaches the user)."""
    path = Path(run_dir) / "error.log"
    try:
        path.write_text(f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exception(exc)))
    except OSError:
        return "not saved (the run directory is not writable)"
    return str(path)


class NonFiniteLoss(UserError):
    """A loss term became NaN or infinite."""


class TrainingInterrupted(UserError):
    """The run was stopped by a signal after writing a checkpoint; the message says how to resume."""

    exit_code = 130


class NonFiniteGuard:
    """Finds the first batch whose loss terms are not finite, without a host sync per step.

    ``record`` keeps on the device, per loss term, the first global step at which it was not finite;
    ``check`` (every ``every`` steps and at each epoch's end) reads them once and raises
    :class:`NonFiniteLoss` naming the first bad step and its terms. In ``skip`` mode the loop asks
    :meth:`bad_now` before each optimizer step instead (one sync per step: the price of deciding before
    the update).
    """

    def __init__(self, mode: str = "stop", every: int = 50) -> None:
        self.mode, self.every = mode, every
        self.first: dict[str, Tensor] = {}  # term -> first bad global step, -1 while none
        self.where: dict[int, tuple[int, int]] = {}  # global step -> (epoch, batch), for the message
        self.skipped = 0  # batches skipped in skip mode, over the run
        self.streak = 0  # ... in a row, up to now

    def bad_now(self, losses: dict[str, Tensor], dist) -> bool:
        bad = torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()]).any().float()
        return bool(dist.sum_(bad.reshape(1)).item() > 0)  # every process skips the same batches

    def record(self, losses: dict[str, Tensor], global_step: int, epoch: int, batch: int) -> None:
        for name, value in losses.items():
            first = self.first.get(name)
            if first is None:
                first = self.first[name] = torch.full((), -1, dtype=torch.long, device=value.device)
            bad = (first < 0) & ~torch.isfinite(value.detach()).all()
            self.first[name] = torch.where(bad, torch.full_like(first, global_step), first)
        self.where[global_step] = (epoch, batch)
        if len(self.where) > 4 * self.every:
            self.where = dict(list(self.where.items())[-2 * self.every :])

    def check(self, last_good: str) -> None:
        if not self.first:
            return
        names = list(self.first)
        steps = torch.stack([self.first[n] for n in names]).tolist()  # the one host read
        bad = [s for s in steps if s >= 0]
        if not bad:
            self.where.clear()
            return
        first = min(bad)
        epoch, batch = self.where.get(first, (-1, -1))
        terms = [n for n, s in zip(names, steps) if s == first]
        raise NonFiniteLoss(
            f"loss term(s) {', '.join(terms)} became NaN or infinite at epoch {epoch + 1}, batch {batch + 1} "
            f"(step {first + 1}); last good checkpoint: {last_good}. Lower train.lr, set train.grad_clip, check "
            f"the data, or set train.nonfinite=skip to skip such batches"
        )


class Interrupt:
    """SIGINT/SIGTERM set a flag the loop reads after each step; a second signal aborts at once."""

    def __init__(self, echo) -> None:
        self.signum: int | None = None
        self.echo = echo

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.echo(
            f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
            f"(send it again to stop at once, without one)"
        )

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
