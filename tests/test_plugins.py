"""Plugin host: discovery, activation, the conflict rule, third-party distributions."""

import json
import subprocess
import sys
import pytest
import torch

from regdefense import hookimpl
from regdefense.errors import PluginError
from regdefense.plugins import activate, catalogue, providers



def test_catalogue_lists_builtin_pgd_at_with_distribution():
    info = catalogue()["pgd_at"]
    assert info.error is None and info.builtin
    assert info.dist == "regdefense" and info.version
    assert "regdefense_make_adversarial" in info.hooks


def test_plugins_json_lists_pgd_at(tmp_path):
    out = subprocess.run([sys.executable, "-m", "regdefense", "plugins", "--json"], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["pgd_at"]["distribution"] == "regdefense"
    assert rows["pgd_at"]["version"] and rows["pgd_at"]["status"] == "ok"


def test_third_party_distribution_is_listed_activated_and_trained_with(gauss_dist, tiny_trainer, tmp_path):
    info = catalogue()["gauss_noise"]
    assert info.dist == "regdefense-gauss" and info.version == "1.0" and not info.builtin and info.error is None
    trainer = tiny_trainer(["gauss_noise"], ["gauss_noise.sigma=0.2"], run_dir=tmp_path)
    plugin = trainer.pm.get_plugin("gauss_noise")
    assert plugin.config.sigma == 0.2
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert plugin.calls == len(trainer.train_loader)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # and through the CLI in a fresh process (entry point found via importlib.metadata on PYTHONPATH)
    listing = subprocess.run([sys.executable, "-m", "regdefense", "plugins"], capture_output=True, text=True,
                             check=True, cwd=tmp_path).stdout
    assert "gauss_noise" in listing and "regdefense-gauss 1.0" in listing
    run = subprocess.run([sys.executable, "-m", "regdefense", "train", "--defense", "gauss_noise", "--quiet",
                          "--out", str(tmp_path / "cli-run"), "-o", "train.epochs=1", "-o", "data.limit=128",
                          "-o", "eval.pgd_steps=1", "-o", "eval.test_samples=32"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "cli-run" / "checkpoints" / "last.pt").exists()


def test_broken_plugin_is_listed_not_fatal(make_dist, tmp_path):
    make_dist("regdefense-broken", {"thirdparty_broken": "import not_a_real_module_xyz\n"},
              {"broken_def": "thirdparty_broken:Nope"})
    cat = catalogue()
    assert "not_a_real_module_xyz" in cat["broken_def"].error
    assert cat["pgd_at"].error is None  # others unaffected
    with pytest.raises(PluginError, match="broken_def.*broken"):
        activate(["broken_def"])
    out = subprocess.run([sys.executable, "-m", "regdefense", "plugins"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and "BROKEN" in out.stdout and "pgd_at" in out.stdout


def test_unknown_defense_names_valid_ones():
    with pytest.raises(PluginError, match=r"unknown defense 'pgd_att'.*did you mean 'pgd_at'"):
        activate(["pgd_att"])


class _Adv:
    def __init__(self, name):
        self.name = name

    @hookimpl
    def regdefense_make_adversarial(self, step):
        return step.inputs


class _LossWrapper:
    name = "wrapper"

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self):
        terms = yield
        return terms


def test_two_providers_of_an_exclusive_hook_conflict_naming_both():
    with pytest.raises(PluginError, match="'pgd_at' and 'other' both provide regdefense_make_adversarial"):
        activate(["pgd_at", _Adv("other")])


def test_wrappers_do_not_count_as_providers():
    pm = activate(["pgd_at", _LossWrapper()])
    assert providers(pm, "regdefense_compute_loss") == []
    assert providers(pm, "regdefense_make_adversarial") == ["pgd_at"]


def test_same_defense_twice_is_an_error():
    with pytest.raises(PluginError, match="twice"):
        activate(["pgd_at", "pgd_at"])


def test_misspelled_hook_is_rejected():
    class Typo:
        name = "typo"

        @hookimpl
        def regdefense_batch_strat(self, step):
            pass

    with pytest.raises(PluginError, match="regdefense_batch_strat"):
        activate([Typo()])


def test_core_is_registered_and_runs_last():
    pm = activate([])
    assert pm.get_plugin("core") is not None
    impls = pm.hook.regdefense_make_adversarial.get_hookimpls()
    assert [i.plugin_name for i in impls] == ["core"] and impls[0].trylast


def test_config_classes_are_typed_and_validated():
    from regdefense.config import build
    from regdefense.errors import ConfigError

    cls = catalogue()["pgd_at"].cls.Config
    assert build(cls, {"steps": "7", "eps": "8/255"}, "pgd_at").eps == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="pgd_at.eps must be >= 0"):
        build(cls, {"eps": -0.1}, "pgd_at")
    with pytest.raises(ConfigError, match="attack"):
        build(cls, {"attack": "torchattacks:NotAnAttack"}, "pgd_at")
