"""The baseline defenses: each loss against an independent computation of its formula, and the stacks.

The conformance tests (TRADES, MART, AWP, GAIRAT, LBGAT, fast AT, FGSM-PGK, EMA) restate the authors' code on one batch
and run on ``digits_cnn_bn`` with BatchNorm running statistics far from any batch's (``regdefense.testing.bn_trainer``),
so the model mode of each forward is seen: eval-mode forwards use the running statistics, train-mode ones the batch's.
Where a reference fixes the attack's mode and the project has an option for it, a ``mode_flipped`` case sets the other
mode and must miss the restatement by far; where the mode is fixed in code, the restatement run in the other mode
must miss ours (the test could see a change). The expected side never calls the code under test.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from regdefense.attacks.adapter import pgd
from regdefense.base.errors import PluginError
from regdefense.host.discovery import activate
from regdefense.host.losses import kl
from regdefense.host.step import Step
from regdefense.testing import bn_trainer, far_apart, make_trainer, skew_bn
from regdefense_baselines.awp import perturbable
from regdefense_baselines.gairat import gair_weights


def _step(trainer, n=48):
    x, y, idx = next(iter(trainer.train_loader))
    return Step.from_batch((x[:n], y[:n], idx[:n]), trainer.device)


def _probs(z):
    return F.softmax(z, dim=1)


def _kl_manual(p_logits, q_logits):
    p, q = _probs(p_logits.double()), _probs(q_logits.double())
    return (p * (p.log() - q.log())).sum(1)


def _train_a_little(trainer, steps=10):
    """A few plain SGD steps so the model is not at its random init (losses are then informative)."""
    opt = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    for x, y, _ in list(trainer.train_loader)[:steps]:
        opt.zero_grad()
        F.cross_entropy(trainer.model(x), y).backward()
        opt.step()


def test_kl_direction():
    p, q = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(kl(p, q).double(), _kl_manual(p, q), atol=1e-6)
    assert not torch.allclose(kl(p, q), kl(q, p), atol=1e-3)


def _their_kl_attack(model, x, eps, alpha, steps):
    """trades.py (and lbgat.py, mail_loss.py for TRADES): model.eval(); x' = x + 0.001·N(0, I), not clipped before the
    first forward; sign steps on KLDivLoss(size_average=False)(log p(x'), p(x)), clipped to the ε-ball and [0, 1]."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss_kl, [x_adv])
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    model.train()
    return x_adv


def _their_ce_attack(model, x, y, eps, alpha, steps):
    """mart.py (and mail_loss.py for AT/MART): the same start and steps on the batch-mean cross-entropy, eval mode."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), [x_adv])
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    model.train()
    return x_adv


def _bn_step(stack, overrides, n=32):
    """A BatchNorm trainer with skewed running statistics, one batch, and a copy of the model for the reference side."""
    trainer = bn_trainer(stack, overrides)
    return trainer, _step(trainer, n), trainer.model, copy.deepcopy(trainer.model)


def _grads(loss, params):
    return torch.autograd.grad(loss, list(params), allow_unused=True)


def _same_grads(ours, theirs, atol=1e-5):
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("flip", [None, "trades.attack_mode=train"], ids=["as_reference", "mode_flipped"])
def test_trades_attack_and_loss_match_independent_computations(flip):
    trainer, step, model, ref = _bn_step(["trades"], ["trades.steps=3"] + ([flip] if flip else []))
    eps, alpha = trainer.eps, 2.5 * trainer.eps / 3
    model.train()
    torch.manual_seed(5)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(5)
    x, y = step.inputs, step.labels
    x_adv = _their_kl_attack(ref, x, eps, alpha, 3)
    if flip:
        assert far_apart(adv, x_adv, atol=alpha / 2)  # the attack in train mode is seen
        return
    assert torch.allclose(adv, x_adv, atol=1e-6)
    step.adv_inputs = adv
    terms = trainer.loss_terms(step, model)
    ours = _grads(sum(terms.values()), model.parameters())
    # trades.py, model.train(): CE(f(x), y) + β·(1/B)·KLDivLoss(sum)(log p(x'), p(x)), the clean side not detached
    logits = ref(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * F.kl_div(F.log_softmax(ref(x_adv), dim=1), F.softmax(ref(x), dim=1), reduction="sum")
    assert terms["task"].item() == pytest.approx(loss_natural.item(), rel=1e-5)
    assert terms["robust"].item() == pytest.approx(6.0 * loss_robust.item(), rel=1e-3, abs=1e-6)
    assert terms["robust"].item() > 1e-4
    _same_grads(ours, _grads(loss_natural + 6.0 * loss_robust, ref.parameters()))


@pytest.mark.parametrize("flip", [None, "mart.attack_mode=train"], ids=["as_reference", "mode_flipped"])
def test_mart_attack_and_loss_are_the_reference(flip):
    trainer, step, model, ref = _bn_step(["mart"], ["mart.steps=3"] + ([flip] if flip else []))
    eps, alpha = trainer.eps, 2.5 * trainer.eps / 3
    model.train()
    torch.manual_seed(5)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(5)
    x, y = step.inputs, step.labels
    x_adv = _their_ce_attack(ref, x, y, eps, alpha, 3)
    if flip:
        assert far_apart(adv, x_adv, atol=alpha / 2)
        return
    assert torch.allclose(adv, x_adv, atol=1e-6)
    step.adv_inputs = adv
    terms = trainer.loss_terms(step, model)
    ours = _grads(sum(terms.values()), model.parameters())
    # mart.py, model.train(): the clean forward first, then the adversarial one
    logits, logits_adv = ref(x), ref(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    kl_none = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none")
    loss_robust = (1.0 / len(x)) * torch.sum(torch.sum(kl_none, dim=1) * (1.0000001 - true_probs))
    assert terms["task"].item() == pytest.approx(loss_adv.item(), rel=1e-5)
    assert terms["robust"].item() == pytest.approx(6.0 * loss_robust.item(), rel=1e-3, abs=1e-6)
    _same_grads(ours, _grads(loss_adv + 6.0 * loss_robust, ref.parameters()))
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6)  # two train-mode forwards, clean then adversarial


def _their_awp(model, x_adv, y, gamma, proxy_train=True):
    """AT_AWP/utils_awp.py: proxy ← model's state; proxy.train(); one SGD step (lr 0.01) on −CE(proxy(x'), y);
    v = γ·‖w‖/(‖w' − w‖ + 1e-20)·(w' − w) for every 'weight' entry with more than one dimension."""
    proxy = copy.deepcopy(model)
    proxy.train(proxy_train)
    opt = torch.optim.SGD(proxy.parameters(), lr=0.01)
    opt.zero_grad()
    (-F.cross_entropy(proxy(x_adv), y)).backward()
    opt.step()
    old, new = model.state_dict(), proxy.state_dict()
    return {k: gamma * old[k].norm() / ((new[k] - old[k]).norm() + 1e-20) * (new[k] - old[k])
            for k in old if old[k].dim() > 1 and "weight" in k}


def test_awp_perturbation_size_exact_restore_and_gradient_at_perturbed_weights():
    trainer = bn_trainer(["pgd_at", "awp"], ["pgd_at.steps=2", "awp.warmup_epochs=0", "awp.gamma=0.01"])
    awp, model = trainer.pm.get_plugin("awp"), trainer.raw_model
    awp.regdefense_fit_start(trainer)
    _train_a_little(trainer)
    skew_bn(model)
    step = _step(trainer, 32)
    torch.manual_seed(0)  # any inputs: the adversary is pgd_at's (tested there); AWP's part starts from x'
    step.adv_inputs = (step.inputs + torch.empty_like(step.inputs).uniform_(-0.1, 0.1)).clamp(0, 1)
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    v = awp.perturbation(trainer, step)
    theirs = _their_awp(ref, step.adv_inputs, step.labels, 0.01)
    assert set(v) == set(theirs) == {n for n, _ in perturbable(model)} and all(before[n].dim() > 1 for n in v)
    for n, dv in v.items():
        assert torch.allclose(dv, theirs[n], rtol=1e-4, atol=1e-7), n
        assert (dv.norm() / before[n].norm()).item() == pytest.approx(0.01, rel=1e-4)  # relative norm γ per layer
    in_eval = _their_awp(ref, step.adv_inputs, step.labels, 0.01, proxy_train=False)
    assert any(far_apart(v[n], in_eval[n], atol=1e-3 * v[n].abs().max().item()) for n in v)  # the probe's mode is seen
    # the wrapper: gradients are those of CE at w + v in train mode (their perturb, forward, backward), and the
    # weights are restored bit-exactly afterwards
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in theirs:
                p.add_(theirs[n])
    ref.train()
    expected = _grads(F.cross_entropy(ref(step.adv_inputs), step.labels), ref.parameters())
    trainer.optimizer.zero_grad()
    trainer.hook.regdefense_forward_backward(trainer=trainer, step=step)
    for (n, p), g in zip(model.named_parameters(), expected):
        assert torch.equal(p.detach(), before[n])
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-5), n


def test_gairat_kappa_and_weights_follow_the_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    info = {}
    pgd(model, x, y, eps=0.3, alpha=0.05, steps=6, start=None, info=info)
    manual = torch.zeros(32, dtype=torch.long)
    delta = torch.zeros_like(x)
    for _ in range(6):  # count, at the start of each iteration, the points still classified correctly
        d = delta.clone().requires_grad_(True)
        out = model(x + d)
        manual += (out.argmax(1) == y).long()
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), d)
        delta = ((x + (d.detach() + 0.05 * g.sign()).clamp(-0.3, 0.3)).clamp(0, 1) - x)
    assert torch.equal(info["kappa"], manual)
    kappa = torch.tensor([0, 2, 5, 10, 10])
    w = gair_weights(kappa, 10, -1.0)
    raw = torch.tensor([(math.tanh(-1 + (5 - k) * 5 / 5) + 1) / 2 for k in kappa.tolist()])
    assert torch.allclose(w, raw * 5 / raw.sum(), atol=1e-6) and w.sum().item() == pytest.approx(5)
    assert w[0] > w[2] > w[3]  # points near the boundary (small κ) weigh more


@pytest.mark.parametrize("flip", [None, "pgd_at.attack_mode=train"], ids=["as_reference", "mode_flipped"])
def test_gairat_is_the_reference_ga_pgd_and_reweighted_ce(flip):
    """GAIRAT.py with attack_generator.GA_PGD (category Madry, loss cent): model.eval(); x' = clip(x + U(−ε, ε)) (their
    numpy draw, here torch's); per step κ += [argmax f(x') = y] before the batch-mean CE sign step; then model.train()
    and mean(CE(f(x'), y)·GAIR(K, κ, λ, Tanh))."""
    over = ["pgd_at.steps=4", "gairat.burn_in_epochs=0"] + ([flip] if flip else [])
    trainer, step, model, ref = _bn_step(["pgd_at", "gairat"], over)
    eps, alpha, K = trainer.eps, 2.5 * trainer.eps / 4, 4
    model.train()
    torch.manual_seed(7)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(7)
    data, target = step.inputs, step.labels
    ref.eval()
    kappa = torch.zeros(len(data))
    x_adv = torch.clamp(data + torch.empty_like(data).uniform_(-eps, eps), 0.0, 1.0)
    for _ in range(K):
        x_adv.requires_grad_()
        output = ref(x_adv)
        kappa += (output.max(1, keepdim=True)[1].squeeze(1) == target).float()
        (grad,) = torch.autograd.grad(F.cross_entropy(output, target), [x_adv])
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, data - eps), data + eps), 0.0, 1.0)
    if flip:
        assert far_apart(adv, x_adv, atol=alpha / 2)
        return
    assert torch.allclose(adv, x_adv, atol=1e-6)
    assert torch.equal(step.info["kappa"], kappa.long()) and kappa.min() < kappa.max()
    step.adv_inputs = adv
    terms = trainer.loss_terms(step, model)
    ref.train()
    reweight = ((-1.0 + (int(K / 2) - kappa) * 5 / (int(K / 2))).tanh() + 1) / 2
    loss = (F.cross_entropy(ref(x_adv), target, reduction="none") * (reweight * len(reweight) / reweight.sum())).mean()
    assert sum(terms.values()).item() == pytest.approx(loss.item(), rel=1e-5)
    _same_grads(_grads(sum(terms.values()), model.parameters()), _grads(loss, ref.parameters()))


@pytest.mark.parametrize("modifier", ["gairat", "mail"])
def test_reweighting_acts_on_the_adversarial_term_of_any_objective(modifier):
    trainer = make_trainer(["trades", modifier], [f"{modifier}.burn_in_epochs=0", "trades.steps=3"])
    _train_a_little(trainer)
    step, model = _step(trainer), trainer.model
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    terms = trainer.loss_terms(step, model)
    w = step.info["weights"]
    per = _kl_manual(model(step.inputs), model(step.adv_inputs))
    assert terms["robust"].item() == pytest.approx(6.0 * (w.double() * per).sum().item() / len(per), rel=2e-3)
    assert not torch.allclose(w, torch.ones_like(w))
    assert terms["task"].item() == pytest.approx(F.cross_entropy(model(step.inputs), step.labels).item(), rel=1e-5)


def test_gairat_needs_kappa_from_the_adversary():
    with pytest.raises(PluginError, match="gairat' reads info.kappa but no active defense publishes it"):
        make_trainer(["pgd_at", "gairat"], ["gairat.burn_in_epochs=0", "pgd_at.attack=torchattacks:FGSM(eps=0.1)"])


@pytest.mark.parametrize("flip", [None, "lbgat.attack_mode=train"], ids=["as_reference", "mode_flipped"])
def test_lbgat_attack_loss_and_guide_are_the_reference(flip):
    """lbgat.py: TRADES' eval-mode KL attack, then (model.train(), the teacher never put in eval mode)
    MSE(f(x'), f_n(x)) + CE(f_n(x), y) + β·(1/B)·KL(sum)(log p(x'), p(x)), nothing detached; β = 6 (CIFAR-100)."""
    trainer, step, model, ref = _bn_step(["lbgat"], ["lbgat.steps=2", "lbgat.beta=6"] + ([flip] if flip else []))
    guide = trainer.modules["lbgat_guide"]
    assert any(p is q for g in trainer.optimizer.param_groups for p in g["params"] for q in guide.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in guide.modules())  # the guide is the run's BN network
    ref_guide = copy.deepcopy(guide)
    eps, alpha = trainer.eps, 2.5 * trainer.eps / 2
    model.train()
    torch.manual_seed(5)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(5)
    x, y = step.inputs, step.labels
    x_adv = _their_kl_attack(ref, x, eps, alpha, 2)
    if flip:
        assert far_apart(adv, x_adv, atol=alpha / 2)
        return
    assert torch.allclose(adv, x_adv, atol=1e-6)
    step.adv_inputs = adv
    terms = trainer.loss_terms(step, model)
    params = [*model.parameters(), *guide.parameters()]
    ours = _grads(sum(terms.values()), params)
    out_adv, out_natural, out = ref(x_adv), ref(x), ref_guide(x)
    loss_mse = F.mse_loss(out_adv, out) + F.cross_entropy(out, y)
    loss_kl = F.kl_div(F.log_softmax(out_adv, dim=1), F.softmax(out_natural, dim=1), reduction="sum") / out.size(0)
    assert terms["task"].item() + terms["guide"].item() == pytest.approx(loss_mse.item(), rel=1e-5)
    assert terms["robust"].item() == pytest.approx(6 * loss_kl.item(), rel=1e-3, abs=1e-6)
    _same_grads(ours, _grads(loss_mse + 6 * loss_kl, [*ref.parameters(), *ref_guide.parameters()]))


def _their_fgsm_rs(model, X, y, eps, alpha):
    """CIFAR10/train_fgsm.py (delta_init random): δ ~ U(−ε, ε) clamped to the image, one signed step of the batch-mean
    CE's gradient in the model's current mode (train: model.train() before the loop), clamped to the ε-ball, then
    to the image."""
    delta = torch.zeros_like(X).uniform_(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - X), 0 - X).requires_grad_(True)
    F.cross_entropy(model(X + delta), y).backward()
    grad = delta.grad.detach()
    d = torch.clamp(delta + alpha * torch.sign(grad), -eps, eps)
    return X + torch.max(torch.min(d, 1 - X), 0 - X).detach()


@pytest.mark.parametrize("flip", [None, "fast_at.attack_mode=eval"], ids=["as_reference", "mode_flipped"])
def test_fast_at_is_fgsm_with_random_start(flip):
    trainer = bn_trainer(["fast_at"], [flip] if flip else [])
    step, model = _step(trainer, 32), trainer.model
    ref = copy.deepcopy(model).train()
    eps = trainer.eps
    model.train()
    torch.manual_seed(1)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(1)
    theirs = _their_fgsm_rs(ref, step.inputs, step.labels, eps, 1.25 * eps)
    if flip:
        assert far_apart(adv, theirs, atol=eps)
        return
    assert torch.allclose(adv, theirs, atol=1e-6)
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6)  # the attack's train-mode forward moved them too


def _their_pgk_step(model, X, y, delta0, eps, alpha, factor=0.5, lamda=5.6):
    """FGSM_PGK_CIFAR10.py, the model in train mode throughout: ori = f(X + δ₀) (δ₀ not clipped to the image),
    g = ∇ LabelSmoothLoss(ori, ŷ), δ₁ = clamp(clamp(δ₀ + α·sign g, −ε, ε), −X, 1 − X), out = f(X + δ₁),
    loss = LabelSmoothLoss(out, ŷ) + λ·MSE(out, ori) with ŷ = onehot·f + (onehot − 1)·(f − 1)/9."""
    one_hot = F.one_hot(y, 10).double()
    smooth = (one_hot * factor + (one_hot - 1.0) * ((factor - 1) / float(10 - 1))).float()

    def label_smooth_loss(inp, target):
        return (-target * F.log_softmax(inp, dim=-1)).sum(dim=-1).mean()

    delta = delta0.clone().requires_grad_(True)
    ori_output = model(X + delta)
    (x_grad,) = torch.autograd.grad(label_smooth_loss(ori_output, smooth), [delta], retain_graph=True)
    adv_delta = torch.clamp(delta.detach() + alpha * torch.sign(x_grad), -eps, eps)
    adv_delta = torch.max(torch.min(adv_delta, 1 - X), 0 - X)
    output = model(X + adv_delta)
    loss = label_smooth_loss(output, smooth) + lamda * F.mse_loss(output.float(), ori_output.float())
    return X + adv_delta, loss


def test_fgsm_pgk_step_and_loss_are_the_reference_in_train_mode():
    trainer = bn_trainer(["fgsm_pgk"])
    plugin, model = trainer.pm.get_plugin("fgsm_pgk"), trainer.model
    plugin.regdefense_fit_start(trainer)
    torch.manual_seed(2)
    plugin.regdefense_epoch_start(trainer, 0)  # the reset: Δ = α·sign(U(−ε, ε)) clipped to ε
    step = _step(trainer, 32)
    delta0, eps = plugin.prior[step.index].clone(), trainer.eps
    assert torch.allclose(delta0.abs(), torch.full_like(delta0, eps))
    ref, in_eval = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    model.train()
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    terms = trainer.loss_terms(step, model)
    ours = _grads(sum(terms.values()), model.parameters())
    adv, loss = _their_pgk_step(ref, step.inputs, step.labels, delta0, eps, eps)
    assert torch.allclose(step.adv_inputs, adv, atol=1e-6)
    assert sum(terms.values()).item() == pytest.approx(loss.item(), rel=1e-5)
    _same_grads(ours, _grads(loss, ref.parameters()))
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6)  # two train-mode forwards, as theirs
    # the mode is fixed in code (the model's, train in the loop): the same restatement in eval mode misses by far
    adv_eval, _ = _their_pgk_step(in_eval, step.inputs, step.labels, delta0, eps, eps)
    assert far_apart(step.adv_inputs, adv_eval, atol=eps)


def test_fgsm_pgk_reads_and_writes_buffers_by_dataset_index():
    trainer = make_trainer(["fgsm_pgk"], [])
    plugin, model = trainer.pm.get_plugin("fgsm_pgk"), trainer.model
    plugin.regdefense_fit_start(trainer)
    n = trainer.train_size
    eps = trainer.eps
    marks = torch.linspace(-eps, eps, n)  # a distinct prior value per dataset index
    plugin.prior.copy_(marks.view(-1, 1, 1, 1).expand_as(plugin.prior))
    x, y, idx = next(iter(trainer.train_loader))  # shuffled: idx is not 0..B-1
    assert not torch.equal(idx, torch.arange(len(idx)))
    step = Step.from_batch((x, y, idx), trainer.device)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    used = plugin.prior[idx].clone()
    delta0 = step.stash["fgsm_pgk"]["delta0"]
    assert torch.equal(delta0, used)  # read at the batch's dataset indices, x + δ₀ unclipped (reference)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx] = False
    before = plugin.prior.clone()
    terms = trainer.loss_terms(step, model)
    z1, z0 = model(step.adv_inputs), step.outputs["init"]
    soft = torch.full((len(y), 10), 0.5 / 9).scatter(1, y[:, None], 0.5)
    assert terms["task"].item() == pytest.approx(-(soft * F.log_softmax(z1, 1)).sum(1).mean().item(), rel=1e-5)
    assert terms["consistency"].item() == pytest.approx(5.6 * F.mse_loss(z1, z0).item(), rel=1e-5)
    step.losses = terms
    trainer.hook.regdefense_batch_end(trainer=trainer, step=step)
    assert torch.equal(plugin.prior[untouched], before[untouched])  # other rows untouched
    assert not torch.equal(plugin.prior[idx], before[idx])  # the batch's rows written
    assert plugin.prior.abs().max() <= eps + 1e-7
    written = x + plugin.prior[idx]  # the stored prior is clipped to this batch's image range, as the reference
    assert written.min() >= -1e-7 and written.max() <= 1 + 1e-7
    assert "acc_ratio" in step.info


def test_ema_follows_the_formula_and_is_what_is_evaluated():
    """FGSM-PGK's EMA (buffer_ema=True): parameters and BatchNorm buffers averaged alike, on the BN digits CNN."""
    trainer = bn_trainer(["pgd_at", "ema"], ["pgd_at.steps=1", "ema.decay=0.5", "ema.warmup=false"])
    trainer.fit()
    ema = trainer.pm.get_plugin("ema")
    assert trainer.hook.regdefense_eval_model(trainer=trainer) is ema.model
    # replay: the EMA of the weights seen after each step equals the plugin's copy
    trainer2 = bn_trainer(["pgd_at"], ["pgd_at.steps=1"])
    seen = []

    class Spy:
        name = "spy"

        from regdefense import hookimpl

        @hookimpl
        def regdefense_batch_end(self, trainer):
            seen.append({k: v.clone() for k, v in trainer.raw_model.state_dict().items()})

    trainer2.pm.register(Spy(), name="spy")
    trainer2.fit()
    avg = {k: v.clone() for k, v in bn_trainer(["pgd_at"]).raw_model.state_dict().items()}
    for sd in seen:
        for k in avg:
            avg[k] = 0.5 * avg[k] + 0.5 * sd[k] if sd[k].dtype.is_floating_point else sd[k]
    assert any("running_var" in k for k in avg)  # BatchNorm statistics are averaged too (their buffer_ema=True)
    for k, v in ema.model.state_dict().items():
        assert torch.allclose(v, avg[k], atol=1e-6), k


@pytest.mark.parametrize("stack", [["trades", "awp"], ["pgd_at", "awp"], ["pgd_at", "gairat"], ["trades", "mail"],
                                   ["fgsm_pgk", "ema"], ["lbgat"], ["mart"], ["fast_at"]])
def test_stacks_train(stack, tmp_path):
    ov = ["train.epochs=2", "pgd_at.steps=2", "trades.steps=2", "mart.steps=2", "lbgat.steps=2",
          "awp.warmup_epochs=1", "gairat.burn_in_epochs=1", "mail.burn_in_epochs=1"]
    ov = [o for o in ov if o.split(".")[0] in stack or o.startswith("train.")]
    trainer = make_trainer(stack, ov, run_dir=tmp_path)
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    history = trainer.fit()
    assert len(history) == 2 and all(math.isfinite(v) for k, v in history[-1].items() if k.startswith("loss"))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
    resumed = make_trainer(stack, [o.replace("train.epochs=2", "train.epochs=3") for o in ov], run_dir=tmp_path / "r")
    resumed.resume_from(tmp_path / "checkpoints" / "last.pt")
    assert [h["epoch"] for h in resumed.fit()] == [3]  # every defense's state round-trips a checkpoint


def test_trades_and_mart_conflict():
    with pytest.raises(PluginError, match="'trades' and 'mart' both provide regdefense_make_adversarial"):
        activate(["trades", "mart"])


def test_catastrophic_overfitting_guard_runs_for_single_step_defenses():
    trainer = make_trainer(["fast_at"], ["train.epochs=3", "eval.co_threshold=-1", "eval.co_stop=true"])
    history = trainer.fit()
    assert len(history) == 1  # flagged at epoch 1 (threshold -1 forces it) and stopped
    assert {"val_fgsm", "co_gap", "catastrophic_overfitting"} <= set(history[0])
    plain = make_trainer(["pgd_at"], ["pgd_at.steps=1"]).fit()
    assert "val_fgsm" not in plain[0]


def test_mail_from_an_untrained_model_warns_that_its_weights_vanish(capsys):
    """Issue 16: pgd_at + mail with no burn-in ended below chance with a tiny loss. On an untrained model every
    probabilistic margin is about 0, so every weight is about 3·sigmoid(10·(0 − 0.5)) ≈ 0.02 and the network barely
    learns; the run now says so after the first reweighted epoch."""
    trainer = make_trainer(["pgd_at", "mail"], ["mail.burn_in_epochs=0", "pgd_at.steps=2"])
    history = trainer.fit()
    w = history[-1]["log_mail_weight_mean"]
    assert w == pytest.approx(3 / (1 + math.exp(5)), rel=0.35)  # ≈ 0.020: the margins are all near 0
    assert "mail's weights average" in capsys.readouterr().err


def test_awp_from_the_first_epoch_warns_when_the_model_stays_at_chance(capsys):
    """Issue 16: pgd_at + awp with no warm-up stays at chance on the digits CNN; the run says so."""
    trainer = make_trainer(["pgd_at", "awp"], ["awp.warmup_epochs=0", "pgd_at.steps=2", "train.epochs=2"])
    history = trainer.fit()
    assert history[-1]["val_clean"] <= 0.15  # at chance: what the warning is about
    assert "chance level" in capsys.readouterr().err
    trainer = make_trainer(["pgd_at", "awp"], ["awp.warmup_epochs=5", "pgd_at.steps=2", "train.epochs=2"])
    trainer.fit()
    assert "chance level" not in capsys.readouterr().err  # AWP not acting yet: nothing to say
