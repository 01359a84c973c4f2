"""Pytest helpers for plugin authors (opt-in: ``pytest_plugins = ["regdefense.testing"]``).

* :func:`make_trainer` / fixture ``tiny_trainer``: a CPU trainer on a small slice of the embedded
  digits, with a small PGD so a test step takes milliseconds.
* :class:`HookRecorder` / fixture ``hook_calls``: records which hooks ran, in order.
* :func:`skew_bn` / :func:`bn_trainer`: the same trainer on ``digits_cnn_bn`` with BatchNorm running statistics that
  no batch has, so a conformance test sees the model mode (eval and train forwards differ); :func:`far_apart`
  for the negative (mode-flipped) case of such a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from regdefense.base.config import RunConfig
from regdefense.host.discovery import activate
from regdefense.training.assembly import load_config
from regdefense.training.loop import Trainer

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


#: the BatchNorm twin of the tiny config's ``digits_cnn``
BN_MODEL = ["model.name=digits_cnn_bn"]


def skew_bn(*nets: nn.Module, seed: int = 3) -> None:
    """Give every BatchNorm layer of ``nets`` running statistics that no batch has (mean 0.5·N(0, 1), variance
    uniform in 0.5–2.5, from a generator seeded by ``seed``, in module order): an eval-mode forward then differs from
    a train-mode one, so a test that compares with a reference run in one mode fails when the code uses the other."""
    g = torch.Generator().manual_seed(seed)
    for net in nets:
        for m in net.modules():
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and mean is not None and var is not None:
                mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
                var.copy_(0.5 + 2 * torch.rand(m.num_features, generator=g))


def bn_trainer(stack: list[Any] | None = None, overrides: list[str] | None = None, **kwargs):
    """:func:`make_trainer` on ``digits_cnn_bn`` (``overrides`` may name another model, and guides such as
    ``dynat.guide=digits_cnn_bn``), with :func:`skew_bn` applied to the model, then to every added network."""
    trainer = make_trainer(stack, BN_MODEL + list(overrides or []), **kwargs)
    skew_bn(trainer.raw_model, *trainer.modules.values())
    return trainer


def far_apart(ours: torch.Tensor, ref: torch.Tensor, atol: float, frac: float = 0.01) -> bool:
    """For the negative case of a conformance test: at least ``frac`` of the entries (and at least one) differ by
    more than ``atol`` — a clear miss, not a rounding difference."""
    off = ((ours.detach().double() - ref.detach().double()).abs() > atol).double()
    return bool(off.sum() >= 1 and off.mean() >= frac)


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
