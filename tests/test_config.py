"""Config: dataclasses, TOML run files, -o overrides, and the errors for bad input."""

import json

import pytest

from regdefense.base.config import parse_overrides
from regdefense.base.errors import ConfigError
from regdefense.base.fields import coerce, safe_eval
from regdefense.training.run import load_config


def test_defaults_are_pgd_at_on_digits():
    cfg = load_config()
    assert cfg.defenses == ["pgd_at"] and cfg.data.name == "digits"
    assert cfg.defense["pgd_at"].steps == 10


def test_toml_file_and_overrides_merge(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('defenses = ["pgd_at"]\n[train]\nepochs = 3\nlr = 0.02\n[defense.pgd_at]\nsteps = 5\n')
    cfg = load_config(str(f), overrides=["train.epochs=4", "pgd_at.eps=8/255", "defense.pgd_at.norm=l2"])
    assert cfg.train.epochs == 4 and cfg.train.lr == 0.02
    assert cfg.defense["pgd_at"].steps == 5
    assert cfg.defense["pgd_at"].eps == pytest.approx(8 / 255)
    assert cfg.defense["pgd_at"].norm == "l2"
    assert json.loads(json.dumps(cfg.to_dict()))["defense"]["pgd_at"]["steps"] == 5


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", r"unknown config key 'train.epoch' \(did you mean 'epochs'\?\)"),
    ("trian.epochs=3", r"unknown section 'trian'.*did you mean 'train'"),
    ("train.epochs=three", r"train.epochs must be int"),
    ("train.epochs=0", r"train.epochs must be >= 1"),
    ("pgd_at.eps=-0.1", r"pgd_at.eps must be >= 0"),
    ("train.optimizer=lamb", r"train.optimizer must be one of 'sgd' \| 'adam' \| 'adamw'"),
    ("train.lr=nan", r"train.lr must be"),
    ("epochs", r"must look like section.key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_run_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    orphan = tmp_path / "orphan.toml"
    orphan.write_text('defenses = []\n[defense.pgd_at]\nsteps = 3\n')
    with pytest.raises(ConfigError, match=r"\[defense.pgd_at\] configures a defense that is not in the stack"):
        load_config(str(orphan))
    typo = tmp_path / "typo.toml"
    typo.write_text('[trainn]\nepochs = 3\n')
    with pytest.raises(ConfigError, match="unknown section 'trainn'"):
        load_config(str(typo))


def test_value_parsing():
    assert safe_eval("8/255") == pytest.approx(8 / 255)
    assert safe_eval("[1, 2]") == [1, 2]
    with pytest.raises(ValueError):
        safe_eval("__import__('os')")
    assert coerce("0.5, 0.75", list[float], "k") == [0.5, 0.75]
    assert coerce("none", float | None, "k") is None
    assert coerce("yes", bool, "k") is True
    assert parse_overrides(["a.b=1", "defense.pgd_at.steps=2"]) == {"a": {"b": "1"}, "pgd_at": {"steps": "2"}}


def test_every_defense_config_survives_the_saved_json():
    """config.json and checkpoints store the config as JSON; reading it back must give the same config."""
    from regdefense.host.discovery import catalogue

    for name, info in catalogue().items():
        if info.error:
            continue
        cfg = load_config(defenses=[name])
        again = load_config(raw=json.loads(json.dumps(cfg.to_dict())))
        assert again.to_dict() == cfg.to_dict(), name
