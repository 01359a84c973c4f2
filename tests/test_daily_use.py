"""Daily-use mismatches (issue 27): what a run reports about itself and whom an error blames."""

import json
from dataclasses import dataclass

import pytest

from regdefense import hookimpl, option
from regdefense.base.errors import UserError
from regdefense.host.defense import Defense
from regdefense.testing import TINY, make_trainer
from regdefense.training.run import train


def test_summary_epochs_counts_the_epochs_trained_not_the_best_one(tmp_path):
    """summary.json said "epochs": 2 for a 3-epoch run whose best checkpoint was epoch 2 (best.pt's state)."""
    res = train(defenses=["none"], overrides=TINY + ["train.epochs=3", "train.lr=8", "train.schedule=constant",
                                                      "eval.select=clean"], out=tmp_path / "run", echo=lambda _m: None)
    labels = [row["model"] for row in res.table]
    assert len(labels) == 2 and labels[0] == "last (epoch 3)", labels  # the setting gives an earlier best epoch
    assert json.loads((res.run_dir / "summary.json").read_text())["epochs"] == 3


class ForgetsToReturn(Defense):
    name = "forgets_to_return"

    @dataclass
    class Config:
        weight: float = option(0.1, "w", ge=0)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        terms["extra"] = self.config.weight * terms["task"]  # ... and no `return terms`


def test_a_loss_wrapper_that_forgets_to_return_is_named():
    trainer = make_trainer(["pgd_at", ForgetsToReturn], ["pgd_at.steps=1"])
    with pytest.raises(UserError, match=r"a wrapper that does not return the terms it received: forgets_to_return"):
        trainer.fit()


# --- never silent (item 1) ----------------------------------------------------------------------

EPOCH_LINE = r"epoch {k}/2  loss [0-9.e+-]+ \(robust [0-9.e+-]+, task [0-9.e+-]+\)  held-out clean \d+\.\d% PGD \d+\.\d%  lr [0-9.e+-]+  ε 0\.2  \d+\.\d s"


def test_training_shows_the_running_loss_and_one_line_per_epoch(tmp_path, capsys, monkeypatch):
    import re

    from regdefense.training.services import Progress

    monkeypatch.setattr(Progress, "interval", 0.0)  # refresh the loss terms at every batch
    lines = []
    train(defenses=["trades"], overrides=TINY + ["train.epochs=2", "train.progress=true", "trades.steps=1"],
          out=tmp_path / "run", echo=lines.append)
    err = capsys.readouterr().err
    assert re.search(r"epoch 2/2: .*loss=[0-9.]+, task=[0-9.]+, robust=[0-9.e-]+", err), err[-600:]  # the bar
    epoch_lines = [m for m in lines if m.startswith("epoch ")]
    assert len(epoch_lines) == 2, lines
    for k, line in enumerate(epoch_lines, 1):
        assert re.fullmatch(EPOCH_LINE.format(k=k), line), line

    quiet = []  # --quiet (train.progress=false): no bar, no epoch line
    train(defenses=["trades"], overrides=TINY + ["train.epochs=2", "trades.steps=1"], out=tmp_path / "q",
          echo=quiet.append)
    assert not [m for m in quiet if m.startswith("epoch ")] and "epoch 1/2" not in capsys.readouterr().err


def test_every_check_shows_a_bar_and_quiet_shows_none(capsys):
    import re

    import torch

    from regdefense.evaluation.runner import evaluate_model
    from regdefense.testing import tiny_config  # noqa: F401  (the same tiny digits as the trainer tests)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    evaluate_model(model, x, y, suites=["quick"], eps=0.1, progress=True, check_samples=12)
    err = capsys.readouterr().err
    for stage in ("check 1/11 (single-step vs iterative): FGSM", "check 2/11 (convergence (steps, restarts)): "
                  "PGD-100 restart 3/3", "check 3/11 (black-box vs white-box): Square", "check 4/11 (very large ε)"):
        assert stage in err, stage
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", err), err[-400:]  # an estimated time left, not tqdm's "<?"
    evaluate_model(model, x, y, suites=["quick"], eps=0.1, progress=False, check_samples=12)
    assert capsys.readouterr().err == ""


# --- the automatic surrogate (item 3) ---------------------------------------------------------


def _folder_dataset(root, n=48, size=10):
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir()
    for split in ("train", "test"):
        np.savez(root / f"{split}.npz", x=rng.random((n, size, size, 1), dtype=np.float32),
                 y=np.arange(n) % 3)
    return root


def test_the_surrogate_states_its_cost_and_is_not_trained_over_the_budget(tmp_path, capsys, monkeypatch):
    import regdefense.evaluation.surrogate as sg
    from regdefense.evaluation.runner import evaluate

    monkeypatch.setenv("REGDEFENSE_CACHE", str(tmp_path / "cache"))
    data = _folder_dataset(tmp_path / "data", size=16)
    run = train(defenses=["none"], overrides=TINY + [f"data.name={data}", "model.name=small_cnn"],
                out=tmp_path / "run", echo=lambda _m: None).run_dir
    kw = {"n": 8, "check_samples": 8, "surrogate_epochs": 1}
    report, _ = evaluate(run, suites=["torchattacks:FGSM(eps=0.1)"], surrogate_budget=0.0, **kw)
    transfer = next(c for c in report.checks if c["name"] == "transfer from a clean surrogate")
    assert transfer["status"] == "skip" and "over the 0 s budget" in transfer["message"], transfer
    assert "small_cnn" in transfer["message"]  # the evaluated architecture, not the data's default
    out = capsys.readouterr().out
    assert "transfer check skipped: a clean small_cnn surrogate (1 epochs × " in out and "would train for about" in out
    assert not (tmp_path / "cache" / "surrogates").exists()

    trained = []
    real = sg.estimate_seconds
    monkeypatch.setattr(sg, "estimate_seconds", lambda *a, **k: trained.append(real(*a, **k)) or trained[-1])
    report, _ = evaluate(run, suites=["torchattacks:FGSM(eps=0.1)"], surrogate="train", surrogate_budget=0.0, **kw)
    transfer = next(c for c in report.checks if c["name"] == "transfer from a clean surrogate")
    assert transfer["status"] in ("pass", "warn") and trained  # asked for: trained over the budget, cost stated
    assert f"about {sg._duration(trained[0][1])}" in capsys.readouterr().out


def test_a_folder_datasets_surrogate_lands_in_the_cache_never_beside_the_data(tmp_path, monkeypatch):
    import os
    import stat

    from regdefense.evaluation.runner import evaluate
    from regdefense.evaluation.surrogate import surrogate_dir

    monkeypatch.setenv("REGDEFENSE_CACHE", str(tmp_path / "cache"))
    data = _folder_dataset(tmp_path / "ro" / "data") if (tmp_path / "ro").mkdir() is None else None
    run = train(defenses=["none"], overrides=TINY + [f"data.name={data}"], out=tmp_path / "run",
                echo=lambda _m: None).run_dir
    before = sorted(p.name for p in (tmp_path / "ro").iterdir())
    for folder in (data, tmp_path / "ro"):  # read-only, as a shared dataset folder is
        os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
    try:
        report, _ = evaluate(run, suites=["torchattacks:FGSM(eps=0.1)"], n=8, check_samples=8, surrogate_epochs=1,
                             progress=False)
    finally:
        for folder in (data, tmp_path / "ro"):
            os.chmod(folder, stat.S_IRWXU)
    transfer = next(c for c in report.checks if c["name"] == "transfer from a clean surrogate")
    assert transfer["status"] in ("pass", "warn"), transfer
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == before == ["data"]
    (made,) = (tmp_path / "cache" / "surrogates").iterdir()
    assert made.name.startswith("data-") and (made / "checkpoints" / "last.pt").exists()
    assert surrogate_dir({"name": str(data)}, {}, 1, 1).parent == tmp_path / "cache" / "surrogates"


# --- evaluations accumulate (item 2) ----------------------------------------------------------


def test_evaluations_accumulate_and_the_best_known_row_sees_every_out_folder(tmp_path):
    from regdefense.evaluation.runner import evaluate

    run = train(defenses=["none"], overrides=TINY, out=tmp_path / "run", echo=lambda _m: None).run_dir
    kw = {"n": 40, "checks": False, "progress": False}
    strong, files = evaluate(run, suites=["quick"], **kw)
    first = files["evaluation"]
    weak, files = evaluate(run, suites=["torchattacks:FGSM(eps=0.02)"], **kw)
    assert first.exists() and (first / "report.md").exists() and files["evaluation"] != first
    assert json.loads((first / "report.json").read_text())["meta"]["suites"] == ["quick"]  # kept, not replaced
    summary = json.loads((run / "eval" / "evaluations.json").read_text())
    assert [s["suites"] for s in summary] == [["quick"], ["torchattacks:FGSM(eps=0.02)"]]
    assert summary[0]["weights_sha256"] == summary[1]["weights_sha256"] and summary[0]["worst_case"] == strong.worst_case
    md = (run / "eval" / "evaluations.md").read_text()
    assert md.count("| [00") == 2 and "001-quick/report.md" in md

    # the same weights at another ε: quick at ε=0.2 on an evaluation written elsewhere
    elsewhere, _ = evaluate(run, suites=["torchattacks:FGSM(eps=0.2)"], out=tmp_path / "B", **kw)
    best = next(r for r in elsewhere.rows if r.kind == "best known")
    assert "PGD-20 (quick)" in elsewhere.meta["best_known"]["attacks"]  # the first evaluation's attacks, elsewhere
    first_best = next(r for r in strong.rows if r.kind == "best known").robust
    assert best.robust <= min(first_best, elsewhere.worst_case) + 1e-9  # it only goes down, wherever it is written


# --- plugin mistakes named, early (item 5) ---------------------------------------------------


class WrongShape(Defense):
    name = "wrong_shape"

    @dataclass
    class Config:
        pass

    @hookimpl
    def regdefense_make_adversarial(self, step):
        return step.inputs.flatten(1)  # flattened images: the model's forward would fail deep inside torch


class VectorTerm(Defense):
    name = "vector_term"

    @dataclass
    class Config:
        pass

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        terms["per_sample"] = terms["task"].detach() * step.labels.float()  # not reduced: backward would fail
        return terms


@pytest.mark.parametrize("defense, says", [
    (WrongShape, r"defense 'wrong_shape' returned an unusable result from regdefense_make_adversarial: has shape "
                 r"\(64, 64\); the batch's images are \(64, 1, 8, 8\)"),
    (VectorTerm, r"'vector_term'.* regdefense_compute_loss: term 'per_sample' has shape \(64,\); each term must be "
                 r"a scalar"),
])
def test_an_unusable_hook_result_names_the_defense_and_error_log_is_written(tmp_path, defense, says):
    trainer = make_trainer([defense], run_dir=tmp_path / "run")
    with pytest.raises(UserError, match=says):
        trainer.fit()
    log = (tmp_path / "run" / "error.log").read_text()
    assert log.startswith("PluginError: ") and defense.name in log.splitlines()[0] and "Traceback" in log


def test_a_run_refused_at_start_up_leaves_an_error_log(tmp_path):
    with pytest.raises(UserError):  # a bad value only the model can refuse: after the run folder exists
        train(defenses=["none"], overrides=TINY + ["model.name=small_cnn"], out=tmp_path / "run", echo=lambda _m: None)
    assert "small_cnn needs images of at least 16×16" in (tmp_path / "run" / "error.log").read_text()


def test_resume_names_the_distribution_of_a_defense_that_is_not_installed(tmp_path, gauss_dist, monkeypatch):
    import sys

    train(defenses=["gauss_noise"], overrides=TINY, out=tmp_path / "run", echo=lambda _m: None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(gauss_dist)])  # the distribution is gone
    sys.modules.pop("thirdparty_gauss", None)
    with pytest.raises(UserError, match=r"'gauss_noise' from regdefense-gauss 1.0: pip install 'regdefense-gauss==1.0'"):
        train(resume=tmp_path / "run", overrides=["train.epochs=2"], echo=lambda _m: None)


def test_train_check_refuses_the_trackers_the_run_would_refuse(monkeypatch):
    import importlib.util

    from regdefense.training.run import check

    with pytest.raises(UserError, match="unknown tracker 'csv'"):
        check(defenses=["pgd_at"], overrides=TINY + ['train.log=["csv"]'])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"the 'wandb' tracker .* needs wandb, not installed: pip install "
                                        r"'regdefense\[wandb\]'"):
        check(defenses=["pgd_at"], overrides=TINY + ['train.log=["wandb"]'])
    assert check(defenses=["pgd_at"], overrides=TINY + ['train.log=["tensorboard"]']).startswith("ok: ")


# --- compare survives real folders (item 4) --------------------------------------------------


def test_compare_survives_real_folders(tmp_path):
    from click.testing import CliRunner

    from regdefense.cli import cli
    from regdefense.sweeps import compare as cmp

    sweep = tmp_path / "sweep"
    quiet = {"echo": lambda _m: None}
    train(defenses=["none"], overrides=TINY, out=sweep / "a" / "seed0", **quiet)  # model.name=auto ...
    train(defenses=["none"], overrides=TINY + ["model.name=digits_cnn", "train.seed=1"], out=sweep / "b" / "seed1",
          **quiet)  # ... and the architecture it picks, named: one recipe
    train(defenses=["none"], overrides=TINY + ["train.lr=0.05"], out=sweep / "c" / "seed0", **quiet)
    with pytest.raises(UserError):  # refused at start-up: a folder with only error.log
        train(defenses=["none"], overrides=TINY + ["model.name=small_cnn"], out=sweep / "refused", **quiet)
    (tmp_path / "empty").mkdir()

    result = CliRunner().invoke(cli, ["compare", str(sweep), str(tmp_path / "empty"), "--plot",
                                      str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    text = result.output
    head, *body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(line.count(" | ") == head.count(" | ") for line in body), text  # the recipe's | are escaped
    both = next(line for line in body if "train.lr=0.1" in line)
    assert "clean \\| digits \\| digits_cnn" in both and "| 2 | 0 |" in both  # auto and digits_cnn: one group
    one = next(line for line in body if "train.lr=0.05" in line)
    assert "(n=1)" in one and "± 0.00" not in one
    assert "measured on — clean: last epoch, 64 points" in text and "PGD: last epoch, 64 points, PGD-2" in text
    assert "not compared (unusable folders):" in text
    assert "refused before training:" in text and "small_cnn needs images of at least 16×16" in text
    assert f"{tmp_path / 'empty'}: not a run directory" in text

    groups = cmp.group([cmp.read_run(r) for r in cmp.find_runs([sweep])])
    assert [m for m, _, _ in cmp.plot_series(groups)] == ["clean", "pgd"]  # no AutoAttack ran: no legend entry
    cmp.split_recipes(rows := [cmp.read_run(r) for r in cmp.find_runs([sweep])])
    labels = cmp.plot_labels(cmp.group(rows))
    assert len(set(labels)) == len(labels) == 2 and (tmp_path / "c.png").stat().st_size > 1000


def test_the_eps_curve_ends_at_the_documented_very_large_eps():
    import torch

    from regdefense.evaluation.runner import evaluate_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    report = evaluate_model(model, x, y, suites=["torchattacks:FGSM(eps=0.2)"], eps=0.2, progress=False,
                            check_samples=8)
    eps = [p["eps"] for p in report.eps_curve]
    assert max(eps) == 0.5 and eps == sorted(eps) and 0.2 in eps  # was 0.6 (3 × 0.2) beside docs saying 0.5


def test_plugins_lists_a_tracker_whose_package_is_missing_as_not_usable(monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from regdefense.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = CliRunner().invoke(cli, ["plugins"]).output
    usable = next(line for line in out.splitlines() if line.startswith("experiment trackers (--log NAME):"))
    assert "tensorboard (regdefense)" in usable and "mlflow" not in usable
    assert "not usable here:\n  mlflow: needs mlflow, not installed: pip install 'regdefense[mlflow]'" in out
