"""Faults at the seams (issue 32): a second writer, a kill -9 between two writes, a full disk, failed writes, signals,
hostile values. Each test causes the fault for real (another process, SIGKILL, a tiny filesystem, a path that cannot be
written) and checks that nothing is lost and nothing false is reported. Loading crafted model files is in
test_untrusted_files.py, the ledger under concurrent writers in test_ledger_store.py; the random kill -9 sequences
with exact-resume comparisons are benchmarks/faults.py (a table, too slow for the suite).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from regdefense import hookimpl
from regdefense.base import checkpoint
from regdefense.base.errors import ConfigError, UserError
from regdefense.base.files import FolderTaken, WriteError
from regdefense.base.safety import Interrupted, NonFiniteLoss, TrainingInterrupted
from regdefense.cli import cli
from regdefense.evaluation.resume import EvalState
from regdefense.evaluation.runner import evaluate, evaluate_model
from regdefense.host.discovery import activate
from regdefense.testing import tiny_config
from regdefense.training.loop import Trainer
from regdefense.training.run import load_config, locate_resume, train

TINY = ["train.epochs=2", "data.limit=128", "pgd_at.steps=1", "eval.pgd_steps=1", "eval.test_samples=32",
        "eval.val_samples=32", "train.progress=false"]
LONG_PGD = "torchattacks:PGD(eps=0.2, alpha=0.01, steps=400)"


def _cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "regdefense", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def _errors(stderr: str) -> list[str]:
    """stderr without the one-line dependency advisory a default install prints."""
    return [line for line in stderr.splitlines() if line.strip() and "advisories" not in line]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished two-epoch PGD-AT run on 128 digits (a few seconds)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    train(None, overrides=TINY, out=out, echo=lambda _m: None)
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval"))
    return dest


# --- item 8: --out is new, empty, or a run of ours ---------------------------------------------------------------


def test_out_onto_a_users_folder_changes_nothing_and_says_why(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "metrics.jsonl").write_text("my data\n")
    for out in (mine, tmp_path / "mine" / ".." / "mine"):
        with pytest.raises(UserError, match="not a regdefense run; choose a new or empty folder"):
            train(None, overrides=TINY, out=out, echo=lambda _m: None)
    assert (mine / "config.json").read_text() == '{"my": "settings"}'
    assert (mine / "metrics.jsonl").read_text() == "my data\n"
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "metrics.jsonl"]  # not even a lock file
    with pytest.raises(UserError, match="--out is empty"):
        train(None, overrides=TINY, out="", echo=lambda _m: None)


# --- item 9: one writer per run folder ---------------------------------------------------------------------------

HOLD = """
import sys, time
from regdefense.base.files import FolderLock
FolderLock(sys.argv[1], "training").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holder_named_and_a_killed_holder_blocks_nothing(tmp_path, tiny_run):
    run = _copy(tiny_run, tmp_path / "run")
    new = tmp_path / "new"
    holders = [_hold(run), _hold(new)]
    try:
        with pytest.raises(FolderTaken, match=rf"in use by another process \(training, pid {holders[0].pid} on"):
            train(resume=run, overrides=["train.epochs=3"], echo=lambda _m: None)
        with pytest.raises(FolderTaken, match=f"pid {holders[1].pid}"):
            train(None, overrides=TINY, out=new, echo=lambda _m: None)
        assert sorted(p.name for p in new.iterdir()) == [".lock"]  # nothing written by the refused run
    finally:
        for proc in holders:
            proc.kill()  # kill -9: the kernel drops the lock with the process
            proc.wait()
    result = train(None, overrides=TINY, out=new, echo=lambda _m: None)
    assert result.run_dir == new and (new / "checkpoints" / "last.pt").exists()


# --- items 7 and 10: a kill -9 between two writes ----------------------------------------------------------------

KILLER = '''
import os, signal
from dataclasses import dataclass
from pathlib import Path
from regdefense import hookimpl, option

class Killer:
    """kill -9 of its own process at one named point of one epoch, once (a marker file says it happened)."""
    name = "killer"

    @dataclass
    class Config:
        at: str = option("metrics", "metrics (after the epoch's metrics line) or epoch_end (before it)")
        epoch: int = option(2, "the epoch (1-based)")
        marker: str = option("", "file created just before the kill; no kill once it exists")

    def __init__(self, config):
        self.config = config

    def _maybe(self, at, epoch):
        c = self.config
        if c.at == at and epoch == c.epoch and not Path(c.marker).exists():
            Path(c.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)

    @hookimpl
    def regdefense_log_metrics(self, trainer, epoch, metrics):
        self._maybe("metrics", epoch)

    @hookimpl
    def regdefense_epoch_end(self, trainer, epoch, metrics):
        self._maybe("epoch_end", epoch + 1)
'''


@pytest.fixture
def killer(make_dist):
    make_dist("regdefense-killer", {"thirdparty_killer": KILLER}, {"killer": "thirdparty_killer:Killer"})


def _train_cli(out, *overrides, cwd, recipe=None):
    args = ["train", "--out", str(out), "--quiet"]
    args += ["--config", str(recipe)] if recipe else ["--defense", "pgd_at", "--defense", "killer"]
    return _cli(*args, *[a for o in overrides for a in ("-o", o)], cwd=cwd)


def test_kill_9_between_the_metrics_line_and_the_checkpoint_resumes_without_duplicate_epochs(tmp_path, killer):
    marker = tmp_path / "killed"
    settings = [*TINY, "train.epochs=3", "train.deterministic=true", f"killer.marker={marker}", "killer.at=metrics"]
    cut = _train_cli(tmp_path / "cut", *settings, cwd=tmp_path)
    assert cut.returncode == -signal.SIGKILL and marker.exists()
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # epoch 2's line is written, its checkpoint is not
    assert checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = _cli("train", "--resume", str(tmp_path / "cut"), "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    whole = _train_cli(tmp_path / "whole", *settings, cwd=tmp_path)  # the marker exists: no kill this time
    assert whole.returncode == 0, whole.stderr
    a = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the uninterrupted one, bit for bit


def test_kill_9_before_the_first_checkpoint_is_recognised_and_started_again(tmp_path, killer):
    from regdefense.sweeps import sweep

    marker = tmp_path / "killed"
    recipe = tmp_path / "recipes" / "kill.toml"
    recipe.parent.mkdir()
    recipe.write_text('defenses = ["pgd_at", "killer"]\n')
    out = tmp_path / "sweep" / "recipes-kill" / "seed0"
    settings = [*TINY, f"killer.marker={marker}", "killer.at=epoch_end", "killer.epoch=1"]
    cut = _train_cli(out, *settings, "train.seed=0", cwd=tmp_path, recipe=recipe)
    assert cut.returncode == -signal.SIGKILL and marker.exists()
    assert not (out / "checkpoints" / "last.pt").exists() and (out / "config.json").exists()
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / ".last.pt.k3j2x9.tmp").write_bytes(b"regdefense-ckpt\n" + b"\0" * 40)  # cut short
    with pytest.raises(UserError, match="stopped before its first complete checkpoint.*train --out"):
        locate_resume(out)
    lines = []
    jobs = sweep.plan([str(recipe)], [0], tmp_path / "sweep", overrides=[*TINY, f"killer.marker={marker}"])
    assert jobs[0].out == out
    rows = sweep.run(jobs, echo=lines.append, progress=False)
    assert rows[0]["status"] == "ok", lines
    assert any("starting it again" in line for line in lines)
    assert checkpoint.load(out / "checkpoints" / "last.pt")["epoch"] == 2
    assert not list((out / "checkpoints").glob(".last.pt.*.tmp"))


# --- item 11: non-finite weights are never written ---------------------------------------------------------------


class NaNWeightsAt:
    """Overwrites a weight with NaN after the optimizer step of one epoch's last batch (its loss was finite)."""

    name = "nan_weights"

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        if trainer.state.epoch == self.epoch and trainer.state.batch == len(trainer.train_loader) - 1:
            with torch.no_grad():
                next(trainer.raw_model.parameters()).fill_(float("nan"))


def test_nan_weights_after_an_epochs_last_step_are_not_saved_and_the_message_names_the_last_finite(tmp_path):
    cfg = tiny_config(["pgd_at"], ["train.epochs=3", "data.limit=128"])
    trainer = Trainer(cfg, pm=activate(["pgd_at", NaNWeightsAt(1)], cfg.defense), run_dir=tmp_path)
    with pytest.raises(NonFiniteLoss) as info:
        trainer.fit()
    last = tmp_path / "checkpoints" / "last.pt"
    assert f"Last finite checkpoint: {last} (after epoch 1)" in str(info.value)
    for name in ("last.pt", "best.pt"):
        saved = checkpoint.load(tmp_path / "checkpoints" / name)
        assert saved["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    cfg = tiny_config(["pgd_at"], ["train.epochs=3", "data.limit=128"])
    resumed = Trainer(cfg, pm=activate(["pgd_at"], cfg.defense), run_dir=tmp_path)
    resumed.resume_from(last)  # the named checkpoint resumes
    assert resumed.fit()[-1]["epoch"] == 3


# --- items 5, 6 and 12: evaluation writes and signals ------------------------------------------------------------


def test_a_failed_progress_write_stops_the_evaluation_and_is_never_a_did_not_run_row(tmp_path, digits_models):
    data = digits_models["data"].test
    blocker = tmp_path / "a-file"
    blocker.write_text("progress cannot go under a file")
    with pytest.raises(WriteError, match="could not write the evaluation's progress .*a-file/progress.pt"):
        evaluate_model(digits_models["pgd_at"], data.x[:64], data.y[:64], suites=["quick"], eps=0.2, checks=False,
                       progress=False, state_path=blocker / "progress.pt")


def test_progress_that_is_a_list_starts_over_and_one_that_is_a_folder_is_refused(tmp_path):
    torch.save([1, 2], tmp_path / "progress.pt")
    state = EvalState(tmp_path / "progress.pt", {"k": 1})
    assert "holds no evaluation progress (list); starting over" in state.note
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(UserError, match="dir.pt is not a file"):
        EvalState(tmp_path / "dir.pt", {"k": 1})


def test_a_report_that_cannot_be_written_keeps_the_progress_and_says_where(tmp_path, tiny_run):
    out = tmp_path / "eval"
    (out / "evaluations").mkdir(parents=True)  # a folder of ours (an earlier evaluation's) ...
    (out / "report.json").mkdir()  # ... whose report's own name is now taken by a folder
    with pytest.raises(WriteError, match=r"could not write the report .*report.json"):
        evaluate(tiny_run, suites=["quick"], n=32, checks=False, progress=False, out=out)
    saved = torch.load(out / "progress.pt", weights_only=True)  # every attack's points are kept for the rerun
    assert all(entry["done"] == 32 for entry in saved["slots"].values())
    shutil.rmtree(out / "report.json")
    report, _ = evaluate(tiny_run, suites=["quick"], n=32, checks=False, progress=False, out=out)
    assert not (out / "progress.pt").exists() and (out / "report.json").is_file()


def test_a_corrupt_ledger_is_moved_aside_and_an_unwritable_one_still_leaves_the_report(tmp_path, tiny_run,
                                                                                        monkeypatch):
    from regdefense.evaluation import ledger

    ledgers = tmp_path / "ledgers"
    monkeypatch.setenv("REGDEFENSE_LEDGER", str(ledgers))
    ledgers.mkdir()
    sha = ledger.fingerprint(tiny_run / "checkpoints" / "best.pt")
    (ledgers / f"{sha}.json").write_text("[1]")
    report, _ = evaluate(tiny_run, suites=["quick"], n=32, checks=False, progress=False, out=tmp_path / "a")
    assert any("moved aside" in w for w in report.warnings) and report.rows[-1].kind == "best known"
    assert list(ledgers.glob(f"{sha}.json.corrupt-*"))

    monkeypatch.setenv("REGDEFENSE_LEDGER", str(tmp_path / "a" / "report.md" / "ledgers"))  # under a file
    with pytest.raises(UserError, match="the report is written .*, but the best-known ledger could not be updated"):
        evaluate(tiny_run, suites=["quick"], n=32, checks=False, progress=False, out=tmp_path / "b")
    written = json.loads((tmp_path / "b" / "report.json").read_text())
    assert written["worst_case"] is not None and any("no best-known row" in w for w in written["warnings"])
    assert not (tmp_path / "b" / "progress.pt").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB filesystem (tmpfs), where the test may mount one (root); skipped where it cannot."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.strip() or made.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_while_writing_the_report_is_an_error_with_no_empty_image(tiny_run, small_disk):
    with pytest.raises(WriteError, match="the disk is full"):
        evaluate(tiny_run, suites=["quick"], n=32, checks=False, progress=False, out=small_disk)
    assert not [p for p in small_disk.rglob("*.png") if p.stat().st_size == 0]
    assert not [p for p in small_disk.rglob("*.tmp")]  # no temporary file left to fill the disk further
    assert (small_disk / "progress.pt").is_file()


def _signal_later(signum: int, seconds: float, times: int = 1) -> threading.Thread:
    def send():
        for _ in range(times):
            time.sleep(seconds)
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_in_an_evaluation_saves_progress_and_exits_130_with_the_resume_command(tmp_path, tiny_run):
    out = tmp_path / "eval"
    _signal_later(signal.SIGINT, 2.0)
    with pytest.raises(Interrupted) as info:
        evaluate(tiny_run, suites=[LONG_PGD], n=64, checks=False, progress=False, out=out)
    assert info.value.exit_code == 130
    assert "SIGINT: evaluation stopped" in str(info.value) and "resumes from them" in str(info.value)
    assert (out / "progress.pt").is_file()


def test_sigterm_to_evaluate_exits_143_and_the_same_command_resumes(tmp_path, tiny_run):
    args = ["evaluate", str(tiny_run), "--out", str(tmp_path / "eval"), "--n", "64", "--no-checks", "--quiet",
            "--attacks", LONG_PGD]
    proc = subprocess.Popen([sys.executable, "-m", "regdefense", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "eval" / ".lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert _errors(err)[-1].startswith("Error: SIGTERM: evaluation stopped") and "Traceback" not in err
    assert "regdefense evaluate " in err and (tmp_path / "eval" / "progress.pt").is_file()


def test_ctrl_c_outside_training_and_evaluation_exits_130_not_aborted(monkeypatch):
    import regdefense.training.run

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(regdefense.training.run, "check", interrupted)
    result = CliRunner().invoke(cli, ["train", "--check"])
    assert result.exit_code == 130 and "Aborted" not in result.output


def test_sigterm_in_training_exits_143(tmp_path):
    class Term:
        name = "term"

        @hookimpl
        def regdefense_batch_end(self, trainer, step):
            if trainer.state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(["pgd_at"], ["train.epochs=2", "data.limit=128"])
    trainer = Trainer(cfg, pm=activate(["pgd_at", Term()], cfg.defense), run_dir=tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 143 and "Resume with" in str(info.value)


def test_a_hook_that_never_returns_is_named_by_the_signals(tmp_path):
    class Hang:
        name = "hang"

        @hookimpl
        def regdefense_batch_start(self, trainer, step):
            deadline = time.time() + 30  # bounded, so that a broken handler fails the test instead of hanging it
            while time.time() < deadline:
                time.sleep(0.01)

    said = []
    cfg = tiny_config(["pgd_at"], ["train.epochs=1", "data.limit=64"])
    trainer = Trainer(cfg, pm=activate(["pgd_at", Hang()], cfg.defense), run_dir=tmp_path)
    trainer.interrupt.echo = said.append
    _signal_later(signal.SIGINT, 1.0, times=2)
    started = time.time()
    with pytest.raises(Interrupted) as info:
        trainer.fit()
    assert time.time() - started < 20
    assert "now inside regdefense_batch_start of hang" in said[0]  # the first Ctrl-C says where the loop is stuck
    assert "SIGINT again: stopped at once (now inside regdefense_batch_start of hang)" in str(info.value)
    assert info.value.exit_code == 130


# --- item 13: hostile values get one line, not a traceback -------------------------------------------------------


def test_an_override_of_2000_minus_signs_is_a_config_error():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, None, ["train.lr=" + "-" * 2000 + "1"])


@pytest.mark.parametrize("args, message", [
    (["train", "--seed", "99999999999999999999"], "is not in the range 0<=x<=4294967295"),
    (["train", "-o", "train.seed=99999999999999999999"], "train.seed must be <= 4294967295"),
    (["evaluate", "RUN", "--seed", "99999999999999999999"], "is not in the range"),
    (["train", "--out", "x" * 300], "the file name is too long"),
    (["train", "--check", "--out", "BLOCKED/run"], "cannot write the run directory"),
])
def test_hostile_values_are_one_line_errors(tmp_path, args, message):
    (tmp_path / "blocker").write_text("a file where a folder would go")
    args = [str(tmp_path / "blocker/run") if a == "BLOCKED/run" else str(tmp_path) if a == "RUN" else a for a in args]
    result = _cli(*args, "--quiet", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in _errors(result.stderr) if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_check_names_a_usable_out(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--check", "--out", str(tmp_path / "new"), "-o", "data.limit=64"])
    assert result.exit_code == 0, result.output
    assert f"out    {tmp_path / 'new'} (new, writable)" in result.output and not (tmp_path / "new").exists()


# --- done when: two concurrent evaluations of the same weights lose no ledger entry ------------------------------


def test_two_concurrent_evaluations_of_the_same_weights_lose_no_ledger_entry(tmp_path, tiny_run):
    env = dict(os.environ, REGDEFENSE_LEDGER=str(tmp_path / "ledgers"))
    specs = [
        ["torchattacks:FGSM(eps=0.2)", "torchattacks:PGD(eps=0.2, alpha=0.05, steps=2)"],
        ["torchattacks:PGD(eps=0.2, alpha=0.02, steps=3)", "torchattacks:FFGSM(eps=0.2, alpha=0.1)"],
    ]
    procs = [
        subprocess.Popen([sys.executable, "-m", "regdefense", "evaluate", str(tiny_run), "--out",
                          str(tmp_path / f"eval{k}"), "--n", "32", "--no-checks", "--quiet",
                          *[a for s in attacks for a in ("--attacks", s)]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for k, attacks in enumerate(specs)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    (ledger,) = (tmp_path / "ledgers").glob("*.json")
    entries = json.loads(ledger.read_text())["entries"]
    attacks = {a for entry in entries.values() for a in entry["attacks"]}
    assert len(attacks) == 4, attacks  # every attack of both evaluations
    report = json.loads((tmp_path / "eval1" / "report.json").read_text())
    assert report["meta"]["best_known"]["attacks"]  # each report has its best-known row


# --- found by the hostile review of this change ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["checkpoints/mymodel.pt", "eval/report.md", "summary.json"])
def test_a_users_folder_that_looks_half_like_a_run_is_never_cleared(tmp_path, layout):
    """checkpoints/mymodel.pt without a config.json was taken for a run killed early, and deleted."""
    mine = tmp_path / "mine"
    (mine / layout).parent.mkdir(parents=True)
    (mine / layout).write_text("the user's")
    with pytest.raises(UserError, match="not a regdefense run"):
        train(None, overrides=TINY, out=mine, echo=lambda _m: None)
    assert (mine / layout).read_text() == "the user's" and not (mine / ".lock").exists()


def test_a_kill_while_config_json_is_written_leaves_a_run_that_starts_again(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.abc123.tmp").write_text('{"half": ')  # write_atomic's temporary name, cut short
    lines = []
    train(None, overrides=TINY, out=out, echo=lines.append)
    assert any("starting it again" in line for line in lines) and not list(out.glob(".config.json.*.tmp"))


def test_a_lock_file_that_is_a_link_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match=r"cannot take the lock .*\.lock"):
        train(None, overrides=TINY, out=out, echo=lambda _m: None)
    assert victim.read_text() == "precious"


def test_a_signal_during_the_sanity_checks_stops_the_evaluation(tmp_path, tiny_run):
    """The checks catch every Exception (a check must not lose the evaluation): a signal got swallowed there."""
    from regdefense.evaluation import checks

    @checks.check("sends SIGINT", order=0)
    def interrupt(ctx):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        return checks.result("sends SIGINT", True, "not stopped")

    try:
        with pytest.raises(Interrupted) as info:
            evaluate(tiny_run, suites=["torchattacks:FGSM(eps=0.2)"], n=32, check_samples=32, surrogate=None,
                     progress=False, out=tmp_path / "eval")
    finally:
        checks.CHECKS._builtin.pop("sends SIGINT")
    assert info.value.exit_code == 130 and not (tmp_path / "eval" / "report.json").exists()


def test_a_signal_after_the_report_says_the_report_is_written(tmp_path):
    from regdefense.evaluation.runner import _signals_stop

    with pytest.raises(Interrupted, match=r"the report is written \(R.json\) but not yet in the best-known ledger"):
        with _signals_stop(tmp_path, "RUN", {"resume": True, "report": "R.json"}):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    with pytest.raises(Interrupted, match=r"nothing is kept \(--no-resume\)"):
        with _signals_stop(tmp_path, "RUN", {"resume": False}):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)


def test_evaluate_never_writes_over_a_users_report(tmp_path, tiny_run):
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "report.md").write_text("my paper's report")
    with pytest.raises(UserError, match="report.md that no regdefense evaluation wrote there"):
        evaluate(tiny_run, suites=["quick"], n=32, checks=False, progress=False, out=paper)
    assert (paper / "report.md").read_text() == "my paper's report"


def test_a_run_never_inherits_determinism_from_an_earlier_run_in_the_same_process():
    """train.deterministic=true switched torch's deterministic algorithms on for the rest of the process: a later
    run's kernels (and weights) then depended on what ran before it (a test session's order, a notebook)."""
    from regdefense.base.runtime import seed_everything

    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, True)
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0, False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
