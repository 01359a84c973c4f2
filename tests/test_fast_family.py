"""The single-step family against their authors' code (issues 28 and 33): each reference's inner maximisation and
loss is restated here from reading it — N-FGSM (pdejorge/N-FGSM, train.py), GradAlign
(tml-epfl/understanding-fast-adv-training, train.py and utils.get_input_grad), ZeroGrad and MultiGrad (the authors'
quantile_fgsm and consensus_fgsm), ATAS (HuangZhiChao95/ATAS), HAT (imrahulr/hat), consistency
(alinlab/consistency-adversarial) — and compared with the plugin on one batch, from the same random draws and the
same model state.

The model is ``digits_cnn_bn`` with BatchNorm running statistics far from any batch's, so an attack run in the other
mode than the reference's gives other perturbations (the tiny ``digits_cnn`` has no BatchNorm: any mode passed). Each
defense whose reference fixes the attack's mode has a ``flip`` case: the same comparison with the mode flipped, which
must then fail. No reference here uses dropout. The expected side never calls the code under test.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from regdefense.base.errors import ConfigError, UserError
from regdefense.host.step import Step
from regdefense.testing import BN_MODEL, TINY, make_trainer, skew_bn
from regdefense.training.assembly import load_config
from regdefense.training.loop import Trainer
from regdefense_baselines.gradalign import alignment
from regdefense_baselines.zerograd import consensus, quantile_mask

BN = BN_MODEL


def _skew_bn(trainer):
    """Running statistics no batch has (:func:`regdefense.testing.skew_bn`): eval and train forwards differ."""
    skew_bn(trainer.raw_model)
    return trainer


def _bn_trainer(stack, overrides=(), recipe=None):
    """A trainer on the BatchNorm digits CNN with skewed running statistics (from ``recipe`` when given)."""
    if recipe is not None:
        return _skew_bn(Trainer(load_config(recipe, overrides=TINY + BN + list(overrides))))
    return _skew_bn(make_trainer(stack, BN + list(overrides)))


def _batch(trainer):
    x, y, idx = next(iter(trainer.train_loader))
    return Step.from_batch((x, y, idx), trainer.device)


def _ours(trainer, step, seed=5):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)


def _image_clamp(d, X):
    return torch.max(torch.min(d, 1 - X), -X)  # their clamp(delta, lower_limit - X, upper_limit - X)


def _mismatch(ours, ref, atol=1e-6):
    return not torch.allclose(ours, ref, atol=atol)


@pytest.mark.parametrize("flip", [None, "n_fgsm.attack_mode=eval"], ids=["as_reference", "mode_flipped"])
def test_n_fgsm_is_the_reference_step_noise_2eps_step_eps_and_no_projection(flip):
    trainer = _bn_trainer(["n_fgsm"], [flip] if flip else [])
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model).train()  # their model stays in train mode for the attack
    adv = _ours(trainer, step)
    X, y, eps = step.inputs, step.labels, trainer.eps
    torch.manual_seed(5)  # restated: eta ~ U(-2eps, 2eps) (one channel), clamped to the image, one step of alpha = eps
    eta = torch.zeros_like(X).uniform_(-2 * eps, 2 * eps)
    eta = _image_clamp(eta, X).requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(ref_model(X + eta), y), eta)[0]
    delta = _image_clamp(eta.detach() + eps * torch.sign(grad), X)  # no clip to the eps-ball (clip=-1)
    if flip:
        assert _mismatch(adv, X + delta)  # the wrong mode is seen
        return
    assert torch.allclose(adv, X + delta, atol=1e-6)
    assert (adv - X).abs().max() > eps * 1.5  # the perturbation leaves the eps-ball, as it should
    assert torch.equal(step.info["x_init"], X + eta.detach())


@pytest.mark.parametrize("flip", [None, "zerograd.attack_mode=eval"], ids=["as_reference", "mode_flipped"])
def test_zerograd_is_the_reference_quantile_fgsm(flip):
    trainer = _bn_trainer(["zerograd"], ["zerograd.q=0.35"] + ([flip] if flip else []))
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model).train()
    adv = _ours(trainer, step)
    X, y, eps = step.inputs, step.labels, trainer.eps
    torch.manual_seed(5)
    delta = _image_clamp(torch.zeros_like(X).uniform_(-eps, eps), X).requires_grad_(True)
    F.cross_entropy(ref_model(X + delta), y).backward()
    grad = delta.grad.detach().clone()
    q_grad = torch.quantile(grad.abs().view(grad.size(0), -1), 0.35, dim=1)
    grad[grad.abs() < q_grad.view(-1, 1, 1, 1)] = 0
    d = torch.clamp(delta.detach() + 2 * eps * torch.sign(grad), -eps, eps)  # their fgsm_alpha = 2
    ref = X + _image_clamp(d, X)
    if flip:
        assert _mismatch(adv, ref)
        return
    assert torch.allclose(adv, ref, atol=1e-6)
    zeroed = (quantile_mask(grad, 0.35) == 0).float().mean()
    assert 0.3 <= float(zeroed) <= 0.6  # about q of the coordinates carry no step (plus exact zeros)


@pytest.mark.parametrize("flip", [None, "multigrad.attack_mode=eval"], ids=["as_reference", "mode_flipped"])
def test_multigrad_is_the_reference_consensus_fgsm_from_x(flip):
    trainer = _bn_trainer(["multigrad"], ["multigrad.samples=3"] + ([flip] if flip else []))
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model).train()
    adv = _ours(trainer, step)
    X, y, eps = step.inputs, step.labels, trainer.eps
    torch.manual_seed(5)
    grads = []
    for _ in range(3):  # their sequential branch (c_parallel off)
        delta = _image_clamp(torch.zeros_like(X).uniform_(-eps, eps), X).requires_grad_(True)
        F.cross_entropy(ref_model(X + delta), y).backward()
        grads.append(delta.grad.detach().clone())
    g = sum(torch.sign(gi) for gi in grads)
    grad = torch.where(g.abs() < (3 - (3 - 3)), torch.zeros_like(g), g)
    d = _image_clamp(torch.clamp(torch.zeros_like(X) + 2 * eps * torch.sign(grad), -eps, eps), X)
    if flip:
        assert _mismatch(adv, X + d)
        return
    assert torch.allclose(adv, X + d, atol=1e-6)
    kept = (d != 0) & ((X > 0) & (X < 1))
    assert 0 < float(kept.float().mean()) < 1  # some coordinates disagree and take no step
    assert torch.equal(consensus(grads, 2), torch.where(g.abs() < 1, torch.zeros_like(g), g))  # 2 of 3 agree


def _their_clamp(X, lo, hi):
    """utils.clamp of the GradAlign code: torch.max(torch.min(X, u), l) with one-element tensors (its gradient at a
    pixel exactly at l or u is what PyTorch's min/max give a tie: 0.5 on current versions, not torch.clamp's 0)."""
    return torch.max(torch.min(X, torch.full((1,), float(hi))), torch.full((1,), float(lo)))


@pytest.mark.parametrize("flip", [None, "fast_at.attack_mode=eval"], ids=["as_reference", "mode_flipped"])
def test_gradalign_term_and_its_weight_gradient_are_the_reference_regulariser(flip):
    over = ["fast_at.start=zero", "fast_at.alpha=0.2", "gradalign.weight=0.2"] + ([flip] if flip else [])
    trainer = _bn_trainer(["fast_at", "gradalign"], over)
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model).train()  # train mode for the FGSM step and both gradients
    step.adv_inputs = _ours(trainer, step)
    torch.manual_seed(11)
    terms = trainer.loss_terms(step, trainer.model)
    params = [p for p in trainer.model.parameters()]
    ours = torch.autograd.grad(terms["gradalign"], params)

    X, y, eps = step.inputs, step.labels, trainer.eps
    delta = torch.zeros_like(X, requires_grad=True)  # attack_init = zero, fgsm_alpha = 1
    grad = torch.autograd.grad(F.cross_entropy(ref_model(_their_clamp(X + delta, 0, 1)), y), delta)[0].detach()
    torch.manual_seed(11)
    d2 = torch.zeros_like(X).uniform_(-eps, eps).requires_grad_(True)  # get_input_grad('random_uniform'): unclamped
    grad2 = torch.autograd.grad(F.cross_entropy(ref_model(X + d2), y), d2, create_graph=True)[0]
    nnz = ((grad**2).sum([1, 2, 3]) ** 0.5 != 0) * ((grad2**2).sum([1, 2, 3]) ** 0.5 != 0)
    g1, g2 = grad[nnz], grad2[nnz]
    cos = torch.sum(
        g1
        / (g1**2).sum([1, 2, 3]).sqrt()[:, None, None, None]
        * g2
        / (g2**2).sum([1, 2, 3]).sqrt()[:, None, None, None],
        (1, 2, 3),
    )
    reg = 0.2 * (1.0 - cos.mean())
    if flip:
        assert _mismatch(terms["gradalign"], reg)
        return
    assert ((X == 0) | (X == 1)).float().mean() > 0.3  # the digits have many saturated pixels: the clamp matters
    assert torch.allclose(terms["gradalign"], reg, rtol=1e-5, atol=1e-7)
    theirs = torch.autograd.grad(reg, list(ref_model.parameters()))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)
    assert float(alignment(grad, grad)) == pytest.approx(1.0)
    assert float(alignment(torch.zeros_like(grad), grad)) == 1.0  # no usable pair: no penalty


def test_gradalign_without_an_adversary_that_publishes_its_gradient_is_refused():
    with pytest.raises(UserError, match="info.grad_init"):
        make_trainer(["n_fgsm", "gradalign"])


def test_the_single_step_family_trains_and_refuses_l2_and_bad_settings():
    for name in ("n_fgsm", "zerograd", "multigrad", "atas", "free_at", "ibp", "fast_at", "fgsm_pgk", "fat"):
        with pytest.raises(ConfigError, match=f"{name} is an L∞ defense .* threat.norm is l2: use threat.norm=linf"):
            make_trainer([name], ["threat.norm=l2", "threat.eps=1.0"])  # refused before anything is built
    with pytest.raises(UserError, match="multigrad.threshold \\(4\\) cannot exceed multigrad.samples \\(3\\)"):
        make_trainer(["multigrad"], ["multigrad.threshold=4"])
    history = make_trainer(["n_fgsm"]).fit()
    assert history[-1]["val_fgsm"] >= 0  # single-step: the catastrophic-overfitting guard runs


class _Batches:
    """Records each step's inputs and labels at batch_start (every replay of every batch)."""

    name = "batches"

    class Config:
        pass

    def __init__(self, config=None):
        self.seen = []

    from regdefense import hookimpl as _hookimpl

    @_hookimpl
    def regdefense_batch_start(self, step):
        self.seen.append((step.inputs.clone(), step.labels.clone()))


def test_free_at_replays_each_batch_and_carries_delta_as_the_reference_loop():
    """Wong et al.'s train_free.py restated: m replays per batch, one backward for both the weights and δ, δ carried
    across replays and batches (never reset), clipped to the current batch's image range after the ε-ball."""
    m = 3
    recorder = _Batches()
    trainer = _bn_trainer(
        ["free_at", recorder],
        [f"free_at.replays={m}", "train.schedule=constant", "data.limit=128", "train.batch_size=48"],
    )
    g = trainer.optimizer.param_groups[0]
    ref = copy.deepcopy(trainer.model).train()
    opt = torch.optim.SGD(
        ref.parameters(), lr=g["lr"], momentum=g["momentum"], weight_decay=g["weight_decay"], nesterov=g["nesterov"]
    )
    assert trainer.replays == m and trainer.steps_per_epoch == m * len(trainer.train_loader)
    trainer.fit()

    batches = recorder.seen[::m]
    assert len(recorder.seen) == m * len(trainer.train_loader) == trainer.state.global_step  # epoch accounting
    assert all(torch.equal(recorder.seen[k][0], recorder.seen[k - k % m][0]) for k in range(len(recorder.seen)))
    eps = trainer.eps
    delta = torch.zeros(48, *batches[0][0].shape[1:], requires_grad=True)
    for X, y in batches:
        for _ in range(m):
            loss = F.cross_entropy(ref(X + delta[: X.size(0)]), y)
            opt.zero_grad()
            loss.backward()
            grad = delta.grad.detach()
            delta.data = torch.clamp(delta + eps * torch.sign(grad), -eps, eps)
            delta.data[: X.size(0)] = _image_clamp(delta[: X.size(0)], X)
            opt.step()
            delta.grad.zero_()
    free = dict(trainer.pm.list_name_plugin())["free_at"]
    assert torch.allclose(free.delta, delta.detach(), atol=1e-6)
    for a, b in zip(trainer.model.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)  # weights and BatchNorm running statistics


def test_free_at_refuses_awp_and_accumulation_with_the_reason():
    with pytest.raises(ConfigError, match="free_at cannot stack with awp: AWP computes the training backward"):
        make_trainer(["free_at", "awp"]).fit()
    with pytest.raises(ConfigError, match="replays each batch 8 times .* set train.accumulate=1"):
        make_trainer(["free_at"], ["train.accumulate=2"])


def _atas_one_batch(overrides):
    """One adaptive ATAS batch (no warm-up) from a stored G history; what the reference needs to redo it."""
    trainer = _bn_trainer(["atas"], ["atas.warmup_epochs=0", *overrides])
    trainer.hook.regdefense_fit_start(trainer=trainer)
    atas = dict(trainer.pm.list_name_plugin())["atas"]
    atas.gnorm.uniform_(0, 1e-4)  # an earlier epoch's history, so that β matters
    step = _batch(trainer)
    idx, X = step.index, step.inputs
    start, g0 = torch.clamp(X + atas.delta[idx], 0, 1), atas.gnorm[idx].clone()
    ref_model = copy.deepcopy(trainer.model)
    adv = _ours(trainer, step)
    return adv, (ref_model, X, start, step.labels, g0, trainer.eps), (atas.delta[idx], atas.gnorm[idx])


def _their_atas_step(model, X, x_adv, y, gdnorm, eps, *, top, lo, hi, c=0.01, beta=0.5):
    """adv_attack.get_adv_adaptive_step_size restated: model.eval(), the batch-mean CE's gradient at x_adv,
    G = (1 − β)‖g‖² + βG, step = clamp(top / (1 + √G / c), lo, hi) (their top: 2·8/255, whatever ε), one signed
    step projected onto the ε-ball and [0, 1]."""
    model.eval()
    x_adv = x_adv.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(x_adv), y), [x_adv])[0]
    cur = torch.norm(grad.view(len(x_adv), -1), dim=1) ** 2 * (1 - beta) + gdnorm * beta
    sizes = torch.clamp(1 / (1 + torch.sqrt(cur) / c) * top, lo, hi)
    out = x_adv.detach() + sizes.view(-1, 1, 1, 1) * torch.sign(grad)
    return torch.clamp(torch.min(torch.max(out, X - eps), X + eps), 0, 1), cur, sizes


AUTHORS_ATAS = dict(top=2 * 8 / 255, lo=4 / 255, hi=14 / 255)  # ATAS.py and ATAS_CIFAR.sh, in 255ths


@pytest.mark.parametrize(
    "eps255,over",
    [(8, []), (8, ["atas.attack_mode=train"]), (12, ["atas.step_scale=fixed"]), (16, ["atas.step_scale=fixed"])],
    ids=["eps8_default", "eps8_mode_flipped", "eps12_fixed", "eps16_fixed"],
)
def test_atas_adaptive_step_is_the_authors_at_their_three_eps(eps255, over):
    """run.sh trains CIFAR-10 at ε = 8, 12 and 16/255 with the same constants: the numerator 2·8/255 and the step
    bounds 4/255 and 14/255 stay fixed. The default (steps scaled with ε) equals them at 8/255; step_scale=fixed
    keeps them at every ε. The attack runs in eval mode, as theirs."""
    adv, (model, X, start, y, g0, eps), (delta, gnorm) = _atas_one_batch([f"threat.eps={eps255 / 255!r}", *over])
    ref, cur, sizes = _their_atas_step(model, X, start, y, g0, eps, **AUTHORS_ATAS)
    if "atas.attack_mode=train" in over:
        assert _mismatch(adv, ref)  # the wrong mode is seen
        return
    assert torch.allclose(adv, ref, atol=1e-6)
    assert torch.allclose(delta, ref - X, atol=1e-6) and torch.allclose(gnorm, cur, rtol=1e-5)
    assert sizes.min() < sizes.max()  # per-sample steps really differ


def test_atas_default_scales_its_step_constants_with_eps():
    """The default (step_scale=eps, the project's): numerator 2ε, bounds 0.5ε and 1.75ε — at 16/255 not the authors'
    fixed constants, which step_scale=fixed restores (test above)."""
    adv, (model, X, start, y, g0, eps), _ = _atas_one_batch([f"threat.eps={16 / 255!r}"])
    scaled, _, _ = _their_atas_step(model, X, start, y, g0, eps, top=2 * eps, lo=0.5 * eps, hi=1.75 * eps)
    authors, _, _ = _their_atas_step(model, X, start, y, g0, eps, **AUTHORS_ATAS)
    assert torch.allclose(adv, scaled, atol=1e-6) and _mismatch(adv, authors)


def test_atas_warm_up_step_and_reset_epochs_follow_the_reference(monkeypatch):
    from regdefense_baselines.atas import ATAS

    drawn = []
    real = ATAS._draw
    monkeypatch.setattr(ATAS, "_draw", lambda self, trainer, epoch: drawn.append(epoch) or real(self, trainer, epoch))
    trainer = make_trainer(["atas"], ["train.epochs=10", "atas.reset_every=5", "atas.warmup_epochs=2", "data.limit=64"])
    history = trainer.fit()
    assert drawn == [0, 4]  # at the start, then after 1-based epoch 5; not after epoch 10, the last
    steps = [h["log_atas_step"] for h in history]
    assert steps[0] == pytest.approx(1.0) and steps[1] == pytest.approx(1.0)  # warm-up: the constant ε step
    assert all(0.5 - 1e-6 <= s <= 1.75 + 1e-6 for s in steps[2:]) and steps[2:] != [1.0] * 8


# --- HAT (helper-based AT) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_helper(tmp_path_factory):
    from regdefense.testing import TINY
    from regdefense.training.run import train

    return train(
        defenses=["none"],
        overrides=TINY + ["train.epochs=2"],
        out=tmp_path_factory.mktemp("hat") / "std",
        echo=lambda _m: None,
    ).run_dir


def _their_pgd(model, X, y, eps, alpha, steps):
    """The PGD two references train with, restated: advertorch's PGDAttack in consistency's EvalBN wrapper
    (adv_lib/attack.py) and HAT's LinfPGDAttack under ctx_noparamgrad_and_eval (core/attacks/pgd.py): the model in
    eval mode, δ = U(−1, 1)·ε clamped to the image, sign steps on the batch-mean CE, each projected onto the ε-ball
    and the image."""
    training = model.training
    model.eval()
    delta = torch.zeros_like(X).uniform_(-1, 1) * eps
    delta = torch.clamp(X + delta, 0, 1) - X
    for _ in range(steps):
        delta.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(X + delta), y), delta)[0]
        delta = torch.clamp(delta.detach() + alpha * grad.sign(), -eps, eps)
        delta = torch.clamp(X + delta, 0, 1) - X
    model.train(training)
    return torch.clamp(X + delta, 0, 1)


def _hat_one_batch(stack, overrides):
    """HAT's terms and their weight gradient on one batch; the reference model as it was before the attack."""
    trainer = _bn_trainer(stack, overrides)
    trainer.hook.regdefense_fit_start(trainer=trainer)
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model)
    step.adv_inputs = _ours(trainer, step, seed=7)
    terms = trainer.loss_terms(step, trainer.model)
    ours = sum(terms.values())
    return step, terms, ours, torch.autograd.grad(ours, list(trainer.model.parameters())), ref_model, trainer.eps


def _helper_labels(helper_dir, x_adv):
    from regdefense.training.restore import load_model

    with torch.no_grad():  # ctx_noparamgrad_and_eval(hr_model)
        return load_model(helper_dir).eval()(x_adv).argmax(dim=1)


@pytest.mark.parametrize("flip", [None, "trades.attack_mode=train"], ids=["as_reference", "mode_flipped"])
def test_hat_loss_and_its_gradient_are_the_reference_trades_hat(clean_helper, flip):
    """core/utils/hat.py hat_loss restated: TRADES' KL adversary (eval mode, x + 0.001·N), then in train mode
    CE(f(x), y) + β·KL_sum(f(x') ‖ f(x))/B + γ·CE(f(x + h(x' − x)), argmax f_std(x'))."""
    over = [f"hat.helper={clean_helper}", "trades.beta=2.5", "hat.gamma=0.5", "trades.steps=3"]
    step, terms, ours, ours_grad, ref_model, eps = _hat_one_batch(["trades", "hat"], over + ([flip] if flip else []))
    X, y, alpha = step.inputs, step.labels, 2.5 * eps / 3
    torch.manual_seed(7)
    ref_model.eval()
    x_adv = X.detach() + 0.001 * torch.randn(X.shape)
    p_natural = F.softmax(ref_model(X), dim=1)
    for _ in range(3):
        x_adv.requires_grad_()
        loss_kl = F.kl_div(F.log_softmax(ref_model(x_adv), dim=1), p_natural, reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, X - eps), X + eps), 0.0, 1.0)
    if flip:
        assert _mismatch(step.adv_inputs, x_adv)  # the wrong mode is seen
        return
    assert torch.allclose(step.adv_inputs, x_adv, atol=1e-6)
    ref_model.train()
    x_hr = X + 2.0 * (x_adv - X)
    y_hr = _helper_labels(clean_helper, x_adv)
    out_clean, out_adv, out_help = ref_model(X), ref_model(x_adv), ref_model(x_hr)
    loss = (
        F.cross_entropy(out_clean, y)
        + 2.5 * (1 / len(X)) * F.kl_div(F.log_softmax(out_adv, dim=1), F.softmax(out_clean, dim=1), reduction="sum")
        + 0.5 * F.cross_entropy(out_help, y_hr)
    )
    assert torch.allclose(ours, loss, rtol=1e-5)
    for a, b in zip(ours_grad, torch.autograd.grad(loss, list(ref_model.parameters()))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert set(terms) == {"task", "robust", "helper"} and (x_hr.min() < 0 or x_hr.max() > 1)  # not clipped


@pytest.mark.parametrize(
    "over", [[], ["hat.beta=2.0"], ["pgd_at.attack_mode=train"]], ids=["beta_default", "beta_2", "mode_flipped"]
)
def test_hat_at_variant_is_the_reference_at_hat_loss(clean_helper, over):
    """core/utils/hat.py at_hat_loss restated (--robust-loss ce): PGD on CE in eval mode, then in train mode
    loss_clean + β·loss_adv + γ·loss_help = CE(f(x), y) + β·CE(f(x'), y) + γ·CE(f(x + h(x' − x)), argmax f_std(x'))."""
    base = [f"hat.helper={clean_helper}", "hat.gamma=0.5", "pgd_at.steps=3"]
    step, terms, ours, ours_grad, ref_model, eps = _hat_one_batch(["pgd_at", "hat"], base + over)
    X, y = step.inputs, step.labels
    torch.manual_seed(7)
    x_adv = _their_pgd(ref_model, X, y, eps, 2.5 * eps / 3, 3)
    if "pgd_at.attack_mode=train" in over:
        assert _mismatch(step.adv_inputs, x_adv)  # the wrong mode is seen
        return
    assert torch.allclose(step.adv_inputs, x_adv, atol=1e-6)
    beta = 2.0 if over else 1.0  # at_hat_loss's default β
    ref_model.train()
    x_hr = X + 2.0 * (x_adv - X)
    y_hr = _helper_labels(clean_helper, x_adv)
    out_clean, out_adv, out_help = ref_model(X), ref_model(x_adv), ref_model(x_hr)
    loss_clean = F.cross_entropy(out_clean, y, reduction="mean")
    loss = loss_clean + beta * F.cross_entropy(out_adv, y) + 0.5 * F.cross_entropy(out_help, y_hr, reduction="mean")
    assert torch.allclose(ours, loss, rtol=1e-5)
    for a, b in zip(ours_grad, torch.autograd.grad(loss, list(ref_model.parameters()))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_hat_refuses_a_missing_or_mismatched_helper(clean_helper, tmp_path):
    with pytest.raises(ConfigError, match="hat needs a standard-trained helper model"):
        make_trainer(["pgd_at", "hat"]).fit()
    with pytest.raises(ConfigError, match="hat's AT variant adds the clean term itself: leave pgd_at.clean_weight"):
        make_trainer(["pgd_at", "hat"], [f"hat.helper={clean_helper}", "pgd_at.clean_weight=0.5"]).fit()
    trainer = make_trainer(["pgd_at", "hat"], [f"hat.helper={clean_helper}", "pgd_at.steps=1"])
    history = trainer.fit()  # the AT variant: on PGD-AT's objective
    assert history[-1]["loss_helper"] > 0 and history[-1]["loss_clean"] > 0
    assert 0 <= history[-1]["log_hat_helper_agrees"] <= 1


# --- consistency regularisation -----------------------------------------------------------------------------------


def _ref_jsd(logit1, logit2, T):  # the authors' training/__init__.py _jensen_shannon_div, restated
    prob1, prob2 = F.softmax(logit1 / T, dim=1), F.softmax(logit2 / T, dim=1)
    logsoftmax = torch.log((0.5 * (prob1 + prob2)).clamp(min=1e-8))
    return 0.5 * (
        F.kl_div(logsoftmax, prob1, reduction="batchmean") + F.kl_div(logsoftmax, prob2, reduction="batchmean")
    )


@pytest.mark.parametrize("flip", [None, "pgd_at.attack_mode=train"], ids=["as_reference", "mode_flipped"])
def test_consistency_recipe_is_the_reference_adversary_and_loss(flip):
    """From recipes/digits/consistency.toml as written. The adversary: common/train.py builds it with
    attack_module(_eval=False), which wraps advertorch's PGDAttack in EvalBN — the model in eval mode for the attack.
    The loss: adv_train_consistency.train, CE over the 2B adversarial views against the repeated labels, plus
    λ·JSD(f(x'₁), f(x'₂); T) on the two halves; the second view is another augmentation of the same images."""
    trainer = _bn_trainer(None, ["pgd_at.steps=3"] + ([flip] if flip else []), recipe="recipes/digits/consistency.toml")
    trainer.hook.regdefense_fit_start(trainer=trainer)
    step = _batch(trainer)
    b = step.batch_size
    trainer.hook.regdefense_batch_start(trainer=trainer, step=step)
    assert step.batch_size == 2 * b and torch.equal(step.labels[:b], step.labels[b:])
    assert not torch.equal(step.inputs[:b], step.inputs[b:])  # two different views
    raw = trainer.data.train.floats(step.index[:b])
    for view in (step.inputs[:b], step.inputs[b:]):  # crops of the same images: shifted, never brighter
        assert (view.sum((1, 2, 3)) <= raw.sum((1, 2, 3)) + 1e-5).all()
        assert torch.allclose(view.mean(), raw.mean(), atol=0.1)
    ref_model = copy.deepcopy(trainer.model).train()
    step.adv_inputs = _ours(trainer, step)
    eps = trainer.eps
    torch.manual_seed(5)
    x_adv = _their_pgd(ref_model, step.inputs, step.labels, eps, 2.5 * eps / 3, 3)  # the recipe's alpha: 2.5·ε/steps
    if flip:
        assert _mismatch(step.adv_inputs, x_adv)  # the wrong mode is seen
        return
    assert torch.allclose(step.adv_inputs, x_adv, atol=1e-6)
    terms = trainer.loss_terms(step, trainer.model)
    ours = sum(terms.values())
    out = ref_model(x_adv)
    o1, o2 = out.chunk(2)
    loss = F.cross_entropy(out, step.labels) + 1.0 * _ref_jsd(o1, o2, 0.5)
    assert torch.allclose(ours, loss, rtol=1e-5)
    for a, g in zip(
        torch.autograd.grad(ours, list(trainer.model.parameters())),
        torch.autograd.grad(loss, list(ref_model.parameters())),
    ):
        assert torch.allclose(a, g, rtol=1e-4, atol=1e-7)


def test_consistency_needs_augmentation_and_refuses_per_sample_buffers():
    with pytest.raises(ConfigError, match="two augmented views"):
        make_trainer(["pgd_at", "consistency"]).fit()
    with pytest.raises(ConfigError, match="cannot stack with fgsm_pgk"):
        make_trainer(["fgsm_pgk", "consistency"], ["data.augment=crop"]).fit()
    history = make_trainer(["pgd_at", "consistency"], ["data.augment=crop", "pgd_at.steps=1"]).fit()
    assert history[-1]["loss_consistency"] >= 0


# --- the recipes beside the authors' settings -------------------------------------------------------------------

AUTHORS = {  # recipe -> {field: the value of the authors' README / scripts}
    "recipes/digits/consistency.toml": {"pgd_at.attack_mode": "eval"},
    "recipes/cifar10/consistency.toml": {  # common.py defaults, attack.py's PGD, EvalBN
        "pgd_at.attack_mode": "eval",
        "pgd_at.steps": 10,
        "pgd_at.alpha": 2 / 255,
        "threat.eps": 8 / 255,
        "train.epochs": 200,
        "train.lr": 0.1,
        "train.milestones": [100, 150],
        "train.weight_decay": 5e-4,
        "consistency.lam": 1.0,
        "consistency.temperature": 0.5,
    },
    "recipes/cifar10/gradalign.toml": {  # README: --attack_init=zero --grad_align_cos_lambda=0.2 --lr_max=0.30
        "train.lr": 0.3,
        "train.onecycle_pct": 0.4,
        "train.epochs": 30,
        "fast_at.start": "zero",
        "fast_at.alpha": 8 / 255,
        "fast_at.attack_mode": "train",
        "gradalign.weight": 0.2,
    },
    "recipes/cifar10/hat.toml": {  # README: --beta 2.5 --gamma 0.5, parser: --h 2, --lr 0.21, nesterov, 2/255 × 10
        "trades.beta": 2.5,
        "trades.steps": 10,
        "trades.alpha": 2 / 255,
        "hat.gamma": 0.5,
        "hat.h": 2.0,
        "train.lr": 0.21,
        "train.nesterov": True,
        "train.epochs": 50,
        "train.onecycle_pct": 0.25,
    },
    **{
        recipe: {  # run.sh: ATAS_CIFAR.sh cifar10 8 / 12 / 16
            "threat.eps": eps / 255,
            "atas.step_scale": "fixed",
            "atas.c": 0.01,
            "atas.beta": 0.5,
            "atas.min_step": 0.5,
            "atas.max_step": 1.75,
            "atas.warmup_epochs": 5,
            "atas.reset_every": 10,
            "atas.attack_mode": "eval",
            "train.epochs": 30,
            "train.lr": 0.1,
            "train.milestones": [24, 28],
        }
        for recipe, eps in (
            ("recipes/cifar10/atas.toml", 8),
            ("recipes/atas/cifar10_eps12.toml", 12),
            ("recipes/atas/cifar10_eps16.toml", 16),
        )
    },
}


@pytest.mark.parametrize("recipe", sorted(AUTHORS))
def test_the_recipes_carry_the_authors_settings(recipe):
    cfg = load_config(recipe)
    for field, want in AUTHORS[recipe].items():
        section, key = field.split(".")
        got = getattr(cfg.defense[section] if section in cfg.defense else getattr(cfg, section), key)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"{recipe}: {field}"
