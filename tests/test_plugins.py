"""Plugin host: discovery, activation, the conflict rule, third-party distributions."""

import json
import subprocess
import sys

import pytest
import torch

from regdefense import hookimpl
from regdefense.base.errors import PluginError, UserError
from regdefense.host.discovery import activate, catalogue, providers


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
    from regdefense.base.errors import ConfigError
    from regdefense.base.fields import build

    cls = catalogue()["pgd_at"].cls.Config
    assert build(cls, {"steps": "7", "eps": "8/255"}, "pgd_at").eps == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="pgd_at.eps must be >= 0"):
        build(cls, {"eps": -0.1}, "pgd_at")
    with pytest.raises(ConfigError, match="attack"):
        build(cls, {"attack": "torchattacks:NotAnAttack"}, "pgd_at")


MALFORMED = '''
from dataclasses import dataclass
from regdefense import hookimpl

class Base:
    @dataclass
    class Config:
        pass

    def __init__(self, config):
        self.config = config

class Unmarked(Base):
    name = "unmarked"
    def regdefense_batch_end(self, step):
        pass

class Typo(Base):
    name = "typo"
    @hookimpl
    def regdefense_epoch_ends(self, trainer):
        pass

class WrongArg(Base):
    name = "wrong_arg"
    @hookimpl
    def regdefense_batch_end(self, trainer, batch):
        pass

class Mismatch(Base):
    name = "other_name"
    @hookimpl
    def regdefense_batch_end(self, step):
        pass

class NoYield(Base):
    name = "no_yield"
    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        return {}
'''


def test_malformed_plugins_are_flagged_when_listed_with_the_reason(make_dist, tmp_path):
    make_dist("regdefense-malformed", {"thirdparty_malformed": MALFORMED},
              {"unmarked": "thirdparty_malformed:Unmarked", "typo": "thirdparty_malformed:Typo",
               "wrong_arg": "thirdparty_malformed:WrongArg", "mismatch": "thirdparty_malformed:Mismatch",
               "no_yield": "thirdparty_malformed:NoYield"})
    cat = catalogue()
    assert "regdefense_batch_end lacks the @hookimpl marker" in cat["unmarked"].error
    assert "regdefense_epoch_ends is not a hook" in cat["typo"].error
    assert "did you mean 'regdefense_epoch_end'" in cat["typo"].error
    assert "regdefense_batch_end takes batch, which the hook does not pass" in cat["wrong_arg"].error
    assert "named 'mismatch' but the class says name = 'other_name'" in cat["mismatch"].error
    assert "regdefense_compute_loss is marked wrapper=True but never yields" in cat["no_yield"].error
    out = subprocess.run([sys.executable, "-m", "regdefense", "plugins"], capture_output=True, text=True,
                         cwd=tmp_path)
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    for name in ("unmarked", "typo", "wrong_arg", "mismatch", "no_yield"):
        assert "BROKEN" in rows[name] and f"(plugins show {name})" in rows[name], rows[name]
    assert max(len(line) for line in out.stdout.splitlines() if "BROKEN" in line) < 200  # the reasons are cut
    assert " ok " in rows["pgd_at"]
    with pytest.raises(PluginError, match="typo.*regdefense_epoch_ends is not a hook"):
        activate(["typo"])


def test_an_uninstalled_plugin_class_can_be_activated_and_is_validated_too():
    class Counting:
        name = "counting"

        class Config:
            pass

        def __init__(self, config):
            self.steps = 0

        @hookimpl
        def regdefense_batch_end(self, step):
            self.steps += 1

    pm = activate(["pgd_at", Counting])
    assert isinstance(pm.get_plugin("counting"), Counting)

    class Unmarked(Counting):
        name = "unmarked"

        def regdefense_epoch_end(self, trainer):
            pass

    with pytest.raises(PluginError, match="regdefense_epoch_end lacks the @hookimpl marker"):
        activate([Unmarked])


def test_blame_names_the_hook_that_was_running_and_the_helper(tiny_trainer):
    class Helpful:
        name = "helpful"

        class Config:
            pass

        def _update(self):
            raise ValueError("bad buffer")

        @hookimpl
        def regdefense_batch_end(self):
            self._update()

    trainer = tiny_trainer(["pgd_at", Helpful()])
    with pytest.raises(PluginError, match=r"defense 'helpful' failed in regdefense_batch_end \(in _update\): ValueError"):
        trainer.fit()


def test_a_modifier_that_needs_an_adversary_is_refused_without_one():
    class ALP:
        """Adversarial logit pairing as a plugin author would write it: a term that needs adversarial inputs."""

        name = "alp"
        requires = ("make_adversarial",)

        class Config:
            pass

        @hookimpl(wrapper=True)
        def regdefense_compute_loss(self, step, model):
            terms = yield
            terms["alp"] = (model(step.inputs) - model(step.adv_inputs)).pow(2).mean()
            return terms

    with pytest.raises(PluginError, match="'alp' needs a defense that provides make_adversarial.*pgd_at"):
        activate([ALP()])
    activate(["pgd_at", ALP()])
    with pytest.raises(PluginError, match="'mail' needs a defense that provides make_adversarial"):
        activate(["mail"])


CURVELOG = '''
from dataclasses import dataclass
import copy
from regdefense import hookimpl, option

class CurveLog:
    """Logs the loss curvature proxy per epoch: a training-only defense."""
    name = "curvelog"

    @dataclass
    class Config:
        every: int = option(1, "log every N epochs", ge=1)

    def __init__(self, config):
        self.config = config

    @hookimpl
    def regdefense_epoch_end(self, metrics):
        metrics["curvelog"] = 1.0

class Averaged:
    """Evaluates a frozen copy of the weights: builds the evaluated model."""
    name = "averaged"

    @dataclass
    class Config:
        pass

    def __init__(self, config):
        self.model = None

    @hookimpl
    def regdefense_fit_start(self, trainer):
        self.model = copy.deepcopy(trainer.raw_model).eval()

    @hookimpl
    def regdefense_eval_model(self, trainer):
        return self.model
'''


def test_a_run_evaluates_after_its_training_only_defense_is_uninstalled(make_dist, tmp_path):
    import importlib

    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    site = make_dist("regdefense-curvelog", {"thirdparty_curvelog": CURVELOG},
                     {"curvelog": "thirdparty_curvelog:CurveLog", "averaged": "thirdparty_curvelog:Averaged"},
                     version="2.3")
    common = ["train.epochs=1", "train.progress=false", "train.device=cpu", "data.limit=192", "eval.val_samples=32",
              "eval.pgd_steps=1"]
    only_trained = train(defenses=["pgd_at", "curvelog"], overrides=common, out=tmp_path / "a", echo=lambda s: None)
    builds = train(defenses=["pgd_at", "averaged"], overrides=common, out=tmp_path / "b", echo=lambda s: None)
    sys.path.remove(str(site))  # uninstall
    importlib.invalidate_caches()
    assert "curvelog" not in catalogue()
    report, _ = evaluate(only_trained.run_dir, suites=["quick"], n=20, progress=False, checks=False)
    assert report.meta["not_installed_training_only"] == ["curvelog"] and report.meta["stack"] == ["pgd_at"]
    with pytest.raises(UserError, match=r"'averaged' \(regdefense-curvelog 2.3\), which builds the evaluated model.*"
                                        r"pip install 'regdefense-curvelog==2.3'"):
        evaluate(builds.run_dir, suites=["quick"], n=20, progress=False, checks=False)
