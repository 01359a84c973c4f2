"""What a hook may use of the object it gets as ``trainer=``: the typed host interface.

Two protocols, so that neither the hook specifications nor the plugins depend on the loop's class:

- :class:`Host` — the run's parts: config, data, device, the networks, the threat budget, the plugin manager, and the
  helpers every defense calls (``ce``, ``ramp``, ``attack_autocast``, ``build_network``).
  :class:`regdefense.training.assembly.
  Assembly` implements it; evaluation rebuilds a trained stack from a checkpoint with an ``Assembly`` and calls the
  hooks that build the evaluated model (``add_modules``, ``fit_start`` of the defenses that own
  ``eval_model``, ``eval_model``) with it, and nothing more.
- :class:`TrainingHost` — a :class:`Host` that is training: the loop's state, the per-sample loss helpers, the
  backward pass, the loader and the run folder. :class:`regdefense.training.loop.Trainer` implements it; every hook of
  the
  training loop gets one.

The docs of each hook (:mod:`regdefense.host.hookspecs`) name which it gets. Checking is structural
(``typing.Protocol``):
mypy checks the built-in plugins against these, and ``tests/test_host.py`` checks that the two classes implement them
at run time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pluggy
    import torch
    from torch import Tensor, nn

    from regdefense.base.config import RunConfig
    from regdefense.data.sources import Data
    from regdefense.host.step import Step


@runtime_checkable
class Host(Protocol):
    """The run's parts, as every hook may use them (``trainer.X`` in a defense)."""

    config: RunConfig
    data: Data
    device: torch.device
    dist: Any  #: :class:`regdefense.base.distributed.Dist`: rank, world size, ``is_main``
    pm: pluggy.PluginManager
    hook: Any  #: ``pm.hook``: call other hooks
    raw_model: nn.Module  #: the network, unwrapped (no DDP, no torch.compile)
    model: nn.Module  #: the network the loop calls (wrapped under DDP / compile)
    modules: dict[str, nn.Module]  #: extra networks from ``regdefense_add_modules``
    eps_full: float  #: the threat ε at the end of any warm-up
    norm: Literal["linf", "l2"]
    state: Any  #: the loop's state; at evaluation's rebuild only ``state.epoch``

    @property
    def eps(self) -> float:
        """The run's current ε (ramped by the warm-up)."""
        ...

    def ramp(self, value: float) -> float:
        """``value`` scaled by the warm-up's current factor."""
        ...

    def echo(self, message: str) -> None: ...

    def ce(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy with the run's label smoothing, on hard or soft targets."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def attack_autocast(self) -> contextlib.AbstractContextManager: ...

    def build_network(self, arch: str) -> nn.Module:
        """A second network of the run's data shape (a proxy, a guide)."""
        ...


@runtime_checkable
class TrainingHost(Host, Protocol):
    """A :class:`Host` in the training loop: what the loop's hooks get."""

    run_dir: Path | None
    optimizer: Any  #: built by the host from ``[train]``
    scheduler: Any
    scaler: Any  #: the gradient scaler (AMP)
    should_stop: bool  #: set to True in ``regdefense_epoch_end`` to end training
    train_size: int  #: training samples (``step.index`` ranges further with extra data)
    metrics_log: Any
    train_loader: Any

    @property
    def steps_per_epoch(self) -> int: ...

    def adv_mean(self, per_sample: Tensor, step: Step, adv_logits: Tensor) -> Tensor:
        """The mean of a per-sample adversarial loss under the stack's sample weights."""
        ...

    def loss_terms(self, step: Step, model: nn.Module, phase: str = "train") -> dict[str, Tensor]: ...

    def backward(self, loss: Tensor) -> None: ...
