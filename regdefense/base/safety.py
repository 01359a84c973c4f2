"""What keeps a long run safe: non-finite loss detection and clean interruption by SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from regdefense.base.errors import UserError


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


def _status(signum: int | None) -> int:
    return 128 + int(signum) if signum is not None else 130


class Interrupted(KeyboardInterrupt):
    """Stopped at once by a signal (an evaluation, or a second signal during training), after saving what can be
    resumed. A KeyboardInterrupt, so that no ``except Exception`` on the way (a check runner, a defense's hook)
    swallows it; the CLI prints its message and exits 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = _status(signum)


class TrainingInterrupted(UserError):
    """The run was stopped by a signal after writing a checkpoint; the message says how to resume. Exit status as
    :class:`Interrupted`'s."""

    exit_code = 130

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = _status(signum)


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

    def __init__(self, echo, task: str = "finishing this step, then writing a checkpoint") -> None:
        self.signum: int | None = None
        self.echo = echo
        self.task = task
        self.inside: list[str] = []  #: the plugin hooks running now, outermost first (see :meth:`watch`)

    def running(self) -> str:
        """The innermost hook running now and the defenses implementing it, or "" between hooks."""
        return self.inside[-1] if self.inside else ""

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        where = f" (now inside {self.running()})" if self.inside else ""
        if self.signum is not None:
            raise Interrupted(
                f"{name} again: stopped at once{where}, without a checkpoint; "
                + ("a hook that does not return is a bug of that defense" if where else "nothing more was saved"),
                signum,
            )
        self.signum = signum
        self.echo(f"{name}: {self.task}{where} (send it again to stop at once, without one)")

    def watch(self, pm) -> Callable[[], None]:
        """Keep track of the plugin hook running (pluggy's call monitoring), so that a signal names it; returns the
        function that stops watching."""

        def before(hook_name, impls, _kwargs) -> None:
            names = ", ".join(dict.fromkeys(i.plugin_name for i in impls if i.plugin_name != "core"))
            self.inside.append(f"{hook_name}" + (f" of {names}" if names else ""))

        def after(_outcome, _hook_name, _impls, _kwargs) -> None:
            if self.inside:
                self.inside.pop()

        return pm.add_hookcall_monitoring(before, after)

    @contextmanager
    def installed(self, pm=None):
        """Handle the signals while training (main thread only: elsewhere signals cannot be caught); with ``pm``,
        the signal's message names the plugin hook running."""
        undo = self.watch(pm) if pm is not None else None
        if threading.current_thread() is not threading.main_thread():
            try:
                yield self
            finally:
                if undo is not None:
                    undo()
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            if undo is not None:
                undo()

    def requested(self, dist, global_step: int, every: int = 20) -> bool:
        """Whether to stop now; under torch.distributed the processes agree every ``every`` steps."""
        if not dist.enabled:
            return self.signum is not None
        if global_step % every:
            return False
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        return bool(dist.sum_(flag.to(dist.device)).item() > 0)
