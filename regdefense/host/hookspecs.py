"""Every hook of the regdefense training loop, and nothing else.

The loop (:meth:`regdefense.training.loop.Trainer.fit`) calls them in this order::

    regdefense_add_modules            once, before the optimizer is built
    regdefense_fit_start              once, everything on its device
    for each epoch:
        regdefense_epoch_start
        for each batch (x, y, index):
            regdefense_batch_start
            regdefense_make_adversarial          exclusive provider
            regdefense_forward_backward          exclusive provider (core default); wrappers around it
                -> regdefense_compute_loss       exclusive provider; wrappers edit the terms
            regdefense_before_optimizer_step     gradients unscaled and clipped
            (optimizer step)
            regdefense_batch_end
        regdefense_eval_model                    what the held-out evaluation sees
        regdefense_epoch_end
    regdefense_fit_end

*Exclusive* hooks (:data:`EXCLUSIVE`) may be implemented (as a plain, non-wrapper impl) by at most
one active defense besides ``core``; activating two raises a :class:`~regdefense.base.errors.PluginError`
naming both. An implementation marked ``trylast=True`` is a *fallback*: it answers only when no regular
provider is active (``core``'s defaults are fallbacks too). Implementations may accept any subset of a
hook's arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # imports for annotations only, so this module stays cheap to import
    from torch import Tensor, nn

    from regdefense.host.interface import Host, TrainingHost
    from regdefense.host.step import Step

hookspec = pluggy.HookspecMarker("regdefense")
#: marker for hook implementations (re-exported as ``regdefense.hookimpl``, where plugins import it)
hookimpl = pluggy.HookimplMarker("regdefense")

#: hooks with one provider per run (``core`` and wrappers aside)
EXCLUSIVE = (
    "regdefense_make_adversarial",
    "regdefense_compute_loss",
    "regdefense_forward_backward",
    "regdefense_eval_model",
)


# --- set-up -----------------------------------------------------------------------------------


@hookspec
def regdefense_add_modules(trainer: Host) -> dict[str, nn.Module] | None:
    """Add extra networks to the run (a DYNAT guide, an AToP purifier, a discriminator).

    Called once, after the model is built and before it and the optimizer are moved or built.

    :param trainer: the trainer; ``trainer.model`` exists, not yet on its device.
    :return: ``{name: module}`` or ``None``. The host moves each module to the device, adds its
        parameters that require gradients to the main optimizer, saves and restores it with every
        checkpoint, and exposes it as ``trainer.modules[name]``. Freeze a module's parameters
        (``requires_grad_(False)``) to keep it out of the optimizer. Results of all active defenses
        are collected; a name given twice is an error.

    Since 0.1.
    """


@hookspec
def regdefense_fit_start(trainer: Host) -> None:
    """Prepare for training: build proxies, per-sample buffers, attack objects.

    Called once, after the model, extra modules and optimizer are on ``trainer.device`` and
    before the first epoch (also when a run resumes; ``load_state_dict`` runs after this hook).
    Evaluation also calls it, when it rebuilds a stack from a checkpoint, on the defenses that
    provide ``regdefense_eval_model`` (EMA, AToP) only, with a :class:`~regdefense.host.interface.Host`: the
    run's parts without optimizer, loader or run folder — which is why it is typed ``Host``.

    :param trainer: the trainer; ``trainer.train_size`` is the number of training samples and
        ``trainer.index_size`` the range of ``step.index`` (larger with ``data.extra``: extra sample
        ``k`` is ``train_size + k``), so buffers indexed by sample can be allocated here.
    :return: ignored.

    Since 0.1.
    """


@hookspec(firstresult=True)
def regdefense_batch_replays(trainer: TrainingHost) -> int | None:
    """How many times the loop trains on each batch before it takes the next (Free-AT's minibatch replay m).

    Asked once, when the trainer is built. Each replay is a whole step on the same batch — ``batch_start``,
    ``make_adversarial``, ``forward_backward``, the optimizer step, ``batch_end`` — with a fresh
    :class:`~regdefense.host.step.Step`, so a defense can carry state from one replay to the next (Free-AT's
    perturbation).
    Optimizer and per-iteration schedule steps count every replay (an epoch is ``m × batches`` steps); an epoch is
    still one pass over the data, so a run of ``E`` epochs makes ``m·E`` passes' worth of updates (Free-AT divides
    its epochs by ``m``). A checkpoint is written between batches, never between replays; gradient accumulation
    (``train.accumulate``) does not combine with replays.

    :param trainer: the trainer (its model built; the optimizer and schedule not yet).
    :return: ``m`` ≥ 1, or ``None`` (once). The first implementation that answers decides.

    Since 0.2.
    """


# --- per epoch --------------------------------------------------------------------------------


@hookspec
def regdefense_epoch_start(trainer: TrainingHost, epoch: int) -> None:
    """Start of an epoch: ε ramps, warm-up switches, buffer resets.

    Not called again for an epoch resumed mid-way (after Ctrl-C): keep what it sets in the plugin's
    ``state_dict()`` so the checkpoint carries it.

    :param trainer: the trainer (model in train mode).
    :param epoch: the 0-based epoch about to run.
    :return: ignored.

    Since 0.1.
    """


# --- per batch --------------------------------------------------------------------------------


@hookspec
def regdefense_batch_start(trainer: TrainingHost, step: Step) -> None:
    """A batch is on the device; mutate ``step`` before the adversary runs.

    Dynamic-label defenses set ``step.targets`` here; ``step.labels`` must stay the truth.

    :param trainer: the trainer.
    :param step: the batch (``inputs``, ``labels``, ``targets``, ``index``).
    :return: ignored.

    Since 0.1.
    """


@hookspec(firstresult=True)
def regdefense_make_adversarial(
    trainer: TrainingHost, step: Step, model: nn.Module
) -> Tensor | dict[str, Tensor] | None:
    """Run the inner maximisation and return the adversarial inputs.

    Exclusive: at most one active defense may provide it. The ``core`` default returns the clean
    inputs (plain training).

    :param trainer: the trainer; ``trainer.eps`` is the run's current ε (after any warm-up ramp).
    :param step: the batch; ``step.targets`` are the labels the attack should use unless the
        defense has its own reason not to.
    :param model: the network to attack (``trainer.model``).
    :return: a tensor shaped like ``step.inputs`` in [0, 1] (detached), or ``{name: tensor}`` for
        defenses that train on several adversarial batches. The host stores it in
        ``step.adv_inputs``. First non-``None`` result wins.

    Since 0.1.
    """


@hookspec(firstresult=True)
def regdefense_forward_backward(trainer: TrainingHost, step: Step) -> Tensor | None:
    """Compute the loss and back-propagate it.

    Exclusive; the ``core`` default calls :meth:`Trainer.loss_terms` (which calls
    ``regdefense_compute_loss``) under ``trainer.autocast()``, stores the terms in
    ``step.losses`` and calls ``trainer.backward`` on their sum. Wrappers (``wrapper=True``) run
    around it: AWP perturbs the weights before ``yield`` and restores them after.

    :param trainer: the trainer; gradients were zeroed just before.
    :param step: the batch, ``step.adv_inputs`` set.
    :return: the summed loss (detached) or ``None``. First non-``None`` result wins.

    Since 0.1.
    """


@hookspec(firstresult=True)
def regdefense_compute_loss(
    trainer: TrainingHost, step: Step, model: nn.Module, phase: str
) -> dict[str, Tensor] | None:
    """Return the named loss terms of this batch; the host sums them.

    Exclusive: at most one active defense provides the objective; the ``core`` default is
    cross-entropy of ``model(step.adv_inputs)`` against ``step.targets``. Defenses that add a
    regulariser or change the labels implement it as a wrapper (``wrapper=True``): they ``yield``
    to get the terms, then add, scale or replace entries and return the dict.

    :param trainer: the trainer.
    :param step: the batch, ``step.adv_inputs`` set.
    :param model: the network to evaluate: ``trainer.model``, or e.g. AWP's proxy copy.
    :param phase: ``"train"`` for the real update, ``"awp"`` when a weight perturbation probes
        the objective; wrappers that must not act in a probe check it.
    :return: ``{term: scalar tensor}``. Key ``"task"`` is the supervised term that
        label-changing defenses replace. Called inside ``trainer.autocast()``. First non-``None``
        result wins.

    Since 0.1.
    """


@hookspec
def regdefense_before_optimizer_step(trainer: TrainingHost, step: Step) -> None:
    """Gradients are final (unscaled and clipped); the optimizer step comes next.

    :param trainer: the trainer.
    :param step: the batch; ``step.losses`` holds the terms just back-propagated.
    :return: ignored.

    Since 0.1.
    """


@hookspec
def regdefense_batch_end(trainer: TrainingHost, step: Step) -> None:
    """After the optimizer step: EMA updates, prior-buffer writes, per-sample statistics.

    :param trainer: the trainer; ``trainer.state.global_step`` not yet incremented.
    :param step: the batch.
    :return: ignored.

    Since 0.1.
    """


# --- evaluation and the end -------------------------------------------------------------------


@hookspec(firstresult=True)
def regdefense_eval_model(trainer: Host) -> nn.Module | None:
    """Return the network that evaluation should measure.

    Exclusive; the ``core`` default is ``trainer.model``. An EMA defense returns its averaged copy,
    a purifier defense the composed purifier-then-classifier module. Also used for the final
    table, the ``best`` checkpoint's metric and export.

    :param trainer: the trainer.
    :return: a module mapping [0, 1] inputs to logits. First non-``None`` result wins.

    Since 0.1.
    """


@hookspec
def regdefense_epoch_end(trainer: TrainingHost, epoch: int, metrics: dict[str, Any]) -> None:
    """After the held-out evaluation of an epoch: schedules, logging, early stopping.

    :param trainer: the trainer; set ``trainer.should_stop = True`` to end training after this epoch.
    :param epoch: the 0-based epoch just finished.
    :param metrics: this epoch's metrics (train loss terms, ``val_clean``, ``val_robust``, ...);
        add entries to have them logged to ``metrics.jsonl``.
    :return: ignored.

    Since 0.1.
    """


@hookspec
def regdefense_fit_end(trainer: TrainingHost) -> None:
    """Training is over (normally or after ``should_stop``): clean up.

    :param trainer: the trainer.
    :return: ignored.

    Since 0.1.
    """


# --- experiment trackers -----------------------------------------------------------------------


@hookspec
def regdefense_log_metrics(trainer: TrainingHost, epoch: int, metrics: dict[str, Any]) -> None:
    """An epoch's metrics, final: what ``metrics.jsonl`` receives, after every ``regdefense_epoch_end``.

    For experiment trackers (TensorBoard, W&B, MLflow, a third party's); a defense that wants to add a
    value uses ``regdefense_epoch_end``. Called on the main process only.

    :param trainer: the trainer.
    :param epoch: the 1-based epoch (``metrics["epoch"]``), the step to log at.
    :param metrics: loss terms (``loss_*``), ``loss``, ``eps``, ``lr``, ``epoch_seconds``, held-out
        ``val_clean``/``val_robust`` and whatever defenses added; do not modify.
    :return: ignored.

    Since 0.1.
    """


@hookspec
def regdefense_log_summary(trainer: TrainingHost, summary: dict[str, Any], files: dict[str, Path]) -> None:
    """The run is over and measured: the final table, the cost and the plots; trackers finish here.

    Called once by :func:`regdefense.training.run.train` after ``summary.json`` is written (main process only).
    A run that fails before this point closes its trackers without it.

    :param trainer: the trainer.
    :param summary: what ``summary.json`` holds: ``table`` (clean and PGD accuracy of the last and best
        epochs), ``cost``, ``stack``, ``dataset``, ``epochs``, ``wall_seconds``.
    :param files: ``{"curves": RUN/curves.png, "summary": RUN/summary.json, "metrics": RUN/metrics.jsonl}``
        (those that exist).
    :return: ignored.

    Since 0.1.
    """
