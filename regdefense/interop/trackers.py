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

import json
import os
import time
from pathlib import Path
from typing import Any

from regdefense.host.tracking import (
    EXTRAS,
    GROUP,
    Tracker,
    attach,
    available,
    check_names,
    close_all,
    final_scalars,
    flat_config,
    scalars,
    table_markdown,
)

__all__ = [
    "EXTRAS",
    "GROUP",
    "MLflow",
    "TensorBoard",
    "Tracker",
    "WandB",
    "attach",
    "available",
    "check_names",
    "close_all",
    "final_scalars",
    "flat_config",
    "scalars",
    "table_markdown",
]


class TensorBoard(Tracker):
    """Event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``): scalars per epoch, the final table as
    text, ``curves.png`` as an image."""

    name = "tensorboard"
    requires = ("tensorboard",)

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
    requires = ("wandb",)

    def __init__(self, run_dir: Path, config) -> None:
        import wandb

        super().__init__(run_dir, config)
        self.wandb = wandb

    def open(self, trainer) -> None:
        id_file = self.run_dir / "wandb-id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else self.wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "regdefense"),
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            config=self.config.to_dict(),
            settings=self.wandb.Settings(console="off", quiet=True, silent=True),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values | {"epoch": step}, step=step)

    def summary(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        self.run.summary.update(final_scalars(summary))
        table = self.wandb.Table(
            columns=["model", "clean", "robust", "attack", "n"],
            data=[[r["model"], r["clean"], r["robust"], r["attack"], r["n"]] for r in summary.get("table", [])],
        )
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
    requires = ("mlflow",)

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
            self.client.log_batch(self.run_id, params=params[i : i + 100])

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
