"""ATWR, ATGR and EATR (seed 001): losses against independent computations, ATGR's double backprop against
finite differences, EATR's adversarial examples within ε, and the clean-then-fine-tune flow.

The loss tests run on ``digits_cnn_bn`` with BatchNorm running statistics far from any batch's, and restate each loss
on a copy of the model in train mode (the loop's), so a term computed in the other mode is seen. Seed 001 publishes no
code and fixes no attack mode: the adversaries are pgd_at's (eval by default, tested in test_pgd_at.py) and
torchattacks' through the adapter (eval, restated here for FGSM)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from regdefense.host.step import Step
from regdefense.testing import bn_trainer, far_apart, make_trainer
from regdefense_regularized.penalties import input_gradient_penalty, weight_l2


def _step(trainer, n=32):
    x, y, idx = next(iter(trainer.train_loader))
    return Step.from_batch((x[:n], y[:n], idx[:n]), trainer.device)


def _adv_terms(trainer):
    step, model = _step(trainer), trainer.model
    torch.manual_seed(0)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    return step, model, trainer.loss_terms(step, model)


def _bn_adv_terms(stack, overrides):
    """On the skewed BatchNorm model: the step, the model, a copy of it for the reference side (taken before the
    attack, in train mode) and the loss terms computed in train mode."""
    trainer = bn_trainer(stack, overrides)
    ref = copy.deepcopy(trainer.model).train()
    trainer.model.train()
    step, model, terms = _adv_terms(trainer)
    return step, model, ref, terms


def _same_grads(loss, model, expected, ref, atol=1e-5):
    ours = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    theirs = torch.autograd.grad(expected, list(ref.parameters()), allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-4, atol=atol))


def test_atwr_loss_equals_its_formula():
    step, model, ref, terms = _bn_adv_terms(
        ["pgd_at", "atwr"], ["pgd_at.steps=2", "atwr.lambda1=0.7", "atwr.lambda2=0.005"]
    )
    x, xa, y = step.inputs, step.adv_inputs, step.labels
    manual_w2 = sum((p ** 2).sum() for n, p in ref.named_parameters() if n.endswith("weight") and p.dim() > 1)
    expected = F.cross_entropy(ref(x), y) + 0.7 * F.cross_entropy(ref(xa), y) + 0.005 * manual_w2
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(terms) == {"task", "clean", "weight_l2"}
    _same_grads(sum(terms.values()), model, expected, ref)
    everything = sum((p ** 2).sum() for p in model.parameters())
    assert weight_l2(model, all_params=True).item() == pytest.approx(everything.item(), rel=1e-6)
    assert weight_l2(model).item() < everything.item()  # biases excluded by default
    # its gradient is 2·λ2·w on weights and nothing on biases
    model.zero_grad()
    (0.005 * weight_l2(model)).backward()
    for n, p in model.named_parameters():
        if p.dim() > 1:
            assert torch.allclose(p.grad, 0.01 * p.detach())
        else:
            assert p.grad is None  # biases are not in the penalty


def test_atgr_penalty_scales_and_per_sample_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    per_sample = []
    for i in range(6):  # an independent per-sample loop
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        per_sample.append(g.pow(2).sum())
    per_sample = torch.stack(per_sample)
    assert input_gradient_penalty(model, x, y, "per_sample_mean").item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert input_gradient_penalty(model, x, y, "per_sample_sum").item() == pytest.approx(per_sample.sum().item(), rel=1e-5)
    small = input_gradient_penalty(model, x, y, "batch_mean_grad").item()
    assert small == pytest.approx(per_sample.mean().item() / 6, rel=1e-5)  # B times smaller


def test_atgr_penalty_gradient_in_the_weights_matches_finite_differences():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.rand(4, 1, 3, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    pen = input_gradient_penalty(model, x, y)
    grads = torch.autograd.grad(pen, list(model.parameters()))
    h = 1e-6
    for p, g in zip(model.parameters(), grads):
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += h
            up = input_gradient_penalty(model, x, y).item()
            with torch.no_grad():
                p[idx] -= 2 * h
            down = input_gradient_penalty(model, x, y).item()
            with torch.no_grad():
                p[idx] += h
            assert g[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-8)


def test_atgr_loss_equals_its_formula_and_logs_the_raw_penalty():
    step, model, ref, terms = _bn_adv_terms(["pgd_at", "atgr"], ["pgd_at.steps=2", "atgr.beta2=0.5"])
    x, y = step.inputs, step.labels
    xa = step.adv_inputs.detach().requires_grad_(True)
    ce_adv = F.cross_entropy(ref(xa), y, reduction="none")
    (g,) = torch.autograd.grad(ce_adv.sum(), xa, create_graph=True)  # double backprop through train-mode BN
    raw = g.flatten(1).pow(2).sum(1).mean()
    expected = F.cross_entropy(ref(x), y) + ce_adv.mean() + 0.5 * raw
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)
    assert step.logs["atgr_raw_penalty"].item() == pytest.approx(raw.item(), rel=1e-5)
    _same_grads(sum(terms.values()), model, expected, ref)


def test_eatr_examples_loss_and_batch_modes():
    trainer = bn_trainer(["eatr"], ["eatr.eps=0.1", "eatr.pgd_steps=3", "eatr.cw_steps=5"])
    ref = copy.deepcopy(trainer.model)
    trainer.model.train()
    step, model, terms = _adv_terms(trainer)
    x, y = step.inputs, step.labels
    for k, adv in step.adv_inputs.items():
        assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
        if k != "cw":
            assert (adv - x).abs().max() <= 0.1 + 1e-6, k
    assert not torch.equal(step.adv_inputs["pgd"], x)

    def fgsm(train):  # torchattacks' FGSM (x + ε·sign ∇ mean CE, clamped) in the adapter's mode, eval
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(ref.train(train)(xr), y), xr)
        return (x + 0.1 * g.sign()).clamp(0, 1)

    assert torch.allclose(step.adv_inputs["fgsm"], fgsm(False), atol=1e-6)
    assert far_apart(step.adv_inputs["fgsm"], fgsm(True), atol=0.1)  # the mode is seen
    ref.train()
    w2 = sum((p ** 2).sum() for p in ref.parameters() if p.dim() > 1)
    expected = F.cross_entropy(ref(x), y) + sum(F.cross_entropy(ref(step.adv_inputs[k]), y)
                                                for k in ("fgsm", "pgd", "bim", "cw")) + 0.001 * w2
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"clean", "fgsm", "pgd", "bim", "cw", "reg"} == set(terms)
    split = make_trainer(["eatr"], ["eatr.pgd_steps=2", "eatr.cw_steps=2", "eatr.batch=split"])
    step, _, terms = _adv_terms(split)
    assert sum(len(v) for v in step.adv_inputs.values()) == step.batch_size
    cycle = make_trainer(["eatr"], ["eatr.pgd_steps=2", "eatr.cw_steps=2", "eatr.batch=cycle"])
    step, _, terms = _adv_terms(cycle)
    assert list(step.adv_inputs) == ["fgsm"] and "pgd" not in terms


@pytest.mark.parametrize("stack", [["pgd_at", "atwr"], ["pgd_at", "atgr"], ["eatr"]])
def test_fine_tune_from_a_clean_trained_start(tmp_path, stack):
    from regdefense.training.run import train

    clean = train(defenses=[], overrides=["train.epochs=2", "data.limit=256", "train.progress=false",
                                          "eval.pgd_steps=1", "eval.test_samples=16"], out=tmp_path / "clean",
                  echo=lambda s: None)
    from regdefense.base import checkpoint

    start = checkpoint.load(clean.run_dir / "checkpoints" / "best.pt")["model"]
    ov = ["train.epochs=1", "data.limit=256", f"train.init={clean.run_dir}", "pgd_at.steps=2", "eatr.pgd_steps=2",
          "eatr.cw_steps=2"]
    trainer = make_trainer(stack, [o for o in ov if o.split(".")[0] in stack + ["train", "data"]])
    assert all(torch.equal(v, trainer.raw_model.state_dict()[k]) for k, v in start.items())
    history = trainer.fit()
    assert history[0]["loss"] == history[0]["loss"]  # finite, trained
    if "atgr" in stack:
        assert history[0]["log_atgr_raw_penalty"] > 0


def test_init_from_a_mismatched_model_is_a_clear_error(tmp_path):
    from regdefense.base.errors import UserError
    from regdefense.training.run import train

    run = train(defenses=[], overrides=["train.epochs=1", "data.limit=64", "train.progress=false",
                                        "eval.pgd_steps=1", "eval.test_samples=8"], out=tmp_path / "r", echo=lambda s: None)
    with pytest.raises(UserError, match="do not fit this model"):
        make_trainer([], [f"train.init={run.run_dir}", "model.name=resnet18"])
