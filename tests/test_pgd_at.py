"""PGD-AT: its loss equals cross-entropy on PGD examples computed independently (torchattacks), on a BatchNorm
model whose running statistics differ from any batch's, so the attack's model mode is seen."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from regdefense.host.step import Step
from regdefense.testing import bn_trainer, far_apart


def _step(trainer, n=32):
    x, y, idx = next(iter(trainer.train_loader))
    return Step.from_batch((x[:n], y[:n], idx[:n]), trainer.device)


@pytest.mark.parametrize(
    "clean_weight, flip",
    [(0.0, None), (0.5, None), (0.0, "pgd_at.attack_mode=train")],
    ids=["adv_only", "mixed", "mode_flipped"],
)
def test_pgd_at_loss_equals_ce_on_independent_pgd_examples(clean_weight, flip):
    """On the BatchNorm digits CNN with skewed running statistics: the adversary is torchattacks' PGD, which runs the
    model in eval mode (the documented default, after Bag of Tricks; Madry's TF graph used batch statistics), and
    the loss and its weight gradients are restated on a copy of the model in train mode. With the attack in train
    mode the examples are no longer torchattacks'."""
    trainer = bn_trainer(
        ["pgd_at"], ["pgd_at.steps=3", f"pgd_at.clean_weight={clean_weight}"] + ([flip] if flip else [])
    )
    model, hook, step = trainer.model, trainer.hook, _step(trainer)
    ref_model = copy.deepcopy(model)
    eps = trainer.eps
    alpha = 2.5 * eps / 3
    model.train()
    torch.manual_seed(123)
    step.adv_inputs = hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(123)  # same random start for the reference attack
    reference = torchattacks.PGD(ref_model, eps=eps, alpha=alpha, steps=3, random_start=True)(step.inputs, step.labels)
    if flip:
        assert far_apart(step.adv_inputs, reference, atol=alpha / 2)  # the wrong mode is seen
        return
    assert torch.allclose(step.adv_inputs, reference, atol=1e-6)
    assert (step.adv_inputs - step.inputs).abs().max() <= eps + 1e-6

    trainer.optimizer.zero_grad()
    model.train()
    hook.regdefense_forward_backward(trainer=trainer, step=step)
    ours = [p.grad.clone() for p in model.parameters()]
    ref_model.train()
    expected = (1 - clean_weight) * F.cross_entropy(ref_model(reference), step.labels)
    if clean_weight:
        expected = expected + clean_weight * F.cross_entropy(ref_model(step.inputs), step.labels)
    expected.backward()
    assert sum(step.losses.values()).item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(step.losses) == ({"task", "clean"} if clean_weight else {"task"})
    for a, p in zip(ours, ref_model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)
    for a, b in zip(model.buffers(), ref_model.buffers()):
        assert torch.equal(a, b)  # the same train-mode forwards moved the running statistics alike


def test_pgd_at_l2_and_explicit_eps(tiny_trainer):
    trainer = tiny_trainer(["pgd_at"], ["pgd_at.norm=l2", "pgd_at.eps=0.7", "pgd_at.steps=3"])
    step = _step(trainer)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    norms = (adv - step.inputs).flatten(1).norm(dim=1)
    assert (norms <= 0.7 + 1e-5).all() and norms.max() > 0.3


def test_pgd_at_with_a_library_attack(tiny_trainer):
    trainer = tiny_trainer(["pgd_at"], ["pgd_at.attack=torchattacks:FGSM(eps=0.05)"])
    step = _step(trainer)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    expected = torchattacks.FGSM(trainer.model, eps=0.05)(step.inputs, step.labels)
    assert torch.allclose(adv, expected)


def test_attack_runs_in_eval_mode_by_default(tiny_trainer):
    trainer = tiny_trainer(["pgd_at"], ["pgd_at.steps=1"])
    modes = []
    handle = trainer.model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    step = _step(trainer)
    trainer.model.train()
    trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    assert modes == [False] and trainer.model.training
    modes.clear()
    trainer.pm.get_plugin("pgd_at").config.attack_mode = "train"
    trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    assert modes == [True]
    handle.remove()
