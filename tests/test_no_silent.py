"""No silent wrong answers (issue 26): inputs that used to produce a wrong number without a word are now read
correctly, refused, or said out loud — each test failed on the code before the fix."""

import sys

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from regdefense.base.config import DataConfig
from regdefense.base.errors import ConfigError, UserError
from regdefense.data.sources import load_data
from regdefense.interop.art import RegDefenseTrainer
from regdefense.models import create_model

DATA = load_data(DataConfig(val_fraction=0.0))
X, Y = DATA.train.floats()[:256].numpy(), DATA.train.y[:256].numpy()
XT, YT = DATA.test.floats().numpy(), DATA.test.y.numpy()


def _classifier(seed=0):
    torch.manual_seed(seed)
    model = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=opt, input_shape=(1, 8, 8),
                                    nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")


def _fit(labels, stack=("pgd_at",)):
    model, clf = _classifier()
    RegDefenseTrainer(clf, list(stack), {"pgd_at": {"steps": 2}} if "pgd_at" in stack else {}, seed=0).fit(
        X, labels, nb_epochs=1, batch_size=64)
    return model


def test_art_labels_of_shape_n_by_1_are_class_indices_not_a_width_1_one_hot():
    """(N, 1) used to be arg-maxed over its single column: every label became class 0."""
    reference = _fit(Y)
    column = _fit(Y[:, None])
    one_hot = _fit(np.eye(10, dtype=np.float32)[Y])
    for name, value in reference.state_dict().items():
        assert torch.equal(value, column.state_dict()[name]), name
        assert torch.equal(value, one_hot.state_dict()[name]), name


@pytest.mark.parametrize("labels, says", [
    (np.eye(11, dtype=np.float32)[Y], "do not fit a 10-class classifier"),
    (np.full((len(Y), 10), 0.1, dtype=np.float32), "not one-hot"),
    (np.where(Y == 3, 10, Y), "classifier has 10 classes"),
    (Y.astype(np.float32) + 0.5, "whole class indices"),
    (Y[:, None, None], "labels of shape"),
])
def test_art_label_forms_that_cannot_be_meant_are_refused_saying_what_was_found(labels, says):
    _, clf = _classifier()
    with pytest.raises(UserError, match=says):
        RegDefenseTrainer(clf, ["pgd_at"], seed=0).fit(X, labels, nb_epochs=1, batch_size=64)


def test_none_is_plain_training_in_every_door(tmp_path):
    """`--defense none` worked in the CLI only; the Python API and the ART bridge refused it as unknown."""
    from regdefense.testing import TINY
    from regdefense.training.run import train

    res = train(defenses=["none"], overrides=TINY, out=tmp_path / "run", echo=lambda _m: None)
    assert res.table and (res.run_dir / "checkpoints" / "last.pt").exists()
    import json

    assert json.loads((res.run_dir / "config.json").read_text())["defenses"] == []
    model = _fit(Y, stack=("none",))
    assert any(p.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ConfigError, match="cannot be stacked with pgd_at"):
        train(defenses=["none", "pgd_at"], overrides=TINY, out=tmp_path / "bad", echo=lambda _m: None)
    assert not (tmp_path / "bad").exists()  # refused before a run directory was made


def test_an_linf_budget_of_one_or_more_is_refused_with_the_likely_meaning(tmp_path):
    from regdefense.training.assembly import load_config

    with pytest.raises(ConfigError, match=r"threat.eps=8 .* 8/255 = 0.0314"):
        load_config(defenses=["pgd_at"], overrides=["threat.eps=8"])
    assert load_config(defenses=["pgd_at"], overrides=["threat.norm=l2", "threat.eps=8"]).threat.eps == 8  # L2: fine
    from regdefense.evaluation.runner import evaluate
    from regdefense.testing import TINY
    from regdefense.training.run import train

    run = train(defenses=[], overrides=TINY, out=tmp_path / "run", echo=lambda _m: None).run_dir
    with pytest.raises(ConfigError, match="--eps=8 for L∞"):
        evaluate(run, eps=8, n=8, checks=False, progress=False)


def test_labels_with_empty_classes_are_said_out_loud(tmp_path):
    """A label 57 in 10-class data silently made a 58-class model."""
    from regdefense.data.sources import DataWarning

    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8)).astype(np.float32)
    y = np.arange(40) % 10
    y[0] = 57
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    with pytest.warns(DataWarning, match=r"labels run from 0 to 57, so the model gets 58 outputs, but 47 of those "
                                         r"classes have no image \(10, 11, 12"):
        data = load_data(DataConfig(name=str(tmp_path), val_fraction=0.0))
    assert data.num_classes == 58


def test_an_empty_npz_file_is_named_not_aborted(tmp_path):
    """A 0-byte train.npz printed only `Aborted!` (numpy's EOFError reached click)."""
    from click.testing import CliRunner

    from regdefense.cli import cli

    (tmp_path / "train.npz").write_bytes(b"")
    np.savez(tmp_path / "test.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
    res = CliRunner().invoke(cli, ["train", "--dataset", str(tmp_path), "--check"])
    assert res.exit_code == 2, res.output
    assert "train.npz is not a readable .npz file (0 bytes)" in res.output
    assert "Aborted" not in res.output


def test_an_npz_with_no_samples_is_refused(tmp_path):
    from regdefense.base.errors import DataError

    np.savez(tmp_path / "train.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    np.savez(tmp_path / "test.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
    with pytest.raises(DataError, match=r"train.npz holds no samples \(x of shape \(0, 1, 8, 8\)"):
        load_data(DataConfig(name=str(tmp_path)))


def test_a_corrupt_image_in_an_in_memory_folder_is_named_or_skipped_and_counted(tmp_path):
    from PIL import Image

    from regdefense.base.errors import DataError
    from regdefense.data.sources import DataWarning

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / split / cls / f"{k}.png")
    (tmp_path / "train" / "b" / "9.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot decode image .*train/b/9.png: UnidentifiedImageError.*skip_corrupt"):
        load_data(DataConfig(name=str(tmp_path), stream="off"))
    with pytest.warns(DataWarning, match=r"skipped 1 image\(s\) that do not decode .*9.png"):
        data = load_data(DataConfig(name=str(tmp_path), stream="off", skip_corrupt=True, val_fraction=0.0))
    assert len(data.train) == 6 and data.train.y.tolist().count(1) == 3


def test_switch_on_epochs_the_run_never_reaches_are_reported_at_start_and_by_check(capsys):
    """GAIRAT's burn-in 59 and AWP's warm-up 10 in a 2-epoch run trained exactly PGD-AT, without a word."""
    from regdefense.testing import make_trainer, tiny_config
    from regdefense.training.run import check

    overrides = ["train.epochs=2", "train.eps_warmup_epochs=3"]
    trainer = make_trainer(["pgd_at", "gairat", "awp"], overrides + ["gairat.burn_in_epochs=1", "pgd_at.steps=1"])
    trainer.fit()
    said = capsys.readouterr().err
    assert "awp.warmup_epochs=10: 'awp' never acts in this 2-epoch run (it starts after epoch 10)" in said
    assert "train.eps_warmup_epochs=3: the ramp never completes in this 2-epoch run (it reaches 67% of its end)" in said
    assert "gairat" not in said  # burn-in 1 of 2 epochs: it acts, nothing to say
    summary = check(tiny_config(["fast_at", "gairat", "awp"], overrides))
    assert "never  gairat.burn_in_epochs=59: 'gairat' never acts in this 2-epoch run" in summary
    assert "never  awp.warmup_epochs=10" in summary
    summary = check(tiny_config(["fgsm_pgk"], overrides))
    assert "never  fgsm_pgk.reset_every=10: it never happens in this 2-epoch run" in summary


def test_resume_refuses_edits_that_change_what_the_run_measures_and_allows_more_epochs(tmp_path):
    """A hand-edited config.json (eps 0.2 -> 0.5) or -o pgd_at.steps on --resume used to be taken silently: the table
    then showed an epoch trained at 0.2 evaluated at 0.5."""
    import json

    from regdefense.base.errors import UserError
    from regdefense.testing import TINY
    from regdefense.training.run import train

    run = train(defenses=["pgd_at"], overrides=TINY + ["train.schedule=constant", "pgd_at.steps=1"],
                out=tmp_path / "run", echo=lambda _m: None).run_dir
    config_file = run / "config.json"
    original = config_file.read_text()
    edited = json.loads(original)
    edited["threat"]["eps"] = 0.5
    config_file.write_text(json.dumps(edited))
    with pytest.raises(UserError, match=r"threat.eps default -> 0.5"):
        train(resume=run, echo=lambda _m: None)
    config_file.write_text(original)
    with pytest.raises(UserError, match=r"pgd_at.steps 1 -> 3.*Allowed on resume: train.epochs"):
        train(resume=run, overrides=["pgd_at.steps=3"], echo=lambda _m: None)
    said: list[str] = []
    res = train(resume=run, overrides=["train.epochs=2"], echo=said.append)
    assert "resume: train.epochs 1 -> 2" in said and len(res.history) == 2
    cosine = train(defenses=["pgd_at"], overrides=TINY + ["pgd_at.steps=1"], out=tmp_path / "cos",
                   echo=lambda _m: None).run_dir
    said.clear()
    train(resume=cosine, overrides=["train.epochs=2"], echo=said.append)
    assert any("the cosine learning-rate schedule keeps the horizon of 1 epochs" in line for line in said)


@pytest.mark.parametrize("make", ["GaussianAugmentation", "FeatureSqueezing"])
def test_numpy_preprocessors_applied_at_fit_are_refused_by_name_not_an_index_error(make):
    """ART preprocessors with apply_fit=True crashed fit with an IndexError hiding ART's NotImplementedError."""
    import art.defences.preprocessor as prep

    defence = {"GaussianAugmentation": lambda: prep.GaussianAugmentation(sigma=0.1, augmentation=False, apply_fit=True),
               "FeatureSqueezing": lambda: prep.FeatureSqueezing(clip_values=(0.0, 1.0), bit_depth=4, apply_fit=True)}
    model, _ = _classifier()
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(model.parameters(), 0.05),
                            input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0),
                            preprocessing_defences=[defence[make]()])
    with pytest.raises(UserError, match=rf"{make} with apply_fit=True run in numpy only"):
        RegDefenseTrainer(clf, ["pgd_at"], seed=0).fit(X, Y, nb_epochs=1, batch_size=64)


def test_a_torch_preprocessor_applied_at_fit_trains_through_it():
    from art.defences.preprocessor.preprocessor import PreprocessorPyTorch

    class Darken(PreprocessorPyTorch):  # a real ART PyTorch preprocessing defence, differentiable
        def __init__(self):
            super().__init__(device_type="cpu", is_fitted=True, apply_fit=True, apply_predict=True)

        def forward(self, x, y=None):
            return 0.5 * x, y

    trained = []
    for defences in ([], [Darken()]):
        model, _ = _classifier()
        clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(model.parameters(), 0.05),
                                input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0),
                                preprocessing_defences=defences)
        RegDefenseTrainer(clf, ["none"], seed=0).fit(X, Y, nb_epochs=1, batch_size=64)
        trained.append(model.state_dict())
    assert any(not torch.equal(trained[0][k], trained[1][k]) for k in trained[0])  # the defence was in the graph


def test_first_line_of_an_exception_without_a_message_is_its_type():
    from regdefense.base.errors import first_line

    assert first_line(NotImplementedError()) == "NotImplementedError"
    assert first_line(RuntimeError("shape mismatch\ndetails")) == "shape mismatch"


def test_an_attack_returning_points_outside_the_ball_is_projected_and_said(digits_models):
    """art:HopSkipJump counted examples far outside the ε-ball as successes (robust 4 % at ε 0.2 with L∞ up to 0.96);
    any library's output is now checked against the evaluation's threat model."""
    from regdefense.evaluation.runner import evaluate_model

    model, data = digits_models["pgd_at"], digits_models["data"]
    x, y = data.test.floats(list(range(48))), data.test.y[:48]
    rep = evaluate_model(model, x, y, suites=["torchattacks:FGSM(eps=0.6)"], eps=0.2, progress=False, checks=False)
    row = next(r for r in rep.rows if r.kind == "attack")
    assert row.outside > 0 and row.norms["linf_max"] <= 0.2 + 1e-5  # projected onto the ball before being measured
    assert any(f"{row.outside} of 48 adversarial examples lay outside the linf ball of ε = 0.2" in w
               and "projected" in w for w in rep.warnings)
    plain = evaluate_model(model, x, y, suites=["torchattacks:FGSM(eps=0.2)"], eps=0.2, progress=False, checks=False)
    assert next(r for r in plain.rows if r.kind == "attack").outside == 0  # a well-behaved attack is left alone
    assert row.robust >= next(r for r in plain.rows if r.kind == "attack").robust - 0.25  # not the 0.6 number


def test_score_and_decision_based_attacks_are_marked_black_box():
    from regdefense.attacks.adapter import attack_kind, parse_spec

    assert attack_kind(parse_spec("art:HopSkipJump(max_iter=2)")).black_box
    assert not attack_kind(parse_spec("art:ProjectedGradientDescent(eps=0.1)")).black_box
    assert attack_kind(parse_spec("torchattacks:Square(eps=0.1)")).black_box
    assert not attack_kind(parse_spec("torchattacks:PGD(eps=0.1)")).black_box
    assert attack_kind(parse_spec("torchattacks:PGDL2(eps=0.5)")).norm == "l2"


class _NHWC(nn.Module):
    """A channels-last classifier: the same digits CNN behind a permute."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def test_a_channels_last_art_classifier_trains_as_its_channels_first_twin():
    """channels_first=False failed with a misleading '1-channel vs 8' error."""
    model, clf = _classifier()
    RegDefenseTrainer(clf, ["pgd_at"], {"pgd_at": {"steps": 2}}, seed=0).fit(X, Y, nb_epochs=1, batch_size=64)
    twin, _ = _classifier()
    wrapped = _NHWC(twin)
    clf_last = PyTorchClassifier(model=wrapped, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(twin.parameters(), lr=0.05),
                                 input_shape=(8, 8, 1), nb_classes=10, clip_values=(0.0, 1.0), channels_first=False)
    RegDefenseTrainer(clf_last, ["pgd_at"], {"pgd_at": {"steps": 2}}, seed=0).fit(
        X.transpose(0, 2, 3, 1), Y, nb_epochs=1, batch_size=64)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, twin.state_dict()[name], atol=1e-6), name


def test_inputs_outside_the_clip_range_are_refused_with_the_numbers():
    """[0, 255] data with clip_values=None was clamped to [0, 1] (black and white) without a word."""
    model = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(model.parameters(), 0.05),
                            input_shape=(1, 8, 8), nb_classes=10)
    with pytest.raises(UserError, match=r"inputs span \[0, 255\], outside \[0, 1\] \(the classifier has no clip_values\)"):
        RegDefenseTrainer(clf, ["pgd_at"], seed=0).fit(np.round(X * 255), Y, nb_epochs=1, batch_size=64)
    clf255 = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(model.parameters(), 0.05),
                               input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 255.0))
    RegDefenseTrainer(clf255, ["none"], seed=0).fit(np.round(X * 255), Y, nb_epochs=1, batch_size=64)


def test_auto_picks_a_model_sized_for_the_images_and_says_which(tmp_path, capsys):
    """A folder of 8×8 npz images with model=auto built an 11.2M-parameter CIFAR ResNet."""
    from regdefense.models import default_model
    from regdefense.testing import make_trainer

    assert default_model("my-folder", 8) == "digits_cnn"
    assert default_model("my-folder", 28) == "small_cnn"
    assert default_model("my-folder", 32) == "resnet18"
    assert default_model("digits", 8) == "digits_cnn" and default_model("mnist", 28) == "small_cnn"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=rng.random((40, 1, 8, 8)).astype(np.float32), y=np.arange(40) % 10)
    trainer = make_trainer(["pgd_at"], [f"data.name={tmp_path}", "data.limit=40", "model.name=auto"])
    assert sum(p.numel() for p in trainer.raw_model.parameters()) < 500_000
    assert f"model.name=auto: digits_cnn for 1×8×8 images of '{tmp_path}'" in capsys.readouterr().err


def test_dynat_defaults_fit_the_data_and_the_budget(tmp_path):
    """On data without a known name (the ART bridge's arrays, a folder) of 8×8 images DYNAT's guide was an
    11.2M-parameter ResNet, and its step 0.007 × 10 reached 0.07 against ε 0.2."""
    from regdefense.testing import make_trainer

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=rng.random((40, 1, 8, 8)).astype(np.float32), y=np.arange(40) % 10)
    trainer = make_trainer(["dynat"], [f"data.name={tmp_path}", "data.limit=40", "threat.eps=0.2"])
    guide = trainer.modules["dynat_guide"]
    assert sum(p.numel() for p in guide.parameters()) < 500_000
    dynat = dict(trainer.pm.list_name_plugin())["dynat"]
    assert dynat.config.alpha is None
    seen = {}
    import regdefense_dynat.dynat as mod

    real = mod.pgd

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    mod.pgd = spy
    try:
        from regdefense.host.step import Step

        step = Step.from_batch(next(iter(trainer.train_loader)), trainer.device)
        trainer.hook.regdefense_batch_start(trainer=trainer, step=step)
        trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    finally:
        mod.pgd = real
    assert seen["alpha"] == pytest.approx(0.007 * 0.2 / (8 / 255)) and seen["alpha"] * seen["steps"] >= 0.2


def test_known_vulnerable_dependency_versions_are_found_offline_and_the_cli_says_so(monkeypatch, capsys):
    """torchattacks pins requests~=2.25.1 (never importing it): a default install lands on versions with advisories."""
    import importlib.metadata as md

    import regdefense.advisories as adv

    real = md.version
    installed = {"requests": "2.25.1", "idna": "2.10"}
    monkeypatch.setattr(adv.md, "version", lambda name: installed.get(name) or real(name))
    found = adv.findings()
    assert found[0].startswith("requests 2.25.1: CVE-2023-32681") and "CVE-2024-47081" in found[0]
    assert found[1].startswith("idna 2.10: CVE-2024-3651")
    assert adv.main() == 1 and "remedy: pip install --upgrade 'requests>=2.32.4' 'idna>=3.7'" in capsys.readouterr().out
    installed.update(requests="2.32.4", idna="3.7")
    assert adv.findings() == [] and adv.warning() is None and adv.main() == 0
    installed.update(requests="2.32.3")
    assert adv.findings() == ["requests 2.32.3: CVE-2024-47081 (.netrc credentials leaked to a third-party host) fixed "
                              "in 2.32.4"]
    installed.update(requests="2.25.1")
    from regdefense import cli

    monkeypatch.setattr(sys, "argv", ["regdefense", "--version"])
    with pytest.raises(SystemExit):
        cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["warning: requests 2.25.1 has published advisories; details and the one-line fix: "
                   "python -m regdefense.advisories"]  # one short line, whatever the advisories say
    installed.update(idna="2.10")
    assert adv.warning() == ("warning: requests 2.25.1 and idna 2.10 have published advisories; details and the "
                             "one-line fix: python -m regdefense.advisories")


def _clf(model, loss=None, lr=0.05, optimizer=True):
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer else None
    return PyTorchClassifier(model=model, loss=loss or nn.CrossEntropyLoss(), optimizer=opt, input_shape=(1, 8, 8),
                             nb_classes=10, clip_values=(0.0, 1.0))


def test_art_configs_train_follow_one_rule_fit_arguments_and_the_optimizer_win():
    """configs['train'] batch_size overrode fit's, and epochs/lr/optimizer were ignored without a word."""
    model, clf = _classifier()
    with pytest.raises(UserError, match=r"configs\['train'\]\['batch_size'\]=256 conflicts with fit\(batch_size=64\)"):
        RegDefenseTrainer(clf, ["none"], {"train": {"batch_size": 256}}).fit(X, Y, nb_epochs=1, batch_size=64)
    with pytest.raises(UserError, match=r"configs\['train'\]\['epochs'\]=5 conflicts with fit\(nb_epochs=1\)"):
        RegDefenseTrainer(clf, ["none"], {"train": {"epochs": 5}}).fit(X, Y, nb_epochs=1, batch_size=64)
    with pytest.raises(UserError, match=r"optimizer, lr would never act: the classifier's own optimizer \(SGD, lr 0.05\)"):
        RegDefenseTrainer(clf, ["none"], {"train": {"lr": 0.5, "optimizer": "adam"}}).fit(X, Y, nb_epochs=1)
    torch.manual_seed(0)
    bare = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    own = _clf(bare, optimizer=False)  # no optimizer on the classifier: configs build one, and it acts
    before = {k: v.clone() for k, v in bare.state_dict().items()}
    RegDefenseTrainer(own, ["none"], {"train": {"lr": 0.05, "optimizer": "sgd"}}).fit(X, Y, nb_epochs=1, batch_size=64)
    assert any(not torch.equal(before[k], v) for k, v in bare.state_dict().items())
    with pytest.raises(UserError, match=r"fit does not take verbose"):
        RegDefenseTrainer(clf, ["none"]).fit(X, Y, nb_epochs=1, verbose=True)


def test_repeated_art_fits_start_from_the_users_rates_leave_no_initial_lr_and_no_reseeded_rngs():
    """A per-iteration cosine left lr at 0 for a second fit, leaked 'initial_lr' into the user's optimizer, and
    RegDefenseTrainer(seed=0) reseeded the caller's global RNGs on every fit."""
    import random

    model, clf = _classifier()
    trainer = RegDefenseTrainer(clf, ["none"], {"train": {"schedule": "cosine", "schedule_step": "iter"}}, seed=0)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    trainer.fit(X, Y, nb_epochs=1, batch_size=64)
    assert torch.equal(torch.get_rng_state(), states[0]) and (np.random.get_state()[1] == states[1]).all()
    assert random.getstate() == states[2]
    group = clf.optimizer.param_groups[0]
    assert "initial_lr" not in group and group["lr"] == pytest.approx(0.0, abs=1e-6)  # the cosine ended its fit at 0
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    first_lr = trainer.history[-1]["lr"]  # the rate of the fit's last batch on the cosine from 0.05
    trainer.fit(X, Y, nb_epochs=1, batch_size=64)
    assert any(not torch.equal(after_first[k], v) for k, v in model.state_dict().items())  # it trained again
    assert trainer.history[-1]["lr"] == pytest.approx(first_lr) and first_lr > 1e-3  # the same cosine, not from 0
    clf.optimizer.param_groups[0]["lr"] = 0.02  # a rate the user sets between fits is theirs, not overridden
    trainer.fit(X, Y, nb_epochs=1, batch_size=64)
    assert trainer.history[-1]["lr"] == pytest.approx(first_lr * 0.02 / 0.05)


def test_the_classifiers_loss_is_used_or_refused_and_validation_data_is_the_held_out_split():
    torch.manual_seed(0)
    a = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    b = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    b.load_state_dict(a.state_dict())
    RegDefenseTrainer(_clf(a, nn.CrossEntropyLoss(label_smoothing=0.2)), ["none"], seed=0).fit(X, Y, nb_epochs=1)
    RegDefenseTrainer(_clf(b), ["none"], {"train": {"label_smoothing": 0.2}}, seed=0).fit(X, Y, nb_epochs=1)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name  # the classifier's smoothing acted, as configs' does
    with pytest.raises(UserError, match="is not used by regdefense's objectives"):
        RegDefenseTrainer(_clf(a, nn.NLLLoss()), ["none"]).fit(X, Y, nb_epochs=1)
    trainer = RegDefenseTrainer(_clf(a), ["pgd_at"], {"pgd_at": {"steps": 1}}, seed=0)
    trainer.fit(X, Y, nb_epochs=1, batch_size=64, validation_data=(XT[:32], YT[:32]))
    assert 0.0 <= trainer.history[-1]["val_clean"] <= 1.0 and "val_robust" in trainer.history[-1]
