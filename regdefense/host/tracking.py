"""Experiment trackers as plugins: the machinery (discovery through the ``regdefense.trackers`` entry-point group,
attaching to a run, the :class:`Tracker` base). The built-in TensorBoard, W&B and MLflow trackers live at the edge of
the package (:mod:`regdefense.interop.trackers`) and are found through the same group as a third party's.

A tracker is a class registered under the ``regdefense.trackers`` entry-point group. A run that asks for it
(``regdefense train --log tensorboard --log wandb``, or ``train.log = ["mlflow"]``) builds one with ``(run_dir,
config)`` and registers it on the run's plugin manager after the defenses, on the main process only. It implements
hooks like a defense: ``regdefense_fit_start`` to open, ``regdefense_log_metrics`` per epoch (the values written to
``metrics.jsonl``: loss terms, ε, learning rate, held-out accuracy, time) and ``regdefense_log_summary`` at the end
(the final table, the cost, ``curves.png``), where it also finishes; ``close()`` is called if the run fails first.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
from pathlib import Path
from typing import Any

from regdefense.base.errors import UserError
from regdefense.base.registry import Registry
from regdefense.host.hookspecs import hookimpl

GROUP = "regdefense.trackers"
#: the built-in trackers are entry points of the group too (pyproject.toml), so that each is loaded only when asked
#: for: their packages (tensorboard, wandb, mlflow) are optional
TRACKERS: Registry[type] = Registry("tracker", GROUP, error=UserError)
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def available() -> dict[str, md.EntryPoint]:
    """Every registered tracker by name (usable or not: see :func:`missing`)."""
    return {ep.name: ep for ep in TRACKERS.entry_points()}


def missing(ep: md.EntryPoint) -> str | None:
    """Why the tracker ``ep`` cannot run here (its class fails to load, or a module it ``requires`` is not
    installed), with how to fix it; None when it can. Its package is looked up, not imported."""
    try:
        cls = ep.load()
    except Exception as exc:
        return f"fails to load: {type(exc).__name__}: {exc}"
    absent = [m for m in getattr(cls, "requires", ()) if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    extra = EXTRAS.get(ep.name)
    fix = f"pip install 'regdefense[{extra}]'" if extra else f"pip install {' '.join(absent)}"
    return f"needs {', '.join(absent)}, not installed: {fix}"


def check_names(names: list[str]) -> dict[str, md.EntryPoint]:
    """Refuse an unknown tracker name before a run starts, listing the installed ones."""
    eps = available()
    for name in names:
        if name not in eps:
            raise UserError(
                f"unknown tracker '{name}' (train.log / --log); installed: {', '.join(sorted(eps)) or 'none'}"
                f"; a third-party tracker registers under the '{GROUP}' entry-point group"
            )
        why = missing(eps[name])
        if why is not None:
            raise UserError(f"the '{name}' tracker (train.log / --log) cannot run here: it {why}")
    return eps


def attach(trainer, names: list[str]) -> list[Any]:
    """Build the trackers named in ``names`` for ``trainer``'s run and register them on its plugin manager."""
    if not names or not trainer.dist.is_main or trainer.run_dir is None:
        return []
    eps = check_names(names)
    out = []
    for name in dict.fromkeys(names):
        try:
            cls = eps[name].load()
            tracker = cls(trainer.run_dir, trainer.config)
        except ImportError as exc:
            extra = EXTRAS.get(name)
            raise UserError(
                f"the '{name}' tracker needs a package that is not installed ({exc.name or exc}); "
                + (f"pip install 'regdefense[{extra}]'" if extra else "install its distribution")
            ) from None
        trainer.pm.register(tracker, name=f"log:{name}")
        out.append(tracker)
    return out


def close_all(trackers: list[Any]) -> None:
    """Finish every tracker that has not finished (a failed or interrupted run)."""
    for tracker in trackers:
        try:
            tracker.close()
        except Exception:  # a tracker's own failure must not hide the run's error
            pass


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of an epoch's metrics under tracker-friendly names: ``loss/<term>``, ``val/clean``,
    ``val/robust``, ``train/<other>`` (``train/loss``, ``train/eps``, ``train/lr``, ``train/epoch_seconds``)."""
    out = {}
    for key, value in metrics.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("loss_"):
            key = "loss/" + key[5:]
        elif key.startswith("val_"):
            key = "val/" + key[4:]
        else:  # "loss" (the sum of the terms) too: a file store cannot hold both "loss" and "loss/task"
            key = "train/" + key
        out[key] = float(value)
    return out


def final_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The final table (last and best rows) and the cost as flat numbers."""
    out = {}
    for row in summary.get("table", []):
        which = row["model"].split()[0]  # "last" or "best"
        out[f"final/{which}_clean"] = row["clean"]
        out[f"final/{which}_robust"] = row["robust"]
    for key, value in (summary.get("cost") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"cost/{key}"] = float(value)
    return out


def table_markdown(summary: dict[str, Any]) -> str:
    rows = ["| model | clean | robust | attack | n |", "|---|---|---|---|---|"]
    rows += [
        f"| {r['model']} | {100 * r['clean']:.2f}% | {100 * r['robust']:.2f}% | {r['attack']} | {r['n']} |"
        for r in summary.get("table", [])
    ]
    return "\n".join(rows)


def flat_config(config) -> dict[str, Any]:
    """``{"train.lr": 0.1, ...}`` from a RunConfig (lists as text), for trackers' parameter tables."""
    out: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            out |= {
                f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                for k, v in values.items()
            }
        else:
            out[section] = json.dumps(values)
    return out


class Tracker:
    """Base for trackers: ``open``/``log``/``finish``/``close`` wired to the hooks; subclasses fill them in."""

    name = "tracker"
    #: modules the tracker imports when built: a run refuses it before starting, and ``regdefense plugins`` says so,
    #: when one is not installed
    requires: tuple[str, ...] = ()

    def __init__(self, run_dir: Path, config) -> None:
        self.run_dir, self.config = Path(run_dir), config
        self.opened = self.done = self.summarised = False  # summarised: the run finished (else it failed)

    @hookimpl
    def regdefense_fit_start(self, trainer) -> None:
        if not self.opened:
            self.open(trainer)
            self.opened = True

    @hookimpl
    def regdefense_log_metrics(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.log(epoch, scalars(metrics))

    @hookimpl
    def regdefense_log_summary(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        self.summary(summary, files)
        self.summarised = True
        self.close()

    def close(self) -> None:
        if self.opened and not self.done:
            self.done = True
            self.finish()

    def open(self, trainer) -> None: ...

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def summary(self, summary: dict[str, Any], files: dict[str, Path]) -> None: ...

    def finish(self) -> None: ...
