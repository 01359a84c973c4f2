"""RegMix: AMR and AGR against independent KL computations, the α = β and AMR-off special cases, bases.

On ``digits_cnn_bn`` with skewed BatchNorm running statistics; the expected side forwards a copy of the model taken
before the attack, in train mode (the loop's). RegMix has no published code: no attack mode to hold it to."""

import copy

import pytest
import torch
import torch.nn.functional as F

from regdefense.base.errors import PluginError
from regdefense.host.step import Step
from regdefense.testing import bn_trainer, make_trainer
from regdefense_regmix.regmix import RegMix


def _kl(p_logits, q_logits):
    """KL(p ‖ q) per sample, written out in float64."""
    p, q = F.softmax(p_logits.double(), 1), F.softmax(q_logits.double(), 1)
    return (p * (p.log() - q.log())).sum(1)


def _prepared(stack, overrides=()):
    torch.manual_seed(0)
    trainer = bn_trainer(stack, list(overrides))
    for _, plugin in trainer.pm.list_name_plugin():
        if hasattr(plugin, "regdefense_fit_start"):
            plugin.regdefense_fit_start(trainer)
    x, y, idx = next(iter(trainer.train_loader))
    step = Step.from_batch((x[:32], y[:32], idx[:32]), trainer.device)
    trainer.ref = copy.deepcopy(trainer.model).train()  # for the expected side
    trainer.model.train()
    torch.manual_seed(1)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    return trainer, step


def test_amr_and_agr_equal_independent_kl_computations():
    trainer, step = _prepared(["fgsm_pgk", "regmix"], ["regmix.alpha=1.0", "regmix.beta=0.3", "regmix.lam=2.0"])
    terms = trainer.loss_terms(step, trainer.model)
    ref = trainer.ref
    zi, zf, zc = ref(step.info["x_init"]), ref(step.adv_inputs), ref(step.inputs)
    amr = 1.0 * _kl(zf, zi).mean() + 0.3 * _kl(zi, zf).mean()
    agr = 2.0 * _kl(zc, zf).mean()
    assert terms["amr"].item() == pytest.approx(amr.item(), rel=1e-4, abs=1e-7)
    assert terms["agr"].item() == pytest.approx(agr.item(), rel=1e-4, abs=1e-7)
    assert "consistency" not in terms and "task" in terms  # AMR replaces the MSE term, the CE stays
    # both directions differ, so the weights are not interchangeable
    assert abs(_kl(zf, zi).mean().item() - _kl(zi, zf).mean().item()) > 1e-8


def test_equal_weights_give_the_symmetric_kl():
    torch.manual_seed(0)
    zf, zi = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    reg = RegMix(RegMix.Config(alpha=0.7, beta=0.7))
    sym = 0.7 * (_kl(zf, zi) + _kl(zi, zf)).mean()
    assert reg.amr(zf, zi).item() == pytest.approx(sym.item(), rel=1e-5)
    assert reg.amr(zi, zf).item() == pytest.approx(reg.amr(zf, zi).item(), rel=1e-5)


def test_amr_off_and_no_agr_is_exactly_fgsm_pgk():
    base_trainer, base_step = _prepared(["fgsm_pgk"])
    mix_trainer, mix_step = _prepared(["fgsm_pgk", "regmix"], ["regmix.amr=false", "regmix.lam=0"])
    assert torch.equal(base_step.adv_inputs, mix_step.adv_inputs)
    base = base_trainer.loss_terms(base_step, base_trainer.model)
    mix = mix_trainer.loss_terms(mix_step, mix_trainer.model)
    assert set(base) == set(mix) == {"task", "consistency"}
    assert sum(mix.values()).item() == pytest.approx(sum(base.values()).item(), rel=1e-6)


def test_detach_options_stop_the_right_gradients():
    zf = torch.randn(8, 5, requires_grad=True)
    zi = torch.randn(8, 5, requires_grad=True)
    for mode, flows_f, flows_i in (("none", True, True), ("initial", True, False), ("final", False, True)):
        zf.grad = zi.grad = None
        RegMix(RegMix.Config(amr_detach=mode)).amr(zf, zi).backward()
        assert (zf.grad is not None and zf.grad.abs().sum() > 0) == flows_f, mode
        assert (zi.grad is not None and zi.grad.abs().sum() > 0) == flows_i, mode
    reg = RegMix(RegMix.Config(agr="mix_target", agr_mix=0.25))
    zc, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    target = 0.75 * F.one_hot(y, 5) + 0.25 * F.softmax(zc, 1)
    manual = -(target * F.log_softmax(zf, 1)).sum(1).mean()
    assert reg.agr(zf, zc, y).item() == pytest.approx(manual.item(), rel=1e-5)


def test_amr_on_a_multi_step_base_uses_the_random_start():
    trainer, step = _prepared(["pgd_at", "regmix"], ["pgd_at.steps=3"])
    x_init = step.info["x_init"]
    assert not torch.equal(x_init, step.inputs) and not torch.equal(x_init, step.adv_inputs)
    assert (x_init - step.inputs).abs().max() <= trainer.eps + 1e-6
    terms = trainer.loss_terms(step, trainer.model)
    zi, zf = trainer.ref(x_init), trainer.ref(step.adv_inputs)
    assert terms["amr"].item() == pytest.approx((_kl(zf, zi).mean() + 0.5 * _kl(zi, zf).mean()).item(), rel=1e-4,
                                                abs=1e-7)


def test_regmix_trains_with_the_overfitting_guard_and_needs_a_start_point():
    trainer = make_trainer(["fgsm_pgk", "regmix"], ["train.epochs=2"])
    history = trainer.fit()
    assert {"loss_amr", "loss_agr", "val_fgsm", "co_gap"} <= set(history[-1])
    with pytest.raises(PluginError, match="regmix' reads info.x_init but no active defense publishes it"):
        make_trainer(["pgd_at", "regmix"], ["pgd_at.attack=torchattacks:FGSM(eps=0.1)"])  # refused at activation
