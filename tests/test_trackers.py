"""Experiment trackers: TensorBoard event files, an offline W&B run and an MLflow file store hold the run's metrics,
read back with each tool's own reader; a third-party tracker plugs in through the entry-point group."""

import json

import pytest

from regdefense.base.errors import UserError
from regdefense.training.run import train

COMMON = ["train.epochs=2", "train.progress=false", "train.device=cpu", "eval.val_samples=32", "eval.pgd_steps=1",
          "data.limit=200"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("trackers")
    try:
        run = train(overrides=[*COMMON, 'train.log=["tensorboard", "wandb", "mlflow"]'], out=root / "run",
                    echo=lambda s: None).run_dir
    finally:
        mp.undo()
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, history, json.loads((run / "summary.json").read_text())


def test_tensorboard_event_files_hold_every_epoch_and_the_final_table(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, history, summary = logged
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    clean = acc.Scalars("val/clean")
    assert [e.step for e in clean] == [1, 2]
    assert [e.value for e in clean] == pytest.approx([h["val_clean"] for h in history])
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([h["lr"] for h in history])
    assert [e.value for e in acc.Scalars("loss/task")] == pytest.approx([h["loss_task"] for h in history])
    assert acc.Scalars("final/last_robust")[0].value == pytest.approx(summary["table"][0]["robust"])
    assert "curves" in acc.Tags()["images"]


def _wandb_records(path):
    """History rows and summary updates of an offline W&B run, read with wandb's own transaction-log reader."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    store, history, summary = datastore.DataStore(), [], {}
    store.open_for_scan(str(path))
    while (data := store.scan_data()) is not None:
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary |= {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update}
    return history, summary


def test_an_offline_wandb_run_holds_the_metrics(logged):
    run, history, summary = logged
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1  # `wandb sync` uploads it later
    rows, final = _wandb_records(files[0])
    rows = [r for r in rows if "val/clean" in r]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["val/clean"] for r in rows] == pytest.approx([h["val_clean"] for h in history])
    assert [r["loss/task"] for r in rows] == pytest.approx([h["loss_task"] for h in history])
    assert final["final/last_clean"] == pytest.approx(summary["table"][0]["clean"])
    assert final["cost/wall_seconds"] == pytest.approx(summary["cost"]["wall_seconds"])
    assert list(files[0].parent.glob("files/media/images/curves_*.png"))
    assert list(files[0].parent.glob("files/media/table/final table_*.json"))


def test_an_mlflow_file_store_holds_metrics_params_and_artifacts(logged):
    from mlflow.tracking import MlflowClient

    run, history, summary = logged
    client = MlflowClient(tracking_uri=(run.parent / "mlruns").as_uri())
    run_id = (run / "mlflow-id.txt").read_text().strip()
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.params["train.epochs"] == "2"
    steps = client.get_metric_history(run_id, "val/robust")
    assert [m.step for m in steps] == [1, 2]
    assert [m.value for m in steps] == pytest.approx([h["val_robust"] for h in history])
    assert info.data.metrics["final/last_clean"] == pytest.approx(summary["table"][0]["clean"])
    assert {a.path for a in client.list_artifacts(run_id)} >= {"curves.png", "summary.json", "final_table.md"}


TRACKER = '''
from regdefense.interop.trackers import Tracker

SEEN = []


class Echo(Tracker):
    name = "echo"

    def log(self, step, values):
        SEEN.append(("log", step, values["val/clean"]))

    def summary(self, summary, files):
        SEEN.append(("summary", sorted(files)))

    def finish(self):
        SEEN.append(("finish", self.summarised))
'''


def test_a_third_party_tracker_sees_every_epoch_and_finishes_even_when_the_run_fails(make_dist, tmp_path,
                                                                                        monkeypatch):
    import sys

    from regdefense.training.loop import Trainer

    make_dist("regdefense-echo", {"thirdparty_echo": TRACKER}, {"echo": "thirdparty_echo:Echo"},
              group="regdefense.trackers")
    run = train(overrides=[*COMMON, 'train.log=["echo"]'], out=tmp_path / "ok", echo=lambda s: None).run_dir
    seen = sys.modules["thirdparty_echo"].SEEN
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert seen == [("log", 1, history[0]["val_clean"]), ("log", 2, history[1]["val_clean"]),
                    ("summary", ["curves", "metrics", "summary"]), ("finish", True)]
    seen.clear()

    def disk_full(self, metrics):
        raise UserError("cannot write last.pt: No space left on device")

    monkeypatch.setattr(Trainer, "save_checkpoints", disk_full)
    with pytest.raises(UserError, match="No space left"):
        train(overrides=[*COMMON, 'train.log=["echo"]'], out=tmp_path / "bad", echo=lambda s: None)
    bad = json.loads((tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()[0])
    assert seen == [("log", 1, bad["val_clean"]), ("finish", False)]  # the epoch it saw, then finished as failed


def test_an_unknown_tracker_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match=r"unknown tracker 'tensorbored'.*tensorboard"):
        train(overrides=[*COMMON, 'train.log=["tensorbored"]'], out=tmp_path / "run", echo=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_train_log_option_names_the_tracker(tmp_path):
    from click.testing import CliRunner

    from regdefense.cli import cli

    result = CliRunner().invoke(cli, ["train", "--log", "tensorboard", "--log", "tensorbored", "--out",
                                      str(tmp_path / "r"), "--epochs", "1", "--quiet"])
    assert result.exit_code != 0 and "unknown tracker 'tensorbored'" in result.output


def test_plugins_lists_the_installed_trackers():
    from click.testing import CliRunner

    from regdefense.cli import cli

    out = CliRunner().invoke(cli, ["plugins"]).output
    assert "experiment trackers (--log NAME): mlflow (regdefense), tensorboard (regdefense), wandb (regdefense)" in out
