"""The training loop, read top to bottom in :meth:`Trainer.fit`, and the ``core`` default hooks."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import regdefense
from regdefense import checkpoint, distributed, hookimpl
from regdefense.attacks import keep_modes, pgd
from regdefense.config import RunConfig
from regdefense.contract import APPLIES_WEIGHTS, Key
from regdefense.data import BatchLoader, Data, Split, check_data, load_data
from regdefense.extra import MixedLoader, load_extra
from regdefense.errors import CheckpointError, ConfigError, DataError, UserError
from regdefense.evaluate import accuracy
from regdefense.models import create_model, default_model
from regdefense.plugins import activate, blame, providers
from regdefense.schedule import build_scheduler
from regdefense.safety import Interrupt, NonFiniteGuard, NonFiniteLoss, TrainingInterrupted
from regdefense.step import Step


class CorePlugin:
    """The loop's own defaults, registered first as ``core`` and run last (``trylast``)."""

    name = "core"
    #: counted only for the exclusive hooks core answers (no other objective active)
    publishes = (Key("outputs.adv", "compute_loss"),)
    reads = (APPLIES_WEIGHTS,)

    @hookimpl(trylast=True)
    def regdefense_make_adversarial(self, step: Step) -> Tensor:
        return step.inputs  # no attack: plain training

    @hookimpl(trylast=True)
    def regdefense_compute_loss(self, trainer: "Trainer", step: Step, model: nn.Module) -> dict[str, Tensor]:
        logits = model(step.adv_inputs)
        step.outputs["adv"] = logits
        return {"task": trainer.adv_mean(trainer.ce(logits, step.targets, reduction="none"), step, logits)}

    @hookimpl(trylast=True)
    def regdefense_forward_backward(self, trainer: "Trainer", step: Step) -> Tensor:
        step.losses = trainer.loss_terms(step, trainer.model, "train")
        loss = sum(step.losses.values())
        trainer.backward(loss)
        return loss.detach()

    @hookimpl(trylast=True)
    def regdefense_eval_model(self, trainer: "Trainer") -> nn.Module:
        return trainer.model


@dataclass
class TrainState:
    epoch: int = 0  #: the next epoch to run
    global_step: int = 0
    batch: int = 0  #: the next batch of ``epoch`` (non-zero only in a checkpoint written mid-epoch)
    best_metric: float = -math.inf
    best_epoch: int = -1


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device ``train.device`` names; under torchrun, ``auto`` and ``cuda`` mean this process's GPU."""
    if name in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for CUDA but no GPU is available; use train.device=auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    """One run: a model, a defense stack (a pluggy manager), data, optimizer and schedule.

    Plugins reach everything through the trainer: ``model``, ``modules`` (extra networks),
    ``optimizer``, ``device``, ``data``, ``eps`` (the current, ramped ε) and ``norm``, ``state``,
    ``config``, ``autocast()``, ``backward()`` and ``loss_terms()``.
    """

    def __init__(self, config: RunConfig, *, pm=None, data: Data | None = None, model: nn.Module | None = None,
                 run_dir: str | Path | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.config = config
        t = config.train
        self.pm = pm if pm is not None else activate(config.defenses, config.defense)
        self.hook = self.pm.hook
        self.dist = distributed.init("cpu" if t.device == "cpu" else None)
        self.device = resolve_device(t.device, self.dist.local_rank if self.dist.enabled else None)
        self.dist.device, self.dist.batch_size = self.device, t.batch_size
        if t.amp != "off" and self.device.type != "cuda":  # works (CPU autocast), but is rarely faster there
            self.echo(f"note: train.amp={t.amp} on {self.device.type} runs under CPU autocast; it is meant for GPUs")
        seed_everything(t.seed, t.deterministic)
        self.data = data if data is not None else load_data(config.data, t.seed)
        check_data(self.data)
        self.extra = load_extra(config.data, self.data.input_shape, self.data.num_classes, device=t.device,
                                echo=self.echo)
        self.eps_full = config.threat.eps if config.threat.eps is not None else self.data.default_eps
        self.norm = config.threat.norm
        self.eps_factor = 1.0
        self.raw_model = model if model is not None else self._build_model()
        if t.init:
            self._load_init(t.init)
        self._check_model()
        self.model = self.raw_model  # replaced by its compiled form below when train.compile is set
        self.modules: dict[str, nn.Module] = {}
        for extra in self.hook.regdefense_add_modules(trainer=self):
            for name, module in (extra or {}).items():
                if name in self.modules:
                    raise UserError(f"two defenses add a module named '{name}'")
                self.modules[name] = module
        if self.sync_bn:  # batch statistics over every process's slice, as one large batch would have them
            self.raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(self.raw_model)
            self.modules = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in self.modules.items()}
        channels_last = t.channels_last if t.channels_last is not None else self.device.type == "cuda"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for net in [self.raw_model, *self.modules.values()]:
            net.to(self.device, memory_format=fmt)
            for tensor in [*net.parameters(), *net.buffers()]:
                self.dist.broadcast_(tensor.data)  # every process starts from rank 0's weights
        if self.dist.rank:
            torch.manual_seed(t.seed + 1_000_003 * self.dist.rank)  # but draws its own random starts
        self.model = torch.compile(self.raw_model) if t.compile else self.raw_model
        self.optimizer = self._build_optimizer() if optimizer is None else self._adopt(optimizer)
        on_device = self._place_train_split()
        if self.extra is not None:  # generated / pseudo-labelled images mixed into every batch
            if not isinstance(self.data.train, Split):
                raise DataError("data.extra works with in-memory training data; set data.stream=off")
            self.train_loader = MixedLoader(self.data.train, self.extra, t.batch_size, config.data.extra_fraction,
                                            seed=t.seed, augment=self.data.augment, dist=self.dist,
                                            pin=self.device.type == "cuda" and not on_device)
        elif isinstance(self.data.train, Split):
            self.train_loader = BatchLoader(self.data.train, t.batch_size, seed=t.seed, augment=self.data.augment,
                                            dist=self.dist, pin=self.device.type == "cuda" and not on_device)
        else:  # streamed image files, decoded in worker processes
            from regdefense.stream import StreamLoader

            self.train_loader = StreamLoader(self.data.train, t.batch_size, seed=t.seed, augment=self.data.augment,
                                             workers=config.data.workers, skip_corrupt=config.data.skip_corrupt,
                                             dist=self.dist, pin=self.device.type == "cuda")
        self.train_size = len(self.data.train)
        #: size of step.index's range: original samples 0..N-1, then the extra ones (per-sample buffers need this many)
        self.index_size = self.train_size + (len(self.extra) if self.extra is not None else 0)
        #: images one epoch trains on (all processes): with data.extra, every batch is filled up with extra samples
        self.epoch_samples = len(self.train_loader) * t.batch_size if self.extra is not None else self.train_size
        self.scheduler = self._build_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.state = TrainState()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.should_stop = False
        self.history: list[dict[str, Any]] = []
        self._resume_payload: dict[str, Any] | None = None
        self.guard = NonFiniteGuard(t.nonfinite)
        self._micro_weight = 1.0  #: this batch's share of an accumulation group (train.accumulate)
        self.interrupt = Interrupt(self.echo)

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train. Per batch: batch_start → make_adversarial → forward_backward (→ compute_loss) →
        gradient all-reduce (torchrun) → unscale, clip → before_optimizer_step → optimizer step → batch_end;
        per epoch: epoch_start, the batches, eval_model + held-out check, epoch_end, checkpoint.

        A hook that raises stops the run with a :class:`PluginError` naming its defense; SIGINT/SIGTERM
        finish the step, write ``last.pt`` and raise :class:`TrainingInterrupted`.
        """
        with self.interrupt.installed():
            try:
                return self._fit()
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a defense's bug: say which one, keep the traceback as the cause
                culprit = blame(self.pm, exc)
                if culprit is None:
                    raise
                raise culprit.error(exc, self._last_good(), self._write_traceback(exc)) from exc

    def _fit(self) -> list[dict[str, Any]]:
        hook, t = self.hook, self.config.train
        hook.regdefense_fit_start(trainer=self)
        sums: dict[str, Any] = {}
        if self._resume_payload is not None:
            sums = self.restore_state(self._resume_payload)
        lr = self.optimizer.param_groups[0]["lr"]
        for epoch in range(self.state.epoch, t.epochs):
            self.state.epoch, start = epoch, self.state.batch
            self.train_loader.set_epoch(epoch, start)
            if start == 0:
                hook.regdefense_epoch_start(trainer=self, epoch=epoch)
                sums = {}
            started = time.perf_counter()
            self.model.train()
            batches = self._progress(self.train_loader, f"epoch {epoch + 1}/{t.epochs}", start)
            acc, n_batches = t.accumulate, len(self.train_loader)
            for i, batch in enumerate(batches, start):
                self._ramp_eps(epoch + i / n_batches)
                step = Step.from_batch(batch, self.device)
                first, last = i % acc == 0, i % acc == acc - 1 or i == n_batches - 1
                hook.regdefense_batch_start(trainer=self, step=step)
                held = None if first else [p.grad for p in self._trainable()]  # an attack may write .grad
                step.adv_inputs = hook.regdefense_make_adversarial(trainer=self, step=step, model=self.model)
                if first:
                    self.optimizer.zero_grad(set_to_none=True)
                    group_n, group_bad, group_size = 0, False, self._group_size(i, n_batches)
                else:
                    for p, g in zip(self._trainable(), held):
                        p.grad = g
                self._micro_weight = step.batch_size / group_size if acc > 1 else 1.0
                hook.regdefense_forward_backward(trainer=self, step=step)
                group_n += step.batch_size
                skip = self._skip_nonfinite(step)  # train.nonfinite=skip and a NaN/Inf term: no update
                group_bad = group_bad or skip
                if last:
                    self.dist.reduce_grads(self._trainable(), group_n)
                    if not group_bad:
                        self.scaler.unscale_(self.optimizer)
                        if t.grad_clip:
                            nn.utils.clip_grad_norm_(self._trainable(), t.grad_clip)
                        hook.regdefense_before_optimizer_step(trainer=self, step=step)
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.zero_grad(set_to_none=True)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if t.schedule_step == "iter":
                        self.scheduler.step()
                if not skip:
                    hook.regdefense_batch_end(trainer=self, step=step)
                    self._accumulate(sums, step)
                self.state.global_step += 1
                self.state.batch = i + 1
                if self.guard.every and self.state.global_step % self.guard.every == 0:
                    self.guard.check(self._last_good())
                if last and self.state.batch < n_batches and self.interrupt.requested(self.dist, self.state.global_step):
                    self._stop_for_signal(sums)
            self.state.batch = 0
            self.guard.check(self._last_good())
            if t.schedule_step == "epoch":
                self.scheduler.step()
            self.dist.average_buffers([self.raw_model, *self.modules.values()])
            self.dist.check_in_sync({"model": self.raw_model, **self.modules})
            metrics = self._train_metrics(epoch, sums, time.perf_counter() - started)
            metrics["lr"] = lr  # the rate the epoch's last batch used
            with keep_modes(self.raw_model, *self.modules.values()):  # an eval model may switch shared networks
                metrics.update(self.validate(hook.regdefense_eval_model(trainer=self)))
            hook.regdefense_epoch_end(trainer=self, epoch=epoch, metrics=metrics)
            self.state.epoch = epoch + 1
            self._log(metrics)
            self.save_checkpoints(metrics)
            if self.interrupt.requested(self.dist, 0) and self.state.epoch < t.epochs:
                self._stop_for_signal({})
            if self.should_stop:
                break
        hook.regdefense_fit_end(trainer=self)
        return self.history

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
                self.echo(f"warning: skipped batch {self.state.batch + 1} of epoch {self.state.epoch + 1}: a loss "
                          f"term is NaN or infinite ({self.guard.skipped} skipped so far)")
                if self.guard.streak >= self.guard.every:  # skipping is not recovering: say so, do not spin
                    raise NonFiniteLoss(f"{self.guard.streak} batches in a row had NaN or infinite loss terms (up to "
                                        f"epoch {self.state.epoch + 1}, batch {self.state.batch + 1}); skipping cannot "
                                        f"recover. Last good checkpoint: {self._last_good()}. Lower train.lr or check the data")
                return True
            self.guard.streak = 0
            return False
        self.guard.record(step.losses, self.state.global_step, self.state.epoch, self.state.batch)
        return False

    def _stop_for_signal(self, sums: dict[str, Any]) -> None:
        """Write ``last.pt`` where the loop stands (mid-epoch if need be) and raise TrainingInterrupted."""
        self.guard.check(self._last_good())  # never checkpoint weights a NaN has reached
        where = (f"epoch {self.state.epoch + 1}, batch {self.state.batch}" if self.state.batch
                 else f"the end of epoch {self.state.epoch}")
        if self.run_dir is None:
            raise TrainingInterrupted(f"interrupted at {where}; no run directory, so nothing was saved")
        if self.dist.is_main:
            checkpoint.save(self.state_payload(partial=sums), self.run_dir / "checkpoints" / "last.pt")
        self.dist.barrier()
        launcher = "torchrun --nproc-per-node N -m regdefense" if self.dist.enabled else "regdefense"
        raise TrainingInterrupted(f"interrupted at {where}; checkpoint written to "
                                  f"{self.run_dir / 'checkpoints' / 'last.pt'}. Resume with: "
                                  f"{launcher} train --resume {self.run_dir}")

    def _write_traceback(self, exc: BaseException) -> str:
        """Keep the full traceback of a defense's failure in ``RUN_DIR/error.log``; return where it went."""
        import traceback

        if self.run_dir is None or not self.dist.is_main:
            return "the exception's __cause__"
        path = self.run_dir / "error.log"
        try:
            path.write_text("".join(traceback.format_exception(exc)))
        except OSError:
            return "not saved (the run directory is not writable)"
        return str(path)

    def _last_good(self) -> str:
        last = self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None
        return str(last) if last is not None and last.exists() else "none yet"

    # --- services for plugins -----------------------------------------------------------------

    @property
    def eps(self) -> float:
        """The run's ε at this point of training (the threat ε times the warm-up ramp)."""
        return self.eps_full * self.eps_factor

    def ramp(self, value: float) -> float:
        """Scale a defense's own ε by the warm-up ramp, as ``trainer.eps`` is."""
        return value * self.eps_factor

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of forwards (a no-op unless ``train.amp`` is bf16 or fp16)."""
        amp = self.config.train.amp
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def attack_autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of inner attacks: :meth:`autocast`, or full precision with ``train.attack_fp32``."""
        if self.config.train.attack_fp32:
            return torch.autocast(self.device.type, enabled=False)
        return self.autocast()

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` through the gradient scaler (a pass-through unless fp16); with gradient
        accumulation, weighted by this batch's share of the accumulated group."""
        self.scaler.scale(loss * self._micro_weight if self._micro_weight != 1.0 else loss).backward()

    def build_network(self, arch: str) -> nn.Module:
        """A zoo architecture sized for this run's data (channels, classes, image size), for defenses that add
        networks (guides, proxies); ``"auto"`` is the run's own architecture."""
        c, h, w = self.data.input_shape
        if arch == "auto":
            arch = default_model(self.data.name) if self.config.model.name == "auto" else self.config.model.name
        return create_model(arch, in_channels=c, num_classes=self.data.num_classes, image_size=min(h, w))

    def ce(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy against hard labels with the run's ``train.label_smoothing``: the supervised terms of
        the objectives use it, so label smoothing applies to whatever stack is active."""
        return F.cross_entropy(logits, targets, reduction=reduction, label_smoothing=self.config.train.label_smoothing)

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
            raise UserError("the active defenses returned no loss terms from regdefense_compute_loss")
        return terms

    # --- evaluation ---------------------------------------------------------------------------

    def robust_attack(self, steps: int | None = None):
        """The per-epoch check's attack: PGD with random start at the full threat ε."""
        steps = steps or self.config.eval.pgd_steps
        eps, norm = self.eps_full, self.norm
        return lambda m, x, y: pgd(m, x, y, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Clean and PGD accuracy of ``model`` on (at most ``eval.val_samples`` of) the held-out split."""
        split = self.data.val
        if split is None or len(split) == 0:
            return {}
        n = min(len(split), self.config.eval.val_samples or len(split))
        idx = self.dist.shard(torch.arange(n))  # under torchrun each process checks its share
        x, y = split.floats(idx), split.y[idx]
        kw = {"batch_size": self.config.eval.batch_size, "device": self.device}

        def acc(attack=None) -> float:
            correct = torch.tensor([accuracy(model, x, y, attack, **kw) * len(idx)], device=self.device)
            return float(self.dist.sum_(correct)) / n

        out = {"val_clean": acc(), "val_robust": acc(self.robust_attack())}
        if self._co_guard():
            eps, norm = self.eps_full, self.norm
            out["val_fgsm"] = acc(lambda m, xb, yb: pgd(m, xb, yb, eps=eps, alpha=eps, steps=1, norm=norm, start=None))
            out["co_gap"] = out["val_fgsm"] - out["val_robust"]
            if out["co_gap"] > self.config.eval.co_threshold:
                out["catastrophic_overfitting"] = True
                self.echo(f"warning: catastrophic overfitting at epoch {self.state.epoch + 1}: held-out FGSM accuracy "
                          f"{out['val_fgsm']:.1%} vs PGD {out['val_robust']:.1%}; best.pt keeps the best PGD epoch")
                self.should_stop = self.should_stop or self.config.eval.co_stop
        return out

    def _co_guard(self) -> bool:
        mode = self.config.eval.co_guard
        if mode == "auto":
            return any(getattr(p, "single_step", False) for _, p in self.pm.list_name_plugin())
        return mode == "on"

    def echo(self, message: str) -> None:
        """Print a message for the user without breaking progress bars (rank 0 only under torchrun)."""
        from tqdm.auto import tqdm

        if self.dist.is_main:
            tqdm.write(message, file=sys.stderr)

    # --- checkpoints --------------------------------------------------------------------------

    def state_payload(self, metrics: dict[str, Any] | None = None, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resume needs; ``partial`` holds the running loss sums of a checkpoint written mid-epoch."""
        plugins = {}
        for name, plugin in self.pm.list_name_plugin():
            if name != "core" and hasattr(plugin, "state_dict"):
                plugins[name] = plugin.state_dict()
        return {
            "format": checkpoint.FORMAT, "model": self.raw_model.state_dict(),
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.state.epoch, "global_step": self.state.global_step,
            "batch": self.state.batch, "partial": partial or {}, "skipped": self.guard.skipped,
            "best_metric": self.state.best_metric, "best_epoch": self.state.best_epoch,
            "rng": checkpoint.rng_state(), "plugins": plugins, "stack": list(self.config.defenses),
            "roles": self.roles,
            "metrics": json.loads(json.dumps(metrics or {})), "config": self.config.to_dict(),
            "versions": versions(),
        }

    @functools.cached_property
    def roles(self) -> dict[str, dict[str, Any]]:
        """Per active defense: whether it builds the evaluated model (a plain ``regdefense_eval_model``) and where it
        comes from — what evaluating the checkpoint needs installed, and what to tell a user who lacks it."""
        from regdefense.plugins import catalogue

        builds = {i.plugin_name for i in self.hook.regdefense_eval_model.get_hookimpls()
                  if not (i.wrapper or i.hookwrapper)}
        cat = catalogue()
        out = {}
        for name, _ in self.pm.list_name_plugin():
            if name != "core":
                info = cat.get(name)
                out[name] = {"eval_model": name in builds, "dist": info.dist if info else "",
                             "version": info.version if info else ""}
        return out

    def save_checkpoints(self, metrics: dict[str, Any]) -> None:
        """Write ``last.pt``, ``best.pt`` when the held-out metric improved, and ``epoch-N.pt`` if asked."""
        select = self.config.eval.select
        if select == "auto":
            adversary = providers(self.pm, "regdefense_make_adversarial") or providers(
                self.pm, "regdefense_make_adversarial", fallbacks=True)
            select = "robust" if adversary else "clean"
        score = metrics.get(f"val_{select}", -metrics.get("loss", math.inf))
        improved = score > self.state.best_metric
        if improved:
            self.state.best_metric, self.state.best_epoch = score, self.state.epoch - 1
        if self.run_dir is None or not self.dist.is_main:
            return
        payload = self.state_payload(metrics)
        ckpt = self.run_dir / "checkpoints"
        checkpoint.save(payload, ckpt / "last.pt")
        if improved:
            checkpoint.save(payload, ckpt / "best.pt")
        every = self.config.train.save_every
        if every and self.state.epoch % every == 0:
            checkpoint.save(payload, ckpt / f"epoch-{self.state.epoch}.pt")

    def resume_from(self, path: str | Path) -> None:
        """Load a checkpoint; :meth:`fit` restores it after ``fit_start`` and continues at its epoch."""
        payload = checkpoint.load(path)
        differences = checkpoint.differences(payload, self.config)
        if differences:
            raise CheckpointError(f"checkpoint {path} does not belong to this run: {'; '.join(differences)}")
        self._resume_payload = payload

    def restore_state(self, p: dict[str, Any], for_evaluation: bool = False) -> dict[str, Any]:
        """Load a checkpoint payload: weights, extra modules, optimizer, schedule, scaler, RNG, defense states.

        ``for_evaluation`` loads the networks and the defenses' states only (what the evaluated model needs), so a
        run evaluated without a training-only defense, whose networks were in the optimizer, still loads.
        Returns the running loss sums of a checkpoint written mid-epoch (empty otherwise)."""
        try:
            self.raw_model.load_state_dict(p["model"])
            for name, module in self.modules.items():
                module.load_state_dict(p["modules"][name])
        except (RuntimeError, KeyError) as exc:
            raise UserError(f"the checkpoint does not match this model: {str(exc).splitlines()[0]}") from None
        for name, plugin in self.pm.list_name_plugin():
            if name in p["plugins"] and hasattr(plugin, "load_state_dict"):
                plugin.load_state_dict(p["plugins"][name])
        self.state = TrainState(p["epoch"], p["global_step"], p.get("batch", 0), p["best_metric"], p["best_epoch"])
        if for_evaluation:
            return {}
        self.optimizer.load_state_dict(p["optimizer"])
        self.scheduler.load_state_dict(p["scheduler"])
        self.scaler.load_state_dict(p["scaler"])
        self.guard.skipped = p.get("skipped", 0)
        checkpoint.set_rng_state(p["rng"])
        self._resume_payload = None
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in p.get("partial", {}).items()}

    # --- internals ----------------------------------------------------------------------------

    def _build_model(self) -> nn.Module:
        m = self.config.model
        c, h, w = self.data.input_shape
        name = default_model(self.data.name) if m.name == "auto" else m.name
        norm = (self.data.mean, self.data.std) if m.normalize else None
        return create_model(name, in_channels=c, num_classes=self.data.num_classes, image_size=min(h, w),
                            pretrained=m.pretrained, normalize=norm, depth=m.depth, widen=m.widen,
                            input_size=m.input_size, weights=m.weights, activation=m.activation,
                            bn_momentum=m.bn_momentum, dataset=self.data.name)

    def _load_init(self, target: str) -> None:
        """Start from other weights: a run's best.pt or a checkpoint file (the paper-001 fine-tuning flow), an export
        folder or ``hf:ORG/NAME`` (its safetensors), or ``robustbench:NAME`` (the zoo model's weights)."""
        from regdefense.export import read_weights

        source, state = read_weights(target)
        try:
            self.raw_model.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"train.init: the weights of {source} do not fit this model: "
                            f"{str(exc).splitlines()[0][:300]} (the architecture must match: model.name)") from None

    def _check_model(self) -> None:
        """Run the model on two training images: it must take their shape and return one logit per class."""
        x = self.data.train.floats(torch.arange(min(2, len(self.data.train))))
        first_conv = next((m for m in self.raw_model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None and first_conv.in_channels != x.shape[1]:
            raise DataError(f"the model takes {first_conv.in_channels}-channel images but the dataset's have "
                            f"{x.shape[1]}; pick a model for this data (model.name=auto) or convert the images")
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                from regdefense.attacks import model_mode

                stack.enter_context(model_mode(self.raw_model, False))
                out = self.raw_model(x)
        except RuntimeError as exc:
            raise DataError(f"the model cannot take this dataset's inputs of shape {tuple(x.shape[1:])}: "
                            f"{str(exc).splitlines()[0]}") from None
        if out.ndim != 2 or out.shape[1] != self.data.num_classes:
            raise DataError(f"the model returns shape {tuple(out.shape)} but the dataset has "
                            f"{self.data.num_classes} classes; logits must be (N, {self.data.num_classes})")

    def _trainable(self) -> list[nn.Parameter]:
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        for module in self.modules.values():
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def _adopt(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Use a caller's optimizer (ART's classifier's); extra modules' parameters join as a new group."""
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        extra = [p for p in self._trainable() if id(p) not in known]
        if extra:
            optimizer.add_param_group({"params": extra})
        return optimizer

    @functools.cached_property
    def sync_bn(self) -> bool:
        """Whether BatchNorm layers synchronise their statistics across processes (``train.sync_bn``)."""
        mode = self.config.train.sync_bn
        if mode == "off" or not self.dist.enabled:
            return False
        if self.device.type != "cuda":
            if mode == "on":
                raise ConfigError("train.sync_bn=on needs CUDA processes: torch's SyncBatchNorm runs on GPUs only "
                                  "(under torchrun on CPUs each process keeps its own batch statistics; use "
                                  "train.sync_bn=auto or off)")
            return False
        return True

    @property
    def peak_lr(self) -> float:
        """``train.lr``, scaled by the global batch over ``lr_base_batch`` with ``lr_scaling=linear``."""
        t = self.config.train
        return t.lr * (t.batch_size * t.accumulate / t.lr_base_batch if t.lr_scaling == "linear" else 1.0)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t, lr = self.config.train, self.peak_lr
        if t.optimizer == "sgd":
            return torch.optim.SGD(self._trainable(), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                   nesterov=t.nesterov and t.momentum > 0)
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        return cls(self._trainable(), lr=lr, weight_decay=t.weight_decay, betas=tuple(t.betas))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: one per ``train.accumulate`` batches."""
        return -(-len(self.train_loader) // self.config.train.accumulate)

    def _build_scheduler(self):
        return build_scheduler(self.optimizer, self.config.train, self.steps_per_epoch, self.peak_lr)

    def _ramp_eps(self, progress: float) -> None:
        warm = self.config.train.eps_warmup_epochs
        self.eps_factor = 1.0 if warm <= 0 else min(1.0, progress / warm)

    def _progress(self, loader, desc: str, start: int = 0):
        if not self.config.train.progress or not self.dist.is_main:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, initial=start, total=len(loader))

    def _place_train_split(self) -> bool:
        """Move the training split into GPU memory when ``data.on_device`` asks (auto: if it fits easily)."""
        mode, split = self.config.data.on_device, self.data.train
        if self.device.type != "cuda" or mode == "off" or not isinstance(split, Split):
            return False
        if self.extra is not None and mode == "auto":  # mixed batches are assembled on the host anyway
            return False
        if mode == "auto":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if split.x.element_size() * split.x.nelement() > total // 4:
                return False
        moved = Split(split.x.to(self.device, non_blocking=True), split.y.to(self.device, non_blocking=True))
        self.data = dataclasses.replace(self.data, train=moved)  # a caller's Data object stays as it was
        return True

    @staticmethod
    def _accumulate(sums: dict[str, Tensor], step: Step) -> None:
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
        metrics: dict[str, Any] = {"epoch": epoch + 1,
                                   "loss": sum(v for k, v in means.items() if k.startswith("loss_")),
                                   "eps": self.eps, "epoch_seconds": seconds}
        metrics.update(means)
        if self.guard.skipped:
            metrics["skipped_batches"] = self.guard.skipped
        if getattr(self.train_loader, "skipped", None):
            metrics["skipped_images"] = len(self.train_loader.skipped)
        return metrics

    def _log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if self.run_dir is not None and self.dist.is_main:
            try:
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            except OSError as exc:
                raise UserError(f"cannot append to {self.run_dir / 'metrics.jsonl'}: {exc.strerror or exc}; "
                                f"free some space and resume with: regdefense train --resume {self.run_dir}") from None
        if self.dist.is_main:  # experiment trackers (regdefense.trackers) and any plugin that logs
            self.hook.regdefense_log_metrics(trainer=self, epoch=metrics["epoch"], metrics=metrics)


def versions() -> dict[str, str]:
    """regdefense, torch and every defense distribution's version, for provenance."""
    import importlib.metadata as md

    out = {"regdefense": regdefense.__version__, "torch": str(torch.__version__)}
    for ep in md.entry_points(group="regdefense"):
        if ep.dist is not None:
            out[ep.dist.metadata["Name"]] = ep.dist.version
    return out
