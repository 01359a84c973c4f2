"""Fault injection: signals, NaN losses, failing defenses, bad data, unwritable or full disks.

Each test causes one fault and checks that the run explains itself and loses nothing (see
docs/reliability.md). Checkpoint corruption and kills during a write are in test_checkpoint.py,
DDP drift in test_distributed.py, config and CLI fuzzing in test_fuzz.py.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from regdefense import hookimpl
from regdefense.base import checkpoint
from regdefense.base.config import DataConfig
from regdefense.base.errors import CheckpointError, DataError, PluginError, UserError
from regdefense.base.safety import NonFiniteLoss, TrainingInterrupted
from regdefense.data.sources import Data, Split, load_data
from regdefense.host.discovery import activate
from regdefense.testing import tiny_config
from regdefense.training.loop import Trainer

# deterministic kernels, random PGD starts, crop+flip augmentation and a per-batch schedule: everything a
# resume has to reproduce
EXACT = ["train.deterministic=true", "train.epochs=2", "data.limit=320", "data.augment=crop_flip"]


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}


class SignalAt:
    """Sends this process a signal at the end of a chosen global step, as a user's Ctrl-C would."""

    name = "signal_at"

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        self.step, self.signum = step, signum

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        if trainer.state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_saves_and_the_resumed_run_ends_with_identical_weights(tmp_path, signum):
    cfg = tiny_config(["pgd_at"], EXACT)
    full = Trainer(cfg, pm=activate(["pgd_at"], cfg.defense), run_dir=tmp_path / "full")
    full.fit()

    cfg = tiny_config(["pgd_at"], EXACT)
    stopped = Trainer(cfg, pm=activate(["pgd_at", SignalAt(6, signum)], cfg.defense), run_dir=tmp_path / "cut")
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN when started in the background
    with pytest.raises(TrainingInterrupted) as info:
        stopped.fit()
    message = str(info.value)
    assert "interrupted at epoch 2, batch 2" in message  # 5 batches per epoch: step 7 is epoch 2's second
    assert f"Resume with: regdefense train --resume {tmp_path / 'cut'}" in message
    assert info.value.exit_code == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after fit
    saved = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["batch"], saved["global_step"]) == (1, 2, 7)

    cfg = tiny_config(["pgd_at"], EXACT)
    resumed = Trainer(cfg, pm=activate(["pgd_at"], cfg.defense), run_dir=tmp_path / "cut")
    resumed.resume_from(tmp_path / "cut" / "checkpoints" / "last.pt")
    history = resumed.fit()
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history[-1]["epoch"] == 2 and history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=1e-6)


def test_a_signal_during_the_held_out_check_finishes_the_epoch_first(tmp_path):
    class SignalInValidation:
        name = "signal_in_val"

        @hookimpl
        def regdefense_epoch_end(self, trainer, epoch, metrics):
            if epoch == 0:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = tiny_config(["pgd_at"], EXACT)
    trainer = Trainer(cfg, pm=activate(["pgd_at", SignalInValidation()], cfg.defense), run_dir=tmp_path)
    with pytest.raises(TrainingInterrupted, match="interrupted at the end of epoch 1"):
        trainer.fit()
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["batch"]) == (1, 0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_sigterm_to_the_cli_writes_a_checkpoint_prints_the_resume_command_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "regdefense", "train", "--quiet", "--epochs", "40", "--out", str(run_dir)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM, as batch schedulers expect
    assert f"Resume with: regdefense train --resume {run_dir}" in err and "Traceback" not in err
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert 1 <= saved["epoch"] < 40
    done = subprocess.run([sys.executable, "-m", "regdefense", "train", "--quiet", "--json", "--resume", str(run_dir),
                           "-o", "train.epochs=" + str(saved["epoch"] + 1)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["table"][0]["model"] == f"last (epoch {saved['epoch'] + 1})"


class PoisonAt:
    """Makes one loss term NaN at chosen global steps."""

    name = "poison"

    def __init__(self, steps) -> None:
        self.steps = set(steps)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step):
        terms = yield
        if trainer.state.global_step in self.steps and trainer.model.training:
            terms["bad_term"] = terms["task"] * float("nan")
        return terms


def test_a_nan_loss_stops_naming_epoch_batch_term_and_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config([], ["train.epochs=3", "data.limit=320"])
    trainer = Trainer(cfg, pm=activate([PoisonAt({6})]), run_dir=tmp_path)
    with pytest.raises(NonFiniteLoss) as info:
        trainer.fit()
    message = str(info.value)
    assert "bad_term became NaN or infinite at epoch 2, batch 2 (step 7)" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'last.pt'}" in message
    assert "train.nonfinite=skip" in message
    good = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_skip_mode_drops_bad_batches_counts_them_and_keeps_weights_finite(tmp_path):
    cfg = tiny_config([], ["train.epochs=2", "data.limit=320", "train.nonfinite=skip"])
    trainer = Trainer(cfg, pm=activate([PoisonAt({1, 3, 6})]), run_dir=tmp_path)
    history = trainer.fit()
    assert history[-1]["skipped_batches"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_skip_mode_gives_up_when_every_batch_is_bad(tmp_path):
    cfg = tiny_config([], ["train.epochs=30", "data.limit=320", "train.nonfinite=skip"])
    trainer = Trainer(cfg, pm=activate([PoisonAt(range(2, 10_000))]), run_dir=tmp_path)
    with pytest.raises(NonFiniteLoss, match="50 batches in a row had NaN or infinite loss terms"):
        trainer.fit()
    assert trainer.state.global_step == 2 + 49  # gave up at the 50th bad batch, not after 30 epochs


def test_a_defense_whose_hook_raises_is_named_and_others_still_work(tmp_path):
    class Buggy:
        name = "buggy"

        @hookimpl
        def regdefense_batch_end(self, trainer, step):
            if trainer.state.global_step == 2:
                raise ZeroDivisionError("division by zero in my update")

    cfg = tiny_config(["pgd_at"], [])
    trainer = Trainer(cfg, pm=activate(["pgd_at", Buggy()], cfg.defense), run_dir=tmp_path)
    with pytest.raises(PluginError) as info:
        trainer.fit()
    message = str(info.value)
    assert "defense 'buggy' failed in regdefense_batch_end: ZeroDivisionError: division by zero" in message
    assert "pgd_at" not in message.split("failed")[0]
    log = (tmp_path / "error.log").read_text()
    assert "Traceback" in log and "ZeroDivisionError" in log
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    cfg = tiny_config(["pgd_at"], [])
    assert Trainer(cfg, pm=activate(["pgd_at"], cfg.defense)).fit()  # the rest of the system is unaffected


RAISING_PLUGIN = '''
from dataclasses import dataclass
from regdefense import hookimpl

class Exploding:
    name = "exploding"

    @dataclass
    class Config:
        pass

    def __init__(self, config):
        self.config = config

    @hookimpl
    def regdefense_epoch_start(self, trainer, epoch):
        raise RuntimeError("my plugin has a bug")
'''


def test_a_third_party_defense_that_raises_fails_the_cli_run_naming_it(make_dist, tmp_path):
    make_dist("regdefense-exploding", {"thirdparty_exploding": RAISING_PLUGIN},
              {"exploding": "thirdparty_exploding:Exploding"})
    run = subprocess.run([sys.executable, "-m", "regdefense", "train", "--quiet", "--defense", "pgd_at", "--defense",
                          "exploding", "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "defense 'exploding' (from regdefense-exploding 1.0) failed in regdefense_epoch_start: RuntimeError: " \
           "my plugin has a bug" in run.stderr
    listing = subprocess.run([sys.executable, "-m", "regdefense", "plugins"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert listing.returncode == 0 and "exploding" in listing.stdout


def test_a_defense_whose_constructor_raises_is_named(make_dist):
    make_dist("regdefense-badinit", {"thirdparty_badinit": RAISING_PLUGIN.replace(
        "self.config = config", "raise KeyError('missing setting')").replace('"exploding"', '"badinit"')},
        {"badinit": "thirdparty_badinit:Exploding"})
    with pytest.raises(PluginError, match=r"defense 'badinit' \(regdefense-badinit 1.0\) could not be created: "
                                          r"KeyError"):
        activate(["badinit"])


# --- data checks ----------------------------------------------------------------------------------


def _data(x, y, num_classes=10, test=None) -> Data:
    return Data(name="mine", train=Split(x, y), val=None, test=test or Split(x[:4], y[:4]), num_classes=num_classes,
                default_eps=0.1)


@pytest.mark.parametrize("make, message", [
    (lambda: _data(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), "the training split is empty"),
    (lambda: _data(torch.rand(16, 8, 8), torch.zeros(16, dtype=torch.long)), "images must be N×C×H×W"),
    (lambda: _data(torch.rand(16, 1, 8, 8), torch.full((16,), 10)), r"labels must lie in \[0, 9\], found \[10, 10\]"),
    (lambda: _data(torch.rand(16, 1, 8, 8), -torch.ones(16, dtype=torch.long)), r"labels must lie in \[0, 9\]"),
    (lambda: _data(torch.rand(16, 1, 8, 8), torch.zeros(12, dtype=torch.long)), "16 images but labels of shape"),
    (lambda: _data(torch.rand(16, 1, 8, 8), torch.zeros(16)), "labels must be integers"),
    (lambda: _data(torch.rand(16, 1, 8, 8).index_fill_(0, torch.tensor([5]), float("nan")),
                   torch.zeros(16, dtype=torch.long)), "image 5 has NaN or infinite pixels"),
    (lambda: _data(torch.rand(16, 1, 8, 8) * 255, torch.zeros(16, dtype=torch.long)), r"must lie in \[0,1\]"),
    (lambda: _data(torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long),
                   test=Split(torch.rand(4, 1, 9, 9), torch.zeros(4, dtype=torch.long))), "test split: images are"),
])
def test_bad_data_is_refused_before_training(make, message):
    cfg = tiny_config([], ["model.name=digits_cnn"])
    with pytest.raises(DataError, match=message):
        Trainer(cfg, pm=activate([]), data=make())


def test_a_model_for_other_channels_is_refused_before_training():
    from regdefense.models import create_model

    grey = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    cfg = tiny_config([], [])
    with pytest.raises(DataError, match="the model takes 1-channel images but the dataset's have 3"):
        Trainer(cfg, pm=activate([]), model=grey, data=_data(torch.rand(16, 3, 8, 8), torch.zeros(16, dtype=torch.long)))


# --- checkpoints from elsewhere -------------------------------------------------------------------


def test_resuming_from_another_models_or_stacks_checkpoint_says_what_differs(tmp_path):
    cfg = tiny_config([], [])
    Trainer(cfg, pm=activate([]), run_dir=tmp_path / "a").fit()
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    other = tiny_config(["pgd_at"], ["model.name=digits_cnn_bn"])
    with pytest.raises(CheckpointError) as info:
        Trainer(other, pm=activate(["pgd_at"], other.defense)).resume_from(ckpt)
    assert "defense stack [] in the file vs ['pgd_at'] in this run" in str(info.value)
    assert "model.name 'auto' in the file vs 'digits_cnn_bn' in this run" in str(info.value)


# --- unwritable places and full disks ---------------------------------------------------------------


def test_an_unwritable_run_directory_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = subprocess.run([sys.executable, "-m", "regdefense", "train", "--quiet", "--out", str(blocker / "run")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"cannot write the run directory {blocker / 'run'}" in run.stderr


def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_previous_one(tmp_path, monkeypatch):
    real_fsync = os.fsync

    class DiskFillsAfterEpoch1:
        name = "disk_fills"

        @hookimpl
        def regdefense_epoch_start(self, trainer, epoch):
            if epoch == 1:
                def full(fd):
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr(os, "fsync", full)

    cfg = tiny_config([], ["train.epochs=3"])
    trainer = Trainer(cfg, pm=activate([DiskFillsAfterEpoch1()]), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="the disk is full; the previous last.pt is intact"):
        trainer.fit()
    monkeypatch.setattr(os, "fsync", real_fsync)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_user_errors_are_user_errors():
    """The reliability errors reach the CLI's one-line handler (exit 2; 130 for a signal)."""
    assert issubclass(NonFiniteLoss, UserError) and issubclass(TrainingInterrupted, UserError)
    assert NonFiniteLoss.exit_code == 2 and TrainingInterrupted.exit_code == 130
    with pytest.raises(DataError):
        load_data(DataConfig(name="no-such-dataset"))
