"""Export to safetensors and TorchScript: the reloaded model gives the same logits, bit for bit."""

import json

import pytest
import torch
from click.testing import CliRunner

from regdefense.base.errors import UserError
from regdefense.cli import cli
from regdefense.interop.export import export, load


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from regdefense.training.run import train

    out = tmp_path_factory.mktemp("export") / "run"
    return train(defenses=["pgd_at", "ema"], overrides=["train.epochs=2", "train.progress=false", "train.device=cpu",
                                                        "eval.val_samples=32", "eval.pgd_steps=1",
                                                        "model.normalize=true"], out=out, echo=lambda s: None).run_dir


@pytest.mark.parametrize("fmt", ["safetensors", "torch-export", "torchscript"])
def test_an_export_reloads_to_the_same_logits(run, tmp_path, fmt):
    from regdefense.evaluation.runner import load_target

    files = export(run, fmt=fmt, out=tmp_path / fmt)
    info = json.loads(files["config"].read_text())
    assert info["architecture"] == "digits_cnn" and info["input_shape"] == [1, 8, 8] and info["num_classes"] == 10
    assert info["stack"] == ["pgd_at", "ema"] and len(info["source_sha256"]) == 64
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert files["weights"].stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes (was 0600)
    t = load_target(run, n=64, device="cpu")  # what evaluate measures: here the EMA copy, normalisation inside
    with torch.no_grad():  # programs are code: loaded only when trusted
        assert torch.equal(load(tmp_path / fmt, trust_code=True)(t.x), t.model(t.x))
    if fmt == "torch-export":  # torch alone reads it, at any batch size, with input gradients for attacks
        program = torch.export.load(str(files["weights"])).module()
        with torch.no_grad():
            assert torch.equal(program(t.x[:5]), t.model(t.x[:5])) and torch.equal(program(t.x[:1]), t.model(t.x[:1]))
        x = t.x[:3].clone().requires_grad_(True)
        load(tmp_path / fmt, trust_code=True)(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("what", ["torch-export", "model.pt2", "torchscript"])
def test_evaluate_completes_on_a_torch_export_and_a_torchscript_model(run, tmp_path, what):
    import warnings

    from regdefense.evaluation.runner import evaluate

    fmt = "torchscript" if what == "torchscript" else "torch-export"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        files = export(run, fmt=fmt, out=tmp_path / "x")
    target = files["weights"] if what == "model.pt2" else tmp_path / "x"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # reading an existing TorchScript export stays quiet
        report, written = evaluate(target, n=16, check_samples=16, surrogate=None, progress=False, trust_code=True)
    assert written["md"].exists() and 0 <= report.worst_case <= report.clean
    checks = {c["name"]: c for c in report.checks}
    assert len(checks) == 11 and checks["very large ε"]["status"] == "pass"
    if what == "torchscript":  # hooks cannot attach to a ScriptModule: the BPDA check says so, nothing is lost
        assert checks["BPDA (identity) vs white-box"]["message"].startswith("not applicable")


class Detached(torch.nn.Module):
    """Logits that do not depend differentiably on the input: every gradient attack fails on it."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.detach())


def test_autoattack_on_a_model_without_input_gradients_reports_rows_that_did_not_run(run):
    from regdefense.evaluation.runner import evaluate_model, load_target

    t = load_target(run, n=8, device="cpu")
    report = evaluate_model(Detached(t.model), t.x, t.y, suites=["autoattack"], eps=t.default_eps, progress=False,
                            checks=False)
    did_not_run = [w for w in report.warnings if "did not run" in w]
    assert any("APGD-CE" in w for w in did_not_run) and any("FAB-T" in w for w in did_not_run), report.warnings
    assert next(r for r in report.rows if r.kind == "worst case").n == 8


def test_the_export_command_and_its_errors(run, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "ts")])
    assert result.exit_code == 0 and (tmp_path / "ts" / "model.ts").exists(), result.output
    with pytest.raises(UserError, match="unknown export format 'onnx'"):
        export(run, fmt="onnx")
    with pytest.raises(UserError, match="is not a regdefense export"):
        load(tmp_path)


def test_summary_json_says_what_the_run_cost(run):
    summary = json.loads((run / "summary.json").read_text())
    cost = summary["cost"]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import load_data

    n_train = len(load_data(DataConfig()).train)  # the default digits' training split after the held-out part
    expected = len(history) * n_train / sum(h["epoch_seconds"] for h in history)
    assert cost["train_images_per_second"] == pytest.approx(expected)
    assert cost["wall_seconds"] == summary["wall_seconds"] >= sum(h["epoch_seconds"] for h in history)
    assert cost["peak_host_memory_bytes"] > 50 * 2 ** 20  # torch alone takes more than that
    assert (cost["gpus"], cost["gpu_hours"], cost["peak_gpu_memory_bytes"]) == (0, 0.0, None)  # a CPU run


def test_robustbench_model_info_from_the_official_autoattack_evaluation(run, tmp_path):
    """The fields RobustBench's own leaderboard generator documents (parsed from its docstring), filled from the
    run's report; refused until the report has the official AutoAttack."""
    import importlib.util
    import re
    from pathlib import Path

    from regdefense.evaluation.runner import evaluate

    # RobustBench's documented model-info fields, read from its leaderboard generator's source (importing the
    # package needs setuptools' pkg_resources, which a fresh virtual environment may not have)
    where = Path(list(importlib.util.find_spec("robustbench").submodule_search_locations)[0])
    doc = (where / "leaderboard" / "template.py").read_text()
    documented = set(re.findall(r'"(\w+)":', doc[doc.index('"""'):doc.index(":param")]))
    assert {"name", "clean_acc", "autoattack_acc", "eps"} <= documented

    with pytest.raises(UserError, match="--attacks autoattack"):
        export(run, fmt="robustbench", out=tmp_path)
    report, _ = evaluate(run, suites=["autoattack"], n=16, checks=False, progress=False)
    path = export(run, fmt="robustbench", out=tmp_path)["model_info"]
    assert path.relative_to(tmp_path).parts[:3] == ("model_info", "digits", "Linf")
    info = json.loads(path.read_text())
    assert documented <= set(info), documented - set(info)
    aa = next(r for r in report.rows if r.label == "AutoAttack (worst case)")
    assert info["autoattack_acc"] == f"{100 * aa.robust:.2f}" and info["clean_acc"] == f"{100 * report.clean:.2f}"
    assert info["eps"] == "51/255" and info["architecture"] == "digits_cnn"  # L∞ budgets in 255ths, as RobustBench writes them


def test_compare_groups_seeds_by_recipe_and_shows_failed_runs(run, tmp_path):
    import statistics

    from regdefense.training.run import train

    common = ["train.epochs=1", "train.progress=false", "train.device=cpu", "eval.val_samples=32", "eval.pgd_steps=1",
              "data.limit=200"]
    seeds = [train(overrides=[*common, f"train.seed={s}"], out=tmp_path / f"s{s}", echo=lambda m: None).run_dir
             for s in (0, 1)]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((seeds[0] / "config.json").read_text())  # it started, never finished
    (broken / "error.log").write_text("Traceback ...\nNonFiniteLoss: loss term 'task' is NaN at epoch 1")
    plot = tmp_path / "cmp.png"
    result = CliRunner().invoke(cli, ["compare", *map(str, seeds), str(broken), str(run), "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    pgd_at = next(g for g in out["groups"] if g["recipe"] == "pgd_at | digits | digits_cnn" and g["runs"] == 3)
    assert pgd_at["failed"] == 1 and pgd_at["seeds"] == [0, 1]
    pgds = [json.loads((s / "summary.json").read_text())["table"][0]["robust"] for s in seeds]
    mean, std, n = pgd_at["pgd"]
    assert n == 2 and mean == pytest.approx(statistics.fmean(pgds)) and std == pytest.approx(statistics.stdev(pgds))
    assert any(r["status"].startswith("NonFiniteLoss") for r in out["runs"])  # the failed run, with why
    assert plot.exists() and plot.stat().st_size > 1000
    text = CliRunner().invoke(cli, ["compare", *map(str, seeds), str(broken)]).output
    assert "failed or unfinished runs:" in text and "broken" in text
    other = tmp_path / "steps7"  # the same stack, data and model with another setting is another recipe
    other.mkdir()
    cfg = json.loads((seeds[1] / "config.json").read_text())
    cfg["defense"]["pgd_at"]["steps"] = 7
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "summary.json").write_text((seeds[1] / "summary.json").read_text())
    out = json.loads(CliRunner().invoke(cli, ["compare", *map(str, seeds), str(other), "--json"]).output)
    assert {g["recipe"]: g["runs"] for g in out["groups"]} == {"pgd_at | digits | digits_cnn (pgd_at.steps=10)": 2,
                                                               "pgd_at | digits | digits_cnn (pgd_at.steps=7)": 1}


def test_art_attacks_a_torch_export(run, tmp_path):
    from art.attacks.evasion import ProjectedGradientDescent

    from regdefense.evaluation.runner import load_target
    from regdefense.interop.art import to_art_classifier

    export(run, fmt="torch-export", out=tmp_path / "pt2")
    classifier = to_art_classifier(tmp_path / "pt2", trust_code=True)
    t = load_target(run, n=16, device="cpu")
    x = t.x.numpy()
    with torch.no_grad():
        assert (classifier.predict(x).argmax(1) == t.model(t.x).argmax(1).numpy()).all()
    adv = ProjectedGradientDescent(classifier, eps=0.2, eps_step=0.05, max_iter=5, verbose=False).generate(x)
    assert abs(adv - x).max() <= 0.2 + 1e-6
    assert (classifier.predict(adv).argmax(1) == t.y.numpy()).mean() < (classifier.predict(x).argmax(1) == t.y.numpy()).mean()
