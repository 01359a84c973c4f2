"""ART integration, with real ART: the trainer against ART's Madry trainer, BN updates, torch 2 schedulers,
nn.Sequential, DataGenerator, classifier export, the purifier preprocessor, ART attacks in evaluate."""

import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import nn

from regdefense.base.config import DataConfig
from regdefense.data.sources import load_data
from regdefense.interop.art import PurifierPreprocessor, RegDefenseTrainer, to_art_classifier
from regdefense.models import create_model

DATA = load_data(DataConfig(val_fraction=0.0))
X, Y = DATA.train.floats().numpy(), DATA.train.y.numpy()
XT, YT = DATA.test.floats().numpy(), DATA.test.y.numpy()


def _classifier(model, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=opt, input_shape=(1, 8, 8),
                             nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")


def _robust(clf, eps=0.2):
    adv = ProjectedGradientDescent(clf, eps=eps, eps_step=eps / 8, max_iter=20, batch_size=256, verbose=False)
    return float((clf.predict(adv.generate(XT)).argmax(1) == YT).mean())


@pytest.mark.slow  # minutes of CPU: deselected by default, `python -m pytest -m slow` runs it
def test_regdefense_trainer_matches_or_beats_arts_madry_trainer():
    from art.defences.trainer import AdversarialTrainerMadryPGD

    ours, theirs = [], []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        clf = _classifier(model)
        RegDefenseTrainer(clf, ["pgd_at"], {"threat": {"eps": 0.2}, "pgd_at": {"steps": 7}}, seed=seed).fit(
            X, Y, nb_epochs=12, batch_size=128)
        ours.append(_robust(clf))
        model2 = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
        model2.load_state_dict(init)
        clf2 = _classifier(model2)
        torch.manual_seed(seed)
        AdversarialTrainerMadryPGD(clf2, nb_epochs=12, batch_size=128, eps=0.2, eps_step=2.5 * 0.2 / 7,
                                   max_iter=7).fit(X, Y)
        theirs.append(_robust(clf2))
    # 360 test points: one seed's accuracy has a ±5-point interval; compare means over three seeds
    assert np.mean(ours) >= np.mean(theirs) - 0.04, (ours, theirs)
    assert min(ours) > 0.2


def test_batchnorm_statistics_update_and_the_model_ends_in_eval_mode():
    model = create_model("digits_cnn_bn", in_channels=1, num_classes=10, image_size=8)
    bn = model[1]
    before = bn.running_mean.clone()
    clf = _classifier(model)
    RegDefenseTrainer(clf, ["pgd_at"], {"pgd_at": {"steps": 2}}).fit(X[:256], Y[:256], nb_epochs=1, batch_size=64)
    assert not torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 4
    assert not model.training


def test_torch2_lr_schedulers_step_once_per_epoch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # a bare nn.Sequential, which ART's TRADES trainer rejects
    clf = _classifier(model, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(clf.optimizer, step_size=1, gamma=0.5)
    trainer = RegDefenseTrainer(clf, ["trades"], {"trades": {"steps": 2}})
    trainer.fit(X[:256], Y[:256], nb_epochs=3, batch_size=64, scheduler=sched)
    assert clf.optimizer.param_groups[0]["lr"] == pytest.approx(0.125)  # 3 epochs, 4 batches each: 3 steps
    assert trainer.predict(XT[:5]).shape == (5, 10) and trainer.get_classifier() is clf


def test_fit_generator_with_an_art_data_generator():
    from art.data_generators import NumpyDataGenerator

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    clf = _classifier(model)
    before = [p.detach().clone() for p in model.parameters()]
    gen = NumpyDataGenerator(X[:300], np.eye(10)[Y[:300]], batch_size=100, shuffle=True)
    RegDefenseTrainer(clf, ["pgd_at"], {"pgd_at": {"steps": 2}}).fit_generator(gen, nb_epochs=2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_preprocessing_and_clip_range_are_honoured():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=opt, input_shape=(1, 8, 8),
                            nb_classes=10, clip_values=(0.0, 255.0), preprocessing=(100.0, 50.0), device_type="cpu")
    trainer = RegDefenseTrainer(clf, [], {})
    x = torch.rand(4, 1, 8, 8)
    expected = model((x * 255.0 - 100.0) / 50.0)
    assert torch.allclose(trainer.module(x), expected, atol=1e-5)
    trainer.fit(X[:256] * 255.0, Y[:256], nb_epochs=5, batch_size=64)
    assert (clf.predict(XT * 255.0).argmax(1) == YT).mean() > 0.5


def test_to_art_classifier_and_purifier_preprocessor(tmp_path):
    from regdefense.training.run import train

    common = ["train.epochs=1", "data.limit=128", "eval.pgd_steps=1", "eval.test_samples=16", "train.progress=false",
              "train.optimizer=adam", "train.lr=0.001"]
    run = train(defenses=["atop"], overrides=common + ["atop.phase=pretrain"], out=tmp_path / "atop",
                echo=lambda s: None)
    clf = to_art_classifier(run.run_dir)
    assert clf.nb_classes == 10 and clf.input_shape == (1, 8, 8) and clf.predict(XT[:4]).shape == (4, 10)
    pre = PurifierPreprocessor.from_run(run.run_dir)
    out, _ = pre(XT[:4])
    assert out.shape == XT[:4].shape and out.min() >= 0 and out.max() <= 1 and not np.allclose(out, XT[:4])
    base = to_art_classifier(create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8),
                             input_shape=(1, 8, 8), nb_classes=10)
    defended = PyTorchClassifier(model=base.model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                                 clip_values=(0.0, 1.0), preprocessing_defences=[pre], device_type="cpu")
    grad = defended.loss_gradient(XT[:4], np.eye(10)[YT[:4]])  # gradients flow through the purifier
    assert np.abs(grad).sum() > 0


def test_art_black_box_attack_in_evaluate(digits_models):
    from regdefense.evaluation.runner import evaluate_model

    x, y = DATA.test.floats()[:24], DATA.test.y[:24]
    report = evaluate_model(digits_models["clean"], x, y, suites=["art:HopSkipJump(max_iter=2, max_eval=50, "
                                                                  "init_eval=10)"], num_classes=10, checks=False,
                            progress=False)
    row = report.rows[0]
    assert row.spec.startswith("art:HopSkipJump") and row.robust <= report.clean
    assert row.black_box  # decision-based: ART declares it needs no gradients
    assert row.norms["linf_max"] <= report.meta["eps"] + 1e-5  # examples outside the ε-ball were projected onto it
    assert (row.outside > 0) == any("HopSkipJump" in w and "projected" in w for w in report.warnings)


def test_the_bridge_and_arts_madry_trainer_take_the_same_steps_from_the_same_start():
    """Equivalence, order and start made equal: full-batch steps (the order within a batch does not change its mean
    gradient), PGD without a random start, the same initial weights and optimizer; the weights after three steps
    agree to float drift."""
    from art.defences.trainer import AdversarialTrainerMadryPGD

    x, y = X[:512], Y[:512]
    torch.manual_seed(0)
    ours = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    theirs = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
    theirs.load_state_dict(ours.state_dict())
    eps, steps = 0.2, 7
    RegDefenseTrainer(_classifier(ours), ["pgd_at"], {"threat": {"eps": eps},
                                                      "pgd_at": {"steps": steps, "random_start": False}},
                      seed=0).fit(x, y, nb_epochs=3, batch_size=len(x))
    AdversarialTrainerMadryPGD(_classifier(theirs), nb_epochs=3, batch_size=len(x), eps=eps,
                               eps_step=2.5 * eps / steps, max_iter=steps, num_random_init=0).fit(x, y)
    for name, value in ours.state_dict().items():
        assert torch.allclose(value, theirs.state_dict()[name], atol=3e-5, rtol=1e-4), (
            name, float((value - theirs.state_dict()[name]).abs().max()))
