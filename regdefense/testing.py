"""Pytest helpers for plugin authors (opt-in: ``pytest_plugins = ["regdefense.testing"]``).

* :func:`make_trainer` / fixture ``tiny_trainer``: a CPU trainer on a small slice of the embedded
  digits, with a small PGD so a test step takes milliseconds.
* :class:`HookRecorder` / fixture ``hook_calls``: records which hooks ran, in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from regdefense.config import RunConfig
from regdefense.parts import load_config
from regdefense.plugins import activate
from regdefense.trainer import Trainer

TINY = [
    "train.epochs=1",
    "train.batch_size=64",
    "train.progress=false",
    "train.device=cpu",
    "data.limit=192",
    "eval.pgd_steps=2",
    "eval.val_samples=64",
    "eval.test_samples=64",
]


def tiny_config(stack: list[Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig for ``stack`` (names) on 192 digits, one epoch, CPU; ``overrides`` as for ``-o``."""
    names = [s for s in (stack if stack is not None else ["pgd_at"]) if isinstance(s, str)]
    return load_config(defenses=names, overrides=TINY + list(overrides or []))


def make_trainer(
    stack: list[Any] | None = None, overrides: list[str] | None = None, run_dir: str | Path | None = None, **kwargs
):
    """A Trainer for ``stack`` (defense names or plugin objects) on the tiny digits config."""
    stack = stack if stack is not None else ["pgd_at"]
    cfg = tiny_config(stack, overrides)
    pm = activate(stack, cfg.defense)
    return Trainer(cfg, pm=pm, run_dir=run_dir, **kwargs)


class HookRecorder:
    """Record hook calls of a plugin manager: ``recorder.names`` lists hook names in call order."""

    def __init__(self, pm) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._undo = pm.add_hookcall_monitoring(self._before, lambda *a: None)

    def _before(self, hook_name: str, hook_impls, kwargs) -> None:
        self.calls.append((hook_name, kwargs))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def close(self) -> None:
        self._undo()


@pytest.fixture
def tiny_trainer():
    """Factory fixture: ``tiny_trainer(stack, overrides)`` → Trainer."""
    return make_trainer


@pytest.fixture
def hook_calls():
    """Factory fixture: ``hook_calls(trainer.pm)`` → HookRecorder (closed after the test)."""
    recorders: list[HookRecorder] = []

    def attach(pm) -> HookRecorder:
        rec = HookRecorder(pm)
        recorders.append(rec)
        return rec

    yield attach
    for rec in recorders:
        rec.close()
