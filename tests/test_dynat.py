"""DYNAT: the guide learns only from its clean term, dynamic labels carry no gradient, Inner attacks them,
evaluation uses the true labels, and the stacks compose.

The label and loss tests run on BatchNorm target and guide networks with skewed running statistics, the expected
side on copies (the guide in train mode, as the authors' code never puts it in eval mode); the conformance test of
DYNAT's own adversary, with its negative case, is in test_fidelity.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from regdefense.host.step import Step
from regdefense.testing import bn_trainer, far_apart, make_trainer


def _batch_step(trainer, n=48):
    x, y, idx = next(iter(trainer.train_loader))
    step = Step.from_batch((x[:n], y[:n], idx[:n]), trainer.device)
    trainer.hook.regdefense_batch_start(trainer=trainer, step=step)
    return step


class ConstantGuide(torch.nn.Module):
    """A guide that always says class 3 (but still has parameters and a gradient path)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return 0.001 * self.net(x) + 10 * F.one_hot(torch.full((len(x),), 3), 10).float()


def test_dynamic_labels_and_the_loss():
    over = ["pgd_at.steps=2", "dynat.target_weight=0.2", "dynat.guide=digits_cnn_bn"]
    trainer = bn_trainer(["pgd_at", "dynat"], over)
    guide, model = trainer.modules["dynat_guide"], trainer.model
    ref, ref_guide = copy.deepcopy(model).train(), copy.deepcopy(guide)
    model.train()
    step = _batch_step(trainer, 32)
    labels = step.stash["dynat"]
    assert labels.dtype == torch.long and not labels.requires_grad  # an argmax: no gradient
    with torch.no_grad():
        assert torch.equal(labels, ref_guide.train()(step.inputs).argmax(1))  # the guide in train mode, as theirs
        assert far_apart(ref_guide(step.inputs), ref_guide.eval()(step.inputs), atol=1e-2)  # which the test sees
    assert torch.equal(step.targets, step.labels)  # without inner the attack keeps the true labels
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    terms = trainer.loss_terms(step, model)
    ref_guide.train()
    assert terms["task"].item() == pytest.approx(0.2 * F.cross_entropy(ref(step.adv_inputs), labels).item(), rel=1e-5)
    assert terms["guide"].item() == pytest.approx(F.cross_entropy(ref_guide(step.inputs), step.labels).item(), rel=1e-5)


@pytest.mark.parametrize("stack", [["pgd_at", "dynat"], ["trades", "awp", "dynat"]])
def test_the_guide_gets_gradient_only_from_its_own_clean_term(stack):
    ov = ["pgd_at.steps=2", "trades.steps=2", "awp.warmup_epochs=0"]
    trainer = make_trainer(stack, [o for o in ov if o.split(".")[0] in stack])
    for _, plugin in trainer.pm.list_name_plugin():
        if hasattr(plugin, "regdefense_fit_start"):
            plugin.regdefense_fit_start(trainer)
    guide = trainer.modules["dynat_guide"]
    step = _batch_step(trainer)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    trainer.optimizer.zero_grad()
    trainer.hook.regdefense_forward_backward(trainer=trainer, step=step)
    got = [p.grad.clone() for p in guide.parameters()]
    guide.zero_grad()
    F.cross_entropy(guide(step.inputs), step.labels).backward()
    for a, p in zip(got, guide.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_inner_attacks_the_dynamic_labels():
    trainer = bn_trainer(["pgd_at", "dynat"], ["pgd_at.steps=3", "dynat.inner=true"])
    trainer.modules["dynat_guide"] = ConstantGuide(trainer.modules["dynat_guide"])
    ref = copy.deepcopy(trainer.model)
    step = _batch_step(trainer, 32)
    assert (step.targets == 3).all() and not (step.labels == 3).all()
    torch.manual_seed(7)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    torch.manual_seed(7)
    eps = trainer.eps
    ref = torchattacks.PGD(ref, eps=eps, alpha=2.5 * eps / 3, steps=3)(step.inputs, torch.full_like(step.labels, 3))
    assert torch.allclose(adv, ref, atol=1e-6)  # torchattacks runs the (BatchNorm) model in eval mode, as pgd_at


def test_evaluation_uses_the_true_labels():
    trainer = make_trainer(["pgd_at", "dynat"], ["pgd_at.steps=1", "train.epochs=3", "threat.eps=0.05"])
    trainer.modules["dynat_guide"] = ConstantGuide(trainer.modules["dynat_guide"])
    metrics = trainer.fit()[-1]  # the target learns the dynamic label (3) everywhere
    x, y = trainer.data.val.floats()[:64], trainer.data.val.y[:64]
    with torch.no_grad():
        trainer.model.eval()
        truth = (trainer.model(x).argmax(1) == y).float().mean().item()
        dynamic = (trainer.model(x).argmax(1) == 3).float().mean().item()
    assert metrics["val_clean"] == pytest.approx(truth) and truth != dynamic


def test_awp_probe_uses_the_base_objective_with_true_labels():
    trainer = make_trainer(["trades", "awp", "dynat"], ["trades.beta=1", "dynat.awp_probe_robust_factor=6"])
    step = _batch_step(trainer)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    probe = trainer.loss_terms(step, trainer.model, phase="awp")
    model = trainer.model
    assert set(probe) == {"task", "robust"}
    assert probe["task"].item() == pytest.approx(F.cross_entropy(model(step.inputs), step.labels).item(), rel=1e-5)
    from regdefense.host.losses import kl

    assert probe["robust"].item() == pytest.approx(6 * kl(model(step.inputs), model(step.adv_inputs)).mean().item(),
                                                   rel=1e-4)


@pytest.mark.parametrize("stack, extra", [
    (["trades", "awp", "dynat"], ["trades.beta=1", "dynat.target_weight=0.2", "dynat.awp_probe_robust_factor=6"]),
    (["trades", "awp", "dynat"], ["trades.attack=ce", "dynat.inner=true"]),  # DYNAT-Inner-AWP
    (["dynat", "gairat"], ["gairat.burn_in_epochs=0"]),
    (["dynat", "mail"], ["mail.burn_in_epochs=0"]),
    (["trades", "dynat"], []),
    (["dynat"], []),
])
def test_stacks_train_and_the_guide_is_checkpointed(stack, extra, tmp_path):
    from regdefense.base import checkpoint

    ov = ["train.epochs=2", "awp.warmup_epochs=1", "trades.steps=2", "dynat.steps=2"] + extra
    trainer = make_trainer(stack, [o for o in ov if o.split(".")[0] in stack + ["train"]], run_dir=tmp_path)
    history = trainer.fit()
    assert len(history) == 2 and "loss_guide" in history[-1]
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    guide = trainer.modules["dynat_guide"].state_dict()
    assert all(torch.equal(saved["modules"]["dynat_guide"][k], v) for k, v in guide.items())
