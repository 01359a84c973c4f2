"""The training loop, read top to bottom in :meth:`Trainer.fit`.

The parts (stack, device, data, model, extra networks) come from :class:`regdefense.training.assembly.Assembly`, which
evaluation
and the ART bridge build the same way; the loop's own services are small collaborators it holds —
:class:`~regdefense.training.services.Validator` (held-out clean/PGD and the catastrophic-overfitting guard),
:class:`~regdefense.training.services.Checkpointer` (payloads, ``last``/``best``/``epoch-N``, resume),
:class:`~regdefense.training.services.MetricsLog`
(``metrics.jsonl`` and the trackers' hook) and :class:`~regdefense.base.safety.Interrupt` (SIGINT/SIGTERM) — and the
defaults every stack falls back on are the ``core`` plugin (:mod:`regdefense.host.core`).
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regdefense.attacks.adapter import keep_modes
from regdefense.base.config import RunConfig, unreached
from regdefense.base.errors import ConfigError, UserError
from regdefense.base.runtime import resolve_device, seed_everything, versions
from regdefense.base.safety import (
    Interrupt,
    NonFiniteGuard,
    NonFiniteLoss,
    TrainingInterrupted,
    write_error_log,
)
from regdefense.data.sources import Data
from regdefense.host.discovery import adversarial_problem, answer_error, blame, loss_terms_problem
from regdefense.host.step import Step
from regdefense.training.assembly import Assembly
from regdefense.training.extra import load_extra
from regdefense.training.factories import (
    adopt_optimizer,
    build_optimizer,
    build_train_loader,
    peak_lr,
    place_train_split,
)
from regdefense.training.schedule import build_scheduler
from regdefense.training.services import Checkpointer, MetricsLog, Progress, Validator

__all__ = ["TrainState", "Trainer", "resolve_device", "seed_everything", "versions"]


def _returns_value(fn: Any) -> bool:
    """Whether a function's source has a ``return <value>`` (a wrapper without one hands back None); True when the
    source cannot be read (then it is not suspected)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return True
    return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(tree))


def _extra(config: RunConfig, data: Data, echo) -> Any:
    return load_extra(config.data, data.input_shape, data.num_classes, device=config.train.device, echo=echo)


@dataclass
class TrainState:
    epoch: int = 0  #: the next epoch to run
    global_step: int = 0
    batch: int = 0  #: the next batch of ``epoch`` (non-zero only in a checkpoint written mid-epoch)
    best_metric: float = -math.inf
    best_epoch: int = -1


@dataclass
class _Group:
    """The accumulation group being summed (``train.accumulate`` batches per update): samples so far on this
    process, whether a batch of it was non-finite, and its size on this process (each batch's share of the update)."""

    n: int = 0
    bad: bool = False
    size: int = 1


class Trainer(Assembly):
    """One run: a model, a defense stack (a pluggy manager), data, optimizer and schedule.

    Plugins reach everything through the trainer: ``model``, ``modules`` (extra networks),
    ``optimizer``, ``device``, ``data``, ``eps`` (the current, ramped ε) and ``norm``, ``state``,
    ``config``, ``autocast()``, ``backward()`` and ``loss_terms()``.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        pm=None,
        data: Data | None = None,
        model: nn.Module | None = None,
        run_dir: str | Path | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        loader: Any = None,
    ) -> None:
        """:param loader: batches ``(x, y, index)`` to train on instead of the data's training split (the ART
        bridge's DataGenerator); its ``size`` is the number of samples an epoch covers."""
        super().__init__(config, pm=pm, data=data, model=model, extra=_extra)
        t = config.train
        self.optimizer = (
            build_optimizer(self._trainable(), t)
            if optimizer is None
            else adopt_optimizer(optimizer, self._trainable())
        )
        self.data, on_device = place_train_split(self.data, config, self.device, mixed=self.extra is not None)
        self.train_loader = (
            loader
            if loader is not None
            else build_train_loader(self.data, self.extra, config, self.dist, self.device, on_device)
        )
        self.train_size = loader.size if loader is not None else len(self.data.train)
        #: size of step.index's range: original samples 0..N-1, then the extra ones (per-sample buffers need this many)
        self.index_size = self.train_size + (len(self.extra) if self.extra is not None else 0)
        #: images one epoch trains on (all processes): with data.extra, every batch is filled up with extra samples
        self.epoch_samples = (
            len(self.train_loader) * t.batch_size if self.extra is not None and loader is None else self.train_size
        )
        #: times each batch is trained on before the next (``regdefense_batch_replays``: Free-AT's m)
        self.replays = self._replays()
        self.scheduler = self._build_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.state = TrainState()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.should_stop = False
        self.guard = NonFiniteGuard(t.nonfinite)
        self._micro_weight = 1.0  #: this batch's share of an accumulation group (train.accumulate)
        self._lr = 0.0  #: the learning rate the last update used (the epoch's metrics report it)
        self.interrupt = Interrupt(self.echo)
        self.validator = Validator(self)
        self.checkpoints = Checkpointer(self)
        self.metrics_log = MetricsLog(self)
        self.progress = Progress(self)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every epoch's metrics so far (what ``metrics.jsonl`` holds)."""
        return self.metrics_log.history

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train. Per batch: batch_start → make_adversarial → forward_backward (→ compute_loss) →
        gradient all-reduce (torchrun) → unscale, clip → before_optimizer_step → optimizer step → batch_end;
        per epoch: epoch_start, the batches (each ``replays`` times in a row: ``regdefense_batch_replays``),
        eval_model + held-out check, epoch_end, checkpoint.

        A hook that raises stops the run with a :class:`PluginError` naming its defense; SIGINT/SIGTERM
        finish the step, write ``last.pt`` and raise :class:`TrainingInterrupted`.
        """
        with self.interrupt.installed(self.pm):
            try:
                return self._fit()
            except (TrainingInterrupted, KeyboardInterrupt):  # Interrupted is a KeyboardInterrupt
                raise
            except UserError as exc:  # refused (a defense's unusable result, NaN losses): why stays in error.log
                self._write_traceback(exc)
                raise
            except Exception as exc:  # a defense's bug: say which one, keep the traceback as the cause
                where = self._write_traceback(exc)
                culprit = blame(self.pm, exc)
                if culprit is None:
                    raise
                raise culprit.error(exc, self._last_good(), where) from exc

    def _fit(self) -> list[dict[str, Any]]:
        hook, t = self.hook, self.config.train
        for line in unreached(self.config):  # a burn-in, warm-up or period the run never reaches: say so first
            self.echo(f"warning: {line}")
        hook.regdefense_fit_start(trainer=self)
        sums: dict[str, Any] = {}
        if self.checkpoints.pending is not None:
            sums = self.checkpoints.restore(self.checkpoints.pending)
        self._lr = self.optimizer.param_groups[0]["lr"]
        group = _Group()
        for epoch in range(self.state.epoch, t.epochs):
            sums, started = self.train_epoch(epoch, sums, group)
            self.end_epoch(epoch, sums, started)
            if self.interrupt.requested(self.dist, 0) and self.state.epoch < t.epochs:
                self._stop_for_signal({})
            if self.should_stop:
                break
        hook.regdefense_fit_end(trainer=self)
        return self.history

    def train_epoch(self, epoch: int, sums: dict[str, Any], group: _Group) -> tuple[dict[str, Any], float]:
        """One pass over the training split, from ``state.batch`` when a run resumes mid-epoch (then ``sums`` holds
        the running loss sums so far): each batch a :meth:`train_step`, then the bookkeeping (``batch_end``, sums,
        counters, the periodic non-finite check, a signal at a group boundary). Returns the sums and the start time."""
        self.state.epoch, start = epoch, self.state.batch
        self.train_loader.set_epoch(epoch, start)
        if start == 0:
            self.hook.regdefense_epoch_start(trainer=self, epoch=epoch)
            sums = {}
        started = time.perf_counter()
        self.model.train()
        batches = self.progress.wrap(self.train_loader, epoch, start)
        n_batches = len(self.train_loader)
        for i, batch, final in self._replayed(batches, start):
            self._ramp_eps(epoch + i / n_batches)
            step = Step.from_batch(batch, self.device)
            skip, last = self.train_step(step, i, n_batches, group)
            if not skip:
                self.hook.regdefense_batch_end(trainer=self, step=step)
                self._accumulate(sums, step)
                self.progress.batch(sums)
            self.state.global_step += 1
            self.state.batch = i + 1
            if self.guard.every and self.state.global_step % self.guard.every == 0:
                self.guard.check(self._last_good())
            if (
                last
                and final
                and self.state.batch < n_batches
                and self.interrupt.requested(self.dist, self.state.global_step)
            ):
                self._stop_for_signal(sums)
        return sums, started

    def train_step(self, step: Step, i: int, n_batches: int, group: _Group) -> tuple[bool, bool]:
        """Batch ``i``: ``batch_start``, the adversary, ``forward_backward`` into the accumulation ``group`` (gradients
        of the group's earlier batches kept across the attack, which may write ``.grad``), the non-finite check, and
        on the group's last batch the update. Returns (this batch skipped as non-finite, the group ended here)."""
        acc = self.config.train.accumulate
        first, last = i % acc == 0, i % acc == acc - 1 or i == n_batches - 1
        self.hook.regdefense_batch_start(trainer=self, step=step)
        held = None if first else [p.grad for p in self._trainable()]  # an attack may write .grad
        step.adv_inputs = self._adversarial(step)
        if first:
            self.optimizer.zero_grad(set_to_none=True)
            group.n, group.bad, group.size = 0, False, self._group_size(i, n_batches)
        else:
            for p, g in zip(self._trainable(), held or []):
                p.grad = g
        self._micro_weight = step.batch_size / group.size if acc > 1 else 1.0
        self.hook.regdefense_forward_backward(trainer=self, step=step)
        group.n += step.batch_size
        skip = self._skip_nonfinite(step)  # train.nonfinite=skip and a NaN/Inf term: no update
        group.bad = group.bad or skip
        if last:
            self._update(step, group)
        return skip, last

    def _update(self, step: Step, group: _Group) -> None:
        """The accumulation group's update: gradients all-reduced across processes, then (unless a batch of the
        group was non-finite) unscale, clip, ``before_optimizer_step``, the optimizer step; a per-iteration
        schedule steps either way."""
        t = self.config.train
        self.dist.reduce_grads(self._trainable(), group.n)
        if not group.bad:
            self.scaler.unscale_(self.optimizer)
            if t.grad_clip:
                nn.utils.clip_grad_norm_(self._trainable(), t.grad_clip)
            self.hook.regdefense_before_optimizer_step(trainer=self, step=step)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self._lr = self.optimizer.param_groups[0]["lr"]
        if t.schedule_step == "iter":
            self.scheduler.step()

    def end_epoch(self, epoch: int, sums: dict[str, Any], started: float) -> None:
        """After the batches: the epoch schedule, buffers averaged and checked across processes, the epoch's
        metrics with the held-out check of the evaluated model, ``epoch_end``, the log and the checkpoints."""
        t = self.config.train
        self.state.batch = 0
        self.guard.check(self._last_good())
        if t.schedule_step == "epoch":
            self.scheduler.step()
        self.dist.average_buffers([self.raw_model, *self.modules.values()])
        self.dist.check_in_sync({"model": self.raw_model, **self.modules})
        metrics = self._train_metrics(epoch, sums, time.perf_counter() - started)
        metrics["lr"] = self._lr  # the rate the epoch's last batch used
        with keep_modes(self.raw_model, *self.modules.values()):  # an eval model may switch shared networks
            metrics.update(self.validator.validate(self.eval_model()))
        self.hook.regdefense_epoch_end(trainer=self, epoch=epoch, metrics=metrics)
        self.state.epoch = epoch + 1
        self.metrics_log.append(metrics)
        self.progress.epoch_end(metrics)
        self.save_checkpoints(metrics)

    def _group_size(self, i: int, n_batches: int) -> int:
        """This process's samples in the accumulation group starting at batch ``i`` (its slice of each batch)."""
        t, n, size = self.config.train, self.train_size, 0
        full = getattr(self.train_loader, "global_batch", None)
        for j in range(i, min(i + t.accumulate, n_batches)):
            g = full(j) if full else min(t.batch_size, n - j * t.batch_size)  # the global batch j
            size += g // self.dist.world + (self.dist.rank < g % self.dist.world)
        return size

    def _skip_nonfinite(self, step: Step) -> bool:
        """Record the step's loss terms for the non-finite check; in ``skip`` mode drop a bad batch's update."""
        if not step.losses:
            return False
        if self.config.train.nonfinite == "skip":
            if self.guard.bad_now(step.losses, self.dist):
                self.optimizer.zero_grad(set_to_none=True)
                self.guard.skipped += 1
                self.guard.streak += 1
                self.echo(
                    f"warning: skipped batch {self.state.batch + 1} of epoch {self.state.epoch + 1}: a loss "
                    f"term is NaN or infinite ({self.guard.skipped} skipped so far)"
                )
                if self.guard.streak >= self.guard.every:  # skipping is not recovering: say so, do not spin
                    raise NonFiniteLoss(
                        f"{self.guard.streak} batches in a row had NaN or infinite loss terms (up to "
                        f"epoch {self.state.epoch + 1}, batch {self.state.batch + 1}); skipping cannot "
                        f"recover. Last good checkpoint: {self._last_good()}. Lower train.lr or check the data"
                    )
                return True
            self.guard.streak = 0
            return False
        self.guard.record(step.losses, self.state.global_step, self.state.epoch, self.state.batch)
        return False

    def _stop_for_signal(self, sums: dict[str, Any]) -> None:
        """Write ``last.pt`` where the loop stands (mid-epoch if need be) and raise TrainingInterrupted."""
        self.guard.check(self._last_good())  # never checkpoint weights a NaN has reached
        where = (
            f"epoch {self.state.epoch + 1}, batch {self.state.batch}"
            if self.state.batch
            else f"the end of epoch {self.state.epoch}"
        )
        if self.run_dir is None:
            raise TrainingInterrupted(f"interrupted at {where}; no run directory, so nothing was saved")
        if self.dist.is_main:
            self.checkpoints.save_last(partial=sums)
        self.dist.barrier()
        launcher = "torchrun --nproc-per-node N -m regdefense" if self.dist.enabled else "regdefense"
        raise TrainingInterrupted(
            f"interrupted at {where}; checkpoint written to "
            f"{self.run_dir / 'checkpoints' / 'last.pt'}. Resume with: "
            f"{launcher} train --resume {self.run_dir}",
            signum=self.interrupt.signum,
        )

    def _write_traceback(self, exc: BaseException) -> str:
        """Keep the full traceback of a failure in ``RUN_DIR/error.log``; return where it went."""
        if self.run_dir is None or not self.dist.is_main:
            return "the exception's __cause__"
        return write_error_log(self.run_dir, exc)

    def _last_good(self) -> str:
        return self.checkpoints.last_finite()

    # --- services for plugins -----------------------------------------------------------------

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` through the gradient scaler (a pass-through unless fp16); with gradient
        accumulation, weighted by this batch's share of the accumulated group."""
        self.scaler.scale(loss * self._micro_weight if self._micro_weight != 1.0 else loss).backward()

    def adv_mean(self, per_sample: Tensor, step: Step, adv_logits: Tensor) -> Tensor:
        """Batch mean of a per-sample adversarial loss, reweighted by every registered weighter.

        Objectives call this for their adversarial term, so per-sample reweighting defenses (GAIRAT,
        MAIL) act on any objective: with weights ``w`` the result is ``Σ wᵢ·ℓᵢ / B``; the weights used
        are left in ``step.info["weights"]`` for logging and tests.
        """
        if not step.weighters:
            return per_sample.mean()
        w = torch.ones_like(per_sample)
        for fn in step.weighters:
            w = w * fn(step, adv_logits.detach()).to(per_sample.dtype)
        step.info["weights"] = w.detach()
        return (w * per_sample).sum() / per_sample.shape[0]

    def loss_terms(self, step: Step, model: nn.Module, phase: str = "train") -> dict[str, Tensor]:
        """The active objective's named terms for ``step`` on ``model`` (under autocast)."""
        with self.autocast():
            terms = self.hook.regdefense_compute_loss(trainer=self, step=step, model=model, phase=phase)
        if not terms:
            impls = self.hook.regdefense_compute_loss.get_hookimpls()
            wrappers = [i.plugin_name for i in impls if (i.wrapper or i.hookwrapper) and not _returns_value(i.function)]
            answer = next((i.plugin_name for i in reversed(impls) if not (i.wrapper or i.hookwrapper)), "core")
            suspects = (
                f"a wrapper that does not return the terms it received: {', '.join(wrappers)}; " if wrappers else ""
            )
            raise UserError(
                f"the active defenses returned no loss terms from regdefense_compute_loss ({suspects}the "
                f"objective comes from '{answer}'); a compute_loss implementation must return its "
                f"dict of named terms (`return terms` at the end of a wrapper)"
            )
        problem = loss_terms_problem(terms)
        if problem is not None:
            raise answer_error(self.pm, "regdefense_compute_loss", problem)
        return terms

    # --- the collaborators, under the names plugins and tests know ---------------------------------

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Clean and PGD accuracy of ``model`` on the held-out split (see
        :class:`~regdefense.training.services.Validator`)."""
        return self.validator.validate(model)

    def save_checkpoints(self, metrics: dict[str, Any]) -> None:
        """Write ``last.pt``, ``best.pt`` when the held-out metric improved, and ``epoch-N.pt`` if asked."""
        self.checkpoints.save(metrics)

    def resume_from(self, path: str | Path) -> None:
        """Load a checkpoint; :meth:`fit` restores it after ``fit_start`` and continues at its epoch."""
        self.checkpoints.resume_from(path)

    def restore_state(self, p: dict[str, Any]) -> dict[str, Any]:
        """Load a checkpoint payload (weights, optimizer, schedule, scaler, RNG, defense states); returns the running
        loss sums of a checkpoint written mid-epoch."""
        return self.checkpoints.restore(p)

    # --- internals ----------------------------------------------------------------------------

    def eval_model(self) -> nn.Module:
        """The model to evaluate (``regdefense_eval_model``), refused naming the defense when it is not a module."""
        model = self.hook.regdefense_eval_model(trainer=self)
        if not isinstance(model, nn.Module):
            raise answer_error(self.pm, "regdefense_eval_model", f"a {type(model).__name__}, not a torch module")
        return model

    def _adversarial(self, step: Step) -> Any:
        """The batch's adversarial inputs from ``regdefense_make_adversarial``; a result of the wrong kind or shape is
        refused naming the defense, not left to fail deep inside the model's forward."""
        adv = self.hook.regdefense_make_adversarial(trainer=self, step=step, model=self.model)
        problem = adversarial_problem(adv, step.inputs)
        if problem is not None:
            raise answer_error(self.pm, "regdefense_make_adversarial", problem)
        return adv

    def _trainable(self) -> list[nn.Parameter]:
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        for module in self.modules.values():
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    @property
    def peak_lr(self) -> float:
        """``train.lr``, scaled by the global batch over ``lr_base_batch`` with ``lr_scaling=linear``."""
        return peak_lr(self.config.train)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: one per ``train.accumulate`` batches, ``replays`` per batch."""
        return -(-len(self.train_loader) // self.config.train.accumulate) * self.replays

    def _replays(self) -> int:
        m = self.hook.regdefense_batch_replays(trainer=self)
        if m is None:
            return 1
        if not isinstance(m, int) or m < 1:
            raise answer_error(self.pm, "regdefense_batch_replays", f"{m!r}, not a whole number of replays >= 1")
        if m > 1 and self.config.train.accumulate > 1:
            raise ConfigError(
                f"a defense replays each batch {m} times (regdefense_batch_replays) and train.accumulate="
                f"{self.config.train.accumulate}: replays step the optimizer on every replay, accumulation on every "
                f"k-th batch; set train.accumulate=1"
            )
        return m

    def _replayed(self, batches, start: int):
        """``(index, batch, last replay?)`` for each batch, each batch ``replays`` times in a row."""
        for i, batch in enumerate(batches, start):
            for r in range(self.replays):
                yield i, batch, r == self.replays - 1

    def _build_scheduler(self):
        return build_scheduler(self.optimizer, self.config.train, self.steps_per_epoch, self.peak_lr)

    def _ramp_eps(self, progress: float) -> None:
        warm = self.config.train.eps_warmup_epochs
        self.eps_factor = 1.0 if warm <= 0 else min(1.0, progress / warm)

    @staticmethod
    def _accumulate(sums: dict[str, Any], step: Step) -> None:
        for prefix, values in (("loss_", step.losses), ("log_", step.logs)):
            for name, value in values.items():
                key, value = prefix + name, value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
        sums["_n"] = sums.get("_n", 0) + 1

    def _train_metrics(self, epoch: int, sums: dict[str, Any], seconds: float) -> dict[str, Any]:
        n = sums.pop("_n", 0) or 1
        keys = sorted(sums)
        if keys:  # one host sync (and, under torchrun, one all-reduce) per epoch
            values = self.dist.sum_(torch.stack([sums[k].to(self.device) for k in keys])) / self.dist.world
            means = dict(zip(keys, (values / n).tolist()))
        else:
            means = {}
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": sum(v for k, v in means.items() if k.startswith("loss_")),
            "eps": self.eps,
            "epoch_seconds": seconds,
        }
        metrics.update(means)
        if self.guard.skipped:
            metrics["skipped_batches"] = self.guard.skipped
        if getattr(self.train_loader, "skipped", None):
            metrics["skipped_images"] = len(self.train_loader.skipped)
        return metrics
