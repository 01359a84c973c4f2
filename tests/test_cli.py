"""The command line: listings, a short end-to-end run, resume, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from regdefense.cli import cli

FAST = ["-o", "train.epochs=1", "-o", "data.limit=128", "-o", "pgd_at.steps=1", "-o", "eval.pgd_steps=1",
        "-o", "eval.test_samples=32", "--quiet"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "regdefense", *args], capture_output=True, text=True, cwd=cwd)


def test_version_lists_core_and_plugin_distributions():
    out = CliRunner().invoke(cli, ["--version"]).output
    assert out.startswith("regdefense ") and "regdefense " in out.splitlines()[1]


def test_plugins_show_lists_config_fields():
    result = CliRunner().invoke(cli, ["plugins", "show", "pgd_at"])
    assert result.exit_code == 0
    for field in ("eps", "alpha", "steps", "norm", "random_start", "attack_mode", "clean_weight"):
        assert field in result.output
    data = json.loads(CliRunner().invoke(cli, ["plugins", "show", "pgd_at", "--json"]).output)
    assert {f["name"] for f in data["config"]} >= {"eps", "steps"} and data["distribution"] == "regdefense"


def test_train_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--out", str(out), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)["table"]
    assert 0 <= table[0]["clean"] <= 1 and "PGD" in table[0]["attack"]
    for f in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "checkpoints/last.pt"):
        assert (out / f).exists(), f
    config = json.loads((out / "config.json").read_text())
    assert config["defenses"] == ["pgd_at"] and "torch" in config["versions"]
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(out), "-o", "train.epochs=2", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "wall time" in resumed.output


def _bad_data(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for split in ("train", "test"):
        np.savez(d / f"{split}.npz", x=np.full((8, 8, 8), 3.0, np.float32), y=np.zeros(8, int))
    return str(d)


@pytest.mark.parametrize("args, message", [
    (["--defense", "pgd_att"], "unknown defense 'pgd_att'"),
    (["-o", "pgd_at.attack=torchattacks:PDG(eps=0.1)"], "unknown torchattacks attack 'PDG'"),
    (["--model", "resnet19"], "unknown model 'resnet19'"),
    (["--dataset", "cifar11"], "unknown dataset 'cifar11'"),
    (["-o", "train.epoch=2"], "unknown config key 'train.epoch'"),
    (["-o", "pgd_at.eps=-0.3"], "pgd_at.eps must be >= 0"),
    (["--dataset", "/no/such/folder"], "does not exist"),
    (["--dataset", "BAD"], r"must lie in [0,1]"),
    (["--defense", "pgd_at", "--defense", "gauss_noise"], "both provide regdefense_make_adversarial"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, gauss_dist, args, message):
    args = [_bad_data(tmp_path) if a == "BAD" else a for a in args]
    result = run("train", *args, "--out", str(tmp_path / "r"), "--quiet", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    advisory = [l for l in result.stderr.splitlines() if l.startswith("warning: ") and "advisories" in l]
    assert len(advisory) <= 1 and all(len(l) < 160 for l in advisory)  # a default install: one short line
    lines = [l for l in result.stderr.splitlines() if l.strip() and l not in advisory]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_existing_run_directory_is_not_overwritten(tmp_path):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.pt").write_bytes(b"a run's checkpoint")
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 2 and "already holds a run" in result.output
