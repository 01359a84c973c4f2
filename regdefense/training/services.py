"""The loop's own services, as small collaborators the trainer holds (as Lightning's connectors are): held-out
validation with the catastrophic-overfitting guard, checkpoints, and the metrics log. Each reads the trainer it
serves; none of them trains.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from regdefense.attacks.adapter import pgd, step_size
from regdefense.attacks.measure import accuracy
from regdefense.base import checkpoint
from regdefense.base.errors import CheckpointError, UserError
from regdefense.base.files import write_atomic
from regdefense.base.runtime import versions
from regdefense.base.safety import NonFiniteLoss
from regdefense.host.defense import declared
from regdefense.host.discovery import providers
from regdefense.host.interface import TrainingHost
from regdefense.training.restore import load_networks


class LoopHost(Protocol):
    """What the loop's own services use of the trainer beyond a hook's
    :class:`~regdefense.host.interface.TrainingHost`: the
    non-finite guard and the stack's roles, which they checkpoint."""

    guard: Any

    @property
    def roles(self) -> Any: ...


class ServiceHost(TrainingHost, LoopHost, Protocol):
    """The trainer as its services see it (``regdefense.training.loop.Trainer`` implements it)."""


class Validator:
    """Clean and PGD accuracy on the held-out split after each epoch; with single-step adversaries (or
    ``eval.co_guard=on``) also FGSM, flagging catastrophic overfitting when FGSM beats PGD by ``eval.co_threshold``."""

    def __init__(self, trainer: ServiceHost) -> None:
        self.trainer = trainer

    def robust_attack(self, steps: int | None = None):
        """The per-epoch check's attack: PGD with random start at the full threat ε."""
        tr = self.trainer
        steps = steps or tr.config.eval.pgd_steps
        eps, norm = tr.eps_full, tr.norm
        return lambda m, x, y: pgd(m, x, y, eps=eps, alpha=step_size(eps, None, steps), steps=steps, norm=norm)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Clean and PGD accuracy of ``model`` on (at most ``eval.val_samples`` of) the held-out split."""
        tr = self.trainer
        split = tr.data.val
        if split is None or len(split) == 0:
            return {}
        n = min(len(split), tr.config.eval.val_samples or len(split))
        idx = tr.dist.shard(torch.arange(n))  # under torchrun each process checks its share
        x, y = split.floats(idx), split.y[idx]
        kw = {"batch_size": tr.config.eval.batch_size, "device": tr.device}

        def acc(attack=None) -> float:
            correct = torch.tensor([accuracy(model, x, y, attack, **kw) * len(idx)], device=tr.device)
            return float(tr.dist.sum_(correct)) / n

        out = {"val_clean": acc(), "val_robust": acc(self.robust_attack())}
        if self.co_guard:
            eps, norm = tr.eps_full, tr.norm
            out["val_fgsm"] = acc(lambda m, xb, yb: pgd(m, xb, yb, eps=eps, alpha=eps, steps=1, norm=norm, start=None))
            out["co_gap"] = out["val_fgsm"] - out["val_robust"]
            if out["co_gap"] > tr.config.eval.co_threshold:
                out["catastrophic_overfitting"] = True
                tr.echo(
                    f"warning: catastrophic overfitting at epoch {tr.state.epoch + 1}: held-out FGSM accuracy "
                    f"{out['val_fgsm']:.1%} vs PGD {out['val_robust']:.1%}; best.pt keeps the best PGD epoch"
                )
                tr.should_stop = tr.should_stop or tr.config.eval.co_stop
        return out

    @property
    def co_guard(self) -> bool:
        mode = self.trainer.config.eval.co_guard
        if mode == "auto":
            return any(declared(p, "single_step") for _, p in self.trainer.pm.list_name_plugin())
        return mode == "on"


class Checkpointer:
    """Checkpoint payloads, ``last.pt`` / ``best.pt`` (best held-out metric) / ``epoch-N.pt``, and resuming."""

    def __init__(self, trainer: ServiceHost) -> None:
        self.trainer = trainer
        #: a checkpoint :meth:`resume_from` loaded, restored by the loop after ``fit_start``
        self.pending: dict[str, Any] | None = None

    def payload(self, metrics: dict[str, Any] | None = None, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resume needs; ``partial`` holds the running loss sums of a checkpoint written mid-epoch."""
        tr = self.trainer
        plugins = {}
        for name, plugin in tr.pm.list_name_plugin():
            state_dict = declared(plugin, "state_dict")
            if name != "core" and state_dict is not None:
                plugins[name] = state_dict()
        return {
            "format": checkpoint.FORMAT,
            "model": tr.raw_model.state_dict(),
            "modules": {n: m.state_dict() for n, m in tr.modules.items()},
            "optimizer": tr.optimizer.state_dict(),
            "scheduler": tr.scheduler.state_dict(),
            "scaler": tr.scaler.state_dict(),
            "epoch": tr.state.epoch,
            "global_step": tr.state.global_step,
            "batch": tr.state.batch,
            "partial": partial or {},
            "skipped": tr.guard.skipped,
            "best_metric": tr.state.best_metric,
            "best_epoch": tr.state.best_epoch,
            "rng": checkpoint.rng_state(),
            "plugins": plugins,
            "stack": list(tr.config.defenses),
            "roles": tr.roles,
            "metrics": json.loads(json.dumps(metrics or {})),
            "config": tr.config.to_dict(),
            "versions": versions(),
        }

    def save(self, metrics: dict[str, Any]) -> None:
        """Write ``last.pt``, ``best.pt`` when the held-out metric improved, and ``epoch-N.pt`` if asked."""
        tr = self.trainer
        select = tr.config.eval.select
        if select == "auto":
            adversary = providers(tr.pm, "regdefense_make_adversarial") or providers(
                tr.pm, "regdefense_make_adversarial", fallbacks=True
            )
            select = "robust" if adversary else "clean"
        score = metrics.get(f"val_{select}", -metrics.get("loss", math.inf))
        improved = score > tr.state.best_metric
        if improved:
            tr.state.best_metric, tr.state.best_epoch = score, tr.state.epoch - 1
        if tr.run_dir is None or not tr.dist.is_main:
            return
        self.require_finite_weights(f"epoch {tr.state.epoch}")
        payload = self.payload(metrics)
        ckpt = tr.run_dir / "checkpoints"
        checkpoint.save(payload, ckpt / "last.pt")
        if improved:
            checkpoint.save(payload, ckpt / "best.pt")
        every = tr.config.train.save_every
        if every and tr.state.epoch % every == 0:
            checkpoint.save(payload, ckpt / f"epoch-{tr.state.epoch}.pt")

    def save_last(self, partial: dict[str, Any]) -> None:
        """``last.pt`` where the loop stands (mid-epoch: with the running loss sums)."""
        tr = self.trainer
        assert tr.run_dir is not None
        self.require_finite_weights(f"epoch {tr.state.epoch + 1}, batch {tr.state.batch}")
        checkpoint.save(self.payload(partial=partial), tr.run_dir / "checkpoints" / "last.pt")

    def require_finite_weights(self, where: str) -> None:
        """Refuse to write weights a NaN or infinity has reached (an update can overflow though its loss was
        finite): ``last.pt`` and ``best.pt`` stay the last finite ones, and the message names them."""
        tr = self.trainer
        tensors = [
            t
            for net in (tr.raw_model, *tr.modules.values())
            for t in net.state_dict().values()
            if isinstance(t, Tensor) and t.is_floating_point()
        ]
        if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            return
        bad = [
            f"{name}"
            for name, t in tr.raw_model.state_dict().items()
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        raise NonFiniteLoss(
            f"the weights became NaN or infinite by {where} ({', '.join(bad[:3]) or 'an extra network'}"
            f"{', ...' if len(bad) > 3 else ''}); they were not saved. Last finite checkpoint: {self.last_finite()}. "
            f"Lower train.lr or set train.grad_clip, then resume from it or start again"
        )

    def last_finite(self) -> str:
        """``last.pt`` with its epoch (every checkpoint written holds finite weights), or "none yet"."""
        tr = self.trainer
        last = tr.run_dir / "checkpoints" / "last.pt" if tr.run_dir else None
        if last is None or not last.exists():
            return "none yet"
        try:
            epoch = checkpoint.load(last).get("epoch")
        except CheckpointError:
            return f"{last} (unreadable)"
        return f"{last} (after epoch {epoch})"

    def resume_from(self, path: str | Path) -> None:
        """Load a checkpoint; the loop restores it after ``fit_start`` and continues at its epoch."""
        payload = checkpoint.load(path)
        differences = checkpoint.differences(payload, self.trainer.config)
        if differences:
            raise CheckpointError(f"checkpoint {path} does not belong to this run: {'; '.join(differences)}")
        self.pending = payload
        self.trainer.metrics_log.trim(int(payload.get("epoch", 0)))

    def restore(self, p: dict[str, Any]) -> dict[str, Tensor]:
        """Load a checkpoint payload: weights, extra modules, defense states, optimizer, schedule, scaler, RNG.
        Returns the running loss sums of a checkpoint written mid-epoch (empty otherwise)."""
        tr = self.trainer
        load_networks(tr, p)
        tr.state = type(tr.state)(p["epoch"], p["global_step"], p.get("batch", 0), p["best_metric"], p["best_epoch"])
        tr.optimizer.load_state_dict(p["optimizer"])
        tr.scheduler.load_state_dict(p["scheduler"])
        tr.scaler.load_state_dict(p["scaler"])
        tr.guard.skipped = p.get("skipped", 0)
        checkpoint.set_rng_state(p["rng"])
        self.pending = None
        return {k: v.to(tr.device) if isinstance(v, Tensor) else v for k, v in p.get("partial", {}).items()}


class MetricsLog:
    """One line per epoch in ``metrics.jsonl`` (rank 0) and the ``regdefense_log_metrics`` hook (the trackers)."""

    def __init__(self, trainer: ServiceHost) -> None:
        self.trainer = trainer
        self.history: list[dict[str, Any]] = []

    def trim(self, epochs: int) -> None:
        """On resume: keep the lines of the ``epochs`` epochs the checkpoint holds and drop the rest (a run killed
        between an epoch's metrics line and its checkpoint wrote a line the resumed run writes again)."""
        tr = self.trainer
        path = tr.run_dir / "metrics.jsonl" if tr.run_dir is not None else None
        if path is None or not path.exists() or not tr.dist.is_main:
            return
        lines = path.read_bytes().decode(errors="replace").splitlines()  # a line cut short may not even be UTF-8
        kept, history = [], []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(entry, dict) and isinstance(entry.get("epoch"), int) and entry["epoch"] <= epochs:
                kept.append(line)
                history.append(entry)
        if kept != lines:
            write_atomic(path, "".join(k + "\n" for k in kept), "the run's metrics")
        self.history = history

    def append(self, metrics: dict[str, Any]) -> None:
        tr = self.trainer
        self.history.append(metrics)
        if tr.run_dir is not None and tr.dist.is_main:
            try:
                with open(tr.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            except OSError as exc:
                raise UserError(
                    f"cannot append to {tr.run_dir / 'metrics.jsonl'}: {exc.strerror or exc}; "
                    f"free some space and resume with: regdefense train --resume {tr.run_dir}"
                ) from None
        if tr.dist.is_main:  # experiment trackers (regdefense.interop.trackers) and any plugin that logs
            tr.hook.regdefense_log_metrics(trainer=tr, epoch=metrics["epoch"], metrics=metrics)


class Progress:
    """What a person watching sees: the epoch's bar with the running mean of each loss term (read at most once a
    second, since reading a loss waits for the GPU) and, after each epoch, one summary line. ``train.progress=false``
    (``--quiet``) shows neither."""

    #: seconds between two refreshes of the bar's loss terms
    interval = 1.0

    def __init__(self, trainer: ServiceHost) -> None:
        self.trainer = trainer
        self.bar: Any = None
        self._shown = 0.0
        #: where the epoch lines go (the trainer's stderr echo; :func:`regdefense.training.run.train` gives its
        #: caller's)
        self.say: Any = trainer.echo

    @property
    def enabled(self) -> bool:
        return bool(self.trainer.config.train.progress) and self.trainer.dist.is_main

    def wrap(self, loader, epoch: int, start: int = 0):
        """The epoch's batches, behind a bar when progress is on."""
        if not self.enabled:
            self.bar = None
            return loader
        total = self.trainer.config.train.epochs
        self.bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{total}", leave=False, dynamic_ncols=True, initial=start, total=len(loader)
        )
        self._shown = time.monotonic()
        return self.bar

    def batch(self, sums: dict[str, Any]) -> None:
        """Show the running mean of the loss terms summed so far this epoch (at most once a second)."""
        if self.bar is None or not sums.get("_n") or time.monotonic() - self._shown < self.interval:
            return
        self._shown = time.monotonic()
        keys = [k for k in sums if k.startswith("loss_")]
        if keys:  # one read of the device for all the terms
            terms = dict(zip((k[5:] for k in keys), (torch.stack([sums[k] for k in keys]) / sums["_n"]).tolist()))
            shown = {"loss": f"{sum(terms.values()):.4g}"}
            if len(terms) > 1:
                shown.update({k: f"{v:.3g}" for k, v in terms.items()})
            self.bar.set_postfix(shown)

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        """One line per epoch: loss and terms, held-out clean/PGD, learning rate, ε and seconds."""
        self.bar = None
        if self.enabled:
            self.say(epoch_line(metrics, self.trainer.config.train.epochs))


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """E.g. (TRADES, a tiny test run): ``epoch 1/2  loss 2.305 (robust 0.000241, task 2.3)  held-out clean 5.3% PGD
    0.0%  lr 0.075  ε 0.2  0.1 s``."""
    terms = {k[5:]: v for k, v in m.items() if k.startswith("loss_")}
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m.get('loss', float('nan')):.4g}"]
    if len(terms) > 1:
        parts[-1] += " (" + ", ".join(f"{k} {v:.3g}" for k, v in terms.items()) + ")"
    if "val_clean" in m:
        parts.append(f"held-out clean {m['val_clean']:.1%} PGD {m.get('val_robust', float('nan')):.1%}")
    if "val_fgsm" in m:
        parts[-1] += f" FGSM {m['val_fgsm']:.1%}"
    if "lr" in m:
        parts.append(f"lr {m['lr']:.3g}")
    parts.append(f"ε {m.get('eps', 0):.4g}")
    parts.append(f"{m.get('epoch_seconds', 0):.1f} s")
    return "  ".join(parts)
