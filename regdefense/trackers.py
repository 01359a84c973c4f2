"""Experiment trackers as plugins: TensorBoard, Weights & Biases, MLflow, and whatever a third party installs.

A tracker is a class registered under the ``regdefense.trackers`` entry-point group. A run that asks for it
(``regdefense train --log tensorboard --log wandb``, or ``train.log = ["mlflow"]``) builds one with ``(run_dir,
config)`` and registers it on the run's plugin manager after the defenses, on the main process only. It implements
hooks like a defense: ``regdefense_fit_start`` to open, ``regdefense_log_metrics`` per epoch (the values written to
``metrics.jsonl``: loss terms, ε, learning rate, held-out accuracy, time) and ``regdefense_log_summary`` at the end
(the final table, the cost, ``curves.png``), where it also finishes; ``close()`` is called if the run fails first.

Each built-in imports its package only when chosen; the extras are ``regdefense[tensorboard]``,
``regdefense[wandb]``, ``regdefense[mlflow]`` (all three: ``regdefense[trackers]``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import time
from pathlib import Path
from typing import Any

from regdefense import hookimpl
from regdefense.errors import UserError

GROUP = "regdefense.trackers"
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def available() -> dict[str, md.EntryPoint]:
    return {ep.name: ep for ep in md.entry_points(group=GROUP)}


def check_names(names: list[str]) -> dict[str, md.EntryPoint]:
    """Refuse an unknown tracker name before a run starts, listing the installed ones."""
    eps = available()
    for name in names:
        if name not in eps:
            raise UserError(f"unknown tracker '{name}' (train.log / --log); installed: {', '.join(sorted(eps)) or 'none'}"
                            f"; a third-party tracker registers under the '{GROUP}' entry-point group")
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
            raise UserError(f"the '{name}' tracker needs a package that is not installed ({exc.name or exc}); "
                            + (f"pip install 'regdefense[{extra}]'" if extra else "install its distribution")) from None
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
    rows += [f"| {r['model']} | {100 * r['clean']:.2f}% | {100 * r['robust']:.2f}% | {r['attack']} | {r['n']} |"
             for r in summary.get("table", [])]
    return "\n".join(rows)


def flat_config(config) -> dict[str, Any]:
    """``{"train.lr": 0.1, ...}`` from a RunConfig (lists as text), for trackers' parameter tables."""
    out = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            out |= {f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                    for k, v in values.items()}
        else:
            out[section] = json.dumps(values)
    return out


class Tracker:
    """Base for trackers: ``open``/``log``/``finish``/``close`` wired to the hooks; subclasses fill them in."""

    name = "tracker"

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


class TensorBoard(Tracker):
    """Event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``): scalars per epoch, the final table as
    text, ``curves.png`` as an image."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        super().__init__(run_dir, config)
        self._writer_cls = SummaryWriter

    def open(self, trainer) -> None:
        self.writer = self._writer_cls(log_dir=str(self.run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(self.config.to_dict(), indent=2, default=str) + "\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        step = summary.get("epochs", 0)
        for key, value in final_scalars(summary).items():
            self.writer.add_scalar(key, value, step)
        self.writer.add_text("final table", table_markdown(summary), step)
        if "curves" in files:
            import matplotlib.image

            self.writer.add_image("curves", matplotlib.image.imread(files["curves"])[..., :3], step, dataformats="HWC")

    def finish(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """A Weights & Biases run under ``RUN/wandb``. Offline unless ``WANDB_MODE`` says otherwise (sync later with
    ``wandb sync RUN/wandb/offline-run-*``); project from ``WANDB_PROJECT`` (default ``regdefense``). A resumed
    regdefense run continues the same W&B run."""

    name = "wandb"

    def __init__(self, run_dir: Path, config) -> None:
        import wandb

        super().__init__(run_dir, config)
        self.wandb = wandb

    def open(self, trainer) -> None:
        id_file = self.run_dir / "wandb-id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else self.wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "regdefense"), name=self.run_dir.name,
                                   id=run_id, resume="allow", dir=str(self.run_dir),
                                   mode=os.environ.get("WANDB_MODE", "offline"), config=self.config.to_dict(),
                                   settings=self.wandb.Settings(console="off", quiet=True, silent=True))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values | {"epoch": step}, step=step)

    def summary(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        self.run.summary.update(final_scalars(summary))
        table = self.wandb.Table(columns=["model", "clean", "robust", "attack", "n"],
                                 data=[[r["model"], r["clean"], r["robust"], r["attack"], r["n"]]
                                       for r in summary.get("table", [])])
        extra: dict[str, Any] = {"final table": table}
        if "curves" in files:
            extra["curves"] = self.wandb.Image(str(files["curves"]))
        self.run.log(extra)

    def finish(self) -> None:
        self.run.finish(exit_code=0 if self.summarised else 1)


class MLflow(Tracker):
    """An MLflow run in the tracking store of ``MLFLOW_TRACKING_URI``, by default a local file store beside the run
    directory (``RUN/../mlruns``: ``mlflow ui --backend-store-uri runs/mlruns``); experiment from
    ``MLFLOW_EXPERIMENT_NAME`` (default ``regdefense``). Parameters are the resolved config; the final table,
    ``summary.json`` and ``curves.png`` are artifacts."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config) -> None:
        from mlflow.tracking import MlflowClient

        super().__init__(run_dir, config)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.run_dir.resolve().parent / "mlruns").as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)

    def open(self, trainer) -> None:
        from mlflow.entities import Param

        id_file = self.run_dir / "mlflow-id.txt"
        if id_file.exists():  # a resumed regdefense run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "regdefense")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(self.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def summary(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        self.log(summary.get("epochs", 0), final_scalars(summary))
        self.client.log_text(self.run_id, table_markdown(summary), "final_table.md")
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path))

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if self.summarised else "FAILED")
