"""The attack adapter (torchattacks and ART for real) and the shared PGD maximiser."""

import pytest
import torch
import torchattacks
from torch import nn

from regdefense.attacks.adapter import model_mode, parse_spec, pgd, resolve_attack
from regdefense.base.errors import ConfigError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_spec_parsing():
    spec = parse_spec("torchattacks:PGD(eps=8/255, alpha=2/255, steps=10)")
    assert spec.library == "torchattacks" and spec.name == "PGD"
    assert spec.kwargs == {"eps": pytest.approx(8 / 255), "alpha": pytest.approx(2 / 255), "steps": 10}
    assert parse_spec("art:FastGradientMethod").kwargs == {}


@pytest.mark.parametrize("spec, message", [
    ("PGD(eps=0.1)", "must start with a library"),
    ("foolbox:PGD", "unknown attack library 'foolbox'"),
    ("torchattacks:PDG(eps=0.1)", r"unknown torchattacks attack 'PDG'.*did you mean 'PGD'.*valid: .*FGSM"),
    ("art:ProjectedGradientDecent", r"unknown ART evasion attack.*did you mean 'ProjectedGradientDescent'"),
    ("torchattacks:PGD(epsilon=0.1)", r"PGD has no argument 'epsilon'; valid: eps, alpha, steps, random_start"),
    ("torchattacks:PGD(eps=-1)", "eps must be >= 0"),
    ("torchattacks:PGD(eps=os.system)", "must be a literal"),
    ("torchattacks:PGD(0.1)", "keyword arguments only"),
])
def test_bad_specs_say_what_is_valid(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_attack(spec)


def test_torchattacks_attack_runs_within_budget_and_restores_mode():
    model, (x, y) = _model(), _batch()
    model.train()
    attack = resolve_attack("torchattacks:PGD(eps=0.1, alpha=0.02, steps=5)")
    adv = attack(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad(), model_mode(model, False):
        assert nn.functional.cross_entropy(model(adv), y) > nn.functional.cross_entropy(model(x), y)


def test_art_attack_runs_within_budget():
    model, (x, y) = _model(), _batch()
    attack = resolve_attack("art:ProjectedGradientDescent(eps=0.1, eps_step=0.02, max_iter=5)")
    adv = attack(model, x, y)
    assert adv.dtype == x.dtype and adv.shape == x.shape
    assert (adv - x).abs().max() <= 0.1 + 1e-5 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)
    with torch.no_grad(), model_mode(model, False):
        assert nn.functional.cross_entropy(model(adv), y) > nn.functional.cross_entropy(model(x), y)


def test_our_pgd_matches_torchattacks_without_random_start():
    model, (x, y) = _model(), _batch()
    ours = pgd(model, x, y, eps=0.1, alpha=0.01, steps=7, start=None)
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=7, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_pgd_l2_stays_in_ball_and_box():
    model, (x, y) = _model(), _batch()
    adv = pgd(model, x, y, eps=0.5, alpha=0.2, steps=5, norm="l2")
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1


def test_pgd_leaves_parameter_grads_and_bn_stats_alone():
    model, (x, y) = _model(), _batch()
    bn = model[1]
    stats = bn.running_mean.clone()
    model.train()
    pgd(model, x, y, eps=0.1, alpha=0.02, steps=3)
    assert torch.equal(bn.running_mean, stats)  # eval mode during the attack by default
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    pgd(model, x, y, eps=0.1, alpha=0.02, steps=1, train_mode=True)
    assert not torch.equal(bn.running_mean, stats)
