"""The single-step family against their authors' code (issue 28): each reference's inner maximisation and loss is
restated here from reading it — N-FGSM (pdejorge/N-FGSM, train.py), GradAlign (tml-epfl/understanding-fast-adv-training,
train.py and utils.get_input_grad), ZeroGrad and MultiGrad (the authors' quantile_fgsm and consensus_fgsm) — and
compared with the plugin on one batch, from the same random draws and the same model state.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from regdefense.errors import ConfigError, UserError
from regdefense.step import Step
from regdefense.testing import make_trainer
from regdefense_baselines.gradalign import alignment
from regdefense_baselines.zerograd import consensus, quantile_mask


def _batch(trainer):
    x, y, idx = next(iter(trainer.train_loader))
    return Step.from_batch((x, y, idx), trainer.device)


def _ours(trainer, step, seed=5):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)


def _image_clamp(d, X):
    return torch.max(torch.min(d, 1 - X), -X)  # their clamp(delta, lower_limit - X, upper_limit - X)


def test_n_fgsm_is_the_reference_step_noise_2eps_step_eps_and_no_projection():
    trainer = make_trainer(["n_fgsm"])
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model).train()
    adv = _ours(trainer, step)
    X, y, eps = step.inputs, step.labels, trainer.eps
    torch.manual_seed(5)  # restated: eta ~ U(-2eps, 2eps) (one channel), clamped to the image, one step of alpha = eps
    eta = torch.zeros_like(X).uniform_(-2 * eps, 2 * eps)
    eta = _image_clamp(eta, X).requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(ref_model(X + eta), y), eta)[0]
    delta = _image_clamp(eta.detach() + eps * torch.sign(grad), X)  # no clip to the eps-ball (clip=-1)
    assert torch.allclose(adv, X + delta, atol=1e-6)
    assert (adv - X).abs().max() > eps * 1.5  # the perturbation leaves the eps-ball, as it should
    assert torch.equal(step.info["x_init"], X + eta.detach())


def test_zerograd_is_the_reference_quantile_fgsm():
    trainer = make_trainer(["zerograd"], ["zerograd.q=0.35"])
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
    assert torch.allclose(adv, ref, atol=1e-6)
    zeroed = (quantile_mask(grad, 0.35) == 0).float().mean()
    assert 0.3 <= float(zeroed) <= 0.6  # about q of the coordinates carry no step (plus exact zeros)


def test_multigrad_is_the_reference_consensus_fgsm_from_x():
    trainer = make_trainer(["multigrad"], ["multigrad.samples=3"])
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
    assert torch.allclose(adv, X + d, atol=1e-6)
    kept = (d != 0) & ((X > 0) & (X < 1))
    assert 0 < float(kept.float().mean()) < 1  # some coordinates disagree and take no step
    assert torch.equal(consensus(grads, 2), torch.where(g.abs() < 1, torch.zeros_like(g), g))  # 2 of 3 agree


def test_gradalign_term_and_its_weight_gradient_are_the_reference_regulariser():
    over = ["fast_at.start=zero", "fast_at.alpha=0.2", "gradalign.weight=0.2"]
    trainer = make_trainer(["fast_at", "gradalign"], over)
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model).train()
    step.adv_inputs = _ours(trainer, step)
    torch.manual_seed(11)
    terms = trainer.loss_terms(step, trainer.model)
    params = [p for p in trainer.model.parameters()]
    ours = torch.autograd.grad(terms["gradalign"], params)

    X, y, eps = step.inputs, step.labels, trainer.eps
    delta = torch.zeros_like(X, requires_grad=True)  # attack_init = zero, fgsm_alpha = 1
    grad = torch.autograd.grad(F.cross_entropy(ref_model(torch.clamp(X + delta, 0, 1)), y), delta)[0].detach()
    torch.manual_seed(11)
    d2 = torch.zeros_like(X).uniform_(-eps, eps).requires_grad_(True)  # get_input_grad('random_uniform'): unclamped
    grad2 = torch.autograd.grad(F.cross_entropy(ref_model(X + d2), y), d2, create_graph=True)[0]
    nnz = ((grad ** 2).sum([1, 2, 3]) ** 0.5 != 0) * ((grad2 ** 2).sum([1, 2, 3]) ** 0.5 != 0)
    g1, g2 = grad[nnz], grad2[nnz]
    cos = torch.sum(g1 / (g1 ** 2).sum([1, 2, 3]).sqrt()[:, None, None, None]
                    * g2 / (g2 ** 2).sum([1, 2, 3]).sqrt()[:, None, None, None], (1, 2, 3))
    reg = 0.2 * (1.0 - cos.mean())
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
    trainer = make_trainer(["free_at", recorder], [f"free_at.replays={m}", "train.schedule=constant",
                                                   "data.limit=128", "train.batch_size=48"])
    g = trainer.optimizer.param_groups[0]
    ref = copy.deepcopy(trainer.model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=g["lr"], momentum=g["momentum"], weight_decay=g["weight_decay"],
                          nesterov=g["nesterov"])
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
    for a, b in zip(trainer.model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_free_at_refuses_awp_and_accumulation_with_the_reason():
    with pytest.raises(ConfigError, match="free_at cannot stack with awp: AWP computes the training backward"):
        make_trainer(["free_at", "awp"]).fit()
    with pytest.raises(ConfigError, match="replays each batch 8 times .* set train.accumulate=1"):
        make_trainer(["free_at"], ["train.accumulate=2"])


def test_atas_adaptive_step_is_the_reference_per_sample_step():
    """ATAS.py / adv_attack.get_adv_adaptive_step_size restated: eval-mode CE-mean gradient at clip(x + δ[idx]),
    G ← (1 − β)‖g‖² + βG, step = clip(2ε/(1 + √G/c), 4/255, 14/255 at ε = 8/255), projected, clipped, stored."""
    trainer = make_trainer(["atas"], ["atas.warmup_epochs=0"])
    trainer.hook.regdefense_fit_start(trainer=trainer)
    atas = dict(trainer.pm.list_name_plugin())["atas"]
    atas.gnorm.uniform_(0, 1e-4)  # an earlier epoch's history, so that β matters
    step = _batch(trainer)
    idx, X, y, eps = step.index, step.inputs, step.labels, trainer.eps
    delta0, g0 = atas.delta[idx].clone(), atas.gnorm[idx].clone()
    ref_model = copy.deepcopy(trainer.model).eval()
    adv = _ours(trainer, step)

    x_adv = torch.clamp(X + delta0, 0, 1).requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(ref_model(x_adv), y), [x_adv])[0]
    cur = torch.norm(grad.view(len(x_adv), -1), dim=1) ** 2 * (1 - 0.5) + g0 * 0.5
    sizes = torch.clamp(1 / (1 + torch.sqrt(cur) / 0.01) * 2 * eps, 0.5 * eps, 1.75 * eps)
    ref = x_adv.detach() + sizes.view(-1, 1, 1, 1) * torch.sign(grad)
    ref = torch.clamp(torch.min(torch.max(ref, X - eps), X + eps), 0, 1)
    assert torch.allclose(adv, ref, atol=1e-6)
    assert torch.allclose(atas.delta[idx], ref - X, atol=1e-6) and torch.allclose(atas.gnorm[idx], cur, rtol=1e-5)
    assert sizes.min() < sizes.max()  # per-sample steps really differ


def test_atas_warm_up_step_and_reset_epochs_follow_the_reference(monkeypatch):
    from regdefense_baselines.atas import ATAS

    drawn = []
    real = ATAS._draw
    monkeypatch.setattr(ATAS, "_draw", lambda self, trainer, epoch: drawn.append(epoch) or real(self, trainer, epoch))
    trainer = make_trainer(["atas"], ["train.epochs=10", "atas.reset_every=5", "atas.warmup_epochs=2",
                                      "data.limit=64"])
    history = trainer.fit()
    assert drawn == [0, 4]  # at the start, then after 1-based epoch 5; not after epoch 10, the last
    steps = [h["log_atas_step"] for h in history]
    assert steps[0] == pytest.approx(1.0) and steps[1] == pytest.approx(1.0)  # warm-up: the constant ε step
    assert all(0.5 - 1e-6 <= s <= 1.75 + 1e-6 for s in steps[2:]) and steps[2:] != [1.0] * 8


# --- HAT (helper-based AT) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_helper(tmp_path_factory):
    from regdefense.run import train
    from regdefense.testing import TINY

    return train(defenses=["none"], overrides=TINY + ["train.epochs=2"], out=tmp_path_factory.mktemp("hat") / "std",
                 echo=lambda _m: None).run_dir


def test_hat_loss_and_its_gradient_are_the_reference_trades_hat(clean_helper):
    """core/utils/hat.py hat_loss restated: TRADES' KL adversary (eval mode, x + 0.001·N), then in train mode
    CE(f(x), y) + β·KL_sum(f(x') ‖ f(x))/B + γ·CE(f(x + h(x' − x)), argmax f_std(x'))."""
    from regdefense.restore import load_model

    trainer = make_trainer(["trades", "hat"], [f"hat.helper={clean_helper}", "trades.beta=2.5", "hat.gamma=0.5",
                                               "trades.steps=3"])
    trainer.hook.regdefense_fit_start(trainer=trainer)
    step = _batch(trainer)
    ref_model = copy.deepcopy(trainer.model)
    adv = _ours(trainer, step, seed=7)
    step.adv_inputs = adv
    trainer.model.train()
    terms = trainer.loss_terms(step, trainer.model)
    ours = sum(terms.values())
    ours_grad = torch.autograd.grad(ours, list(trainer.model.parameters()))

    X, y, eps = step.inputs, step.labels, trainer.eps
    alpha = 2.5 * eps / 3
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
    assert torch.allclose(adv, x_adv, atol=1e-6)
    ref_model.train()
    x_hr = X + 2.0 * (x_adv - X)
    helper = load_model(clean_helper)
    with torch.no_grad():
        y_hr = helper(x_adv).argmax(dim=1)
    out_clean, out_adv, out_help = ref_model(X), ref_model(x_adv), ref_model(x_hr)
    loss = (F.cross_entropy(out_clean, y) + 2.5 * (1 / len(X)) * F.kl_div(F.log_softmax(out_adv, dim=1),
            F.softmax(out_clean, dim=1), reduction="sum") + 0.5 * F.cross_entropy(out_help, y_hr))
    assert torch.allclose(ours, loss, rtol=1e-5)
    for a, b in zip(ours_grad, torch.autograd.grad(loss, list(ref_model.parameters()))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert set(terms) == {"task", "robust", "helper"} and (x_hr.min() < 0 or x_hr.max() > 1)  # not clipped


def test_hat_refuses_a_missing_or_mismatched_helper(clean_helper, tmp_path):
    with pytest.raises(ConfigError, match="hat needs a standard-trained helper model"):
        make_trainer(["pgd_at", "hat"]).fit()
    trainer = make_trainer(["pgd_at", "hat"], [f"hat.helper={clean_helper}", "pgd_at.steps=1"])
    history = trainer.fit()  # the AT variant: on PGD-AT's objective
    assert history[-1]["loss_helper"] > 0 and 0 <= history[-1]["log_hat_helper_agrees"] <= 1


# --- consistency regularisation -----------------------------------------------------------------------------------


def _ref_jsd(logit1, logit2, T):  # the authors' training/__init__.py _jensen_shannon_div, restated
    prob1, prob2 = F.softmax(logit1 / T, dim=1), F.softmax(logit2 / T, dim=1)
    logsoftmax = torch.log((0.5 * (prob1 + prob2)).clamp(min=1e-8))
    return 0.5 * (F.kl_div(logsoftmax, prob1, reduction="batchmean") + F.kl_div(logsoftmax, prob2,
                                                                                reduction="batchmean"))


def test_consistency_loss_is_the_reference_adv_train_consistency():
    """adv_train_consistency.train restated: CE over the 2B adversarial views against the repeated labels, plus
    λ·JSD(f(x'₁), f(x'₂); T) on the two halves; the second view is another augmentation of the same images."""
    trainer = make_trainer(["pgd_at", "consistency"], ["data.augment=crop", "pgd_at.steps=2", "consistency.lam=1.0",
                                                       "consistency.temperature=0.5"])
    trainer.hook.regdefense_fit_start(trainer=trainer)
    step = _batch(trainer)
    b = step.batch_size
    trainer.hook.regdefense_batch_start(trainer=trainer, step=step)
    assert step.batch_size == 2 * b and torch.equal(step.labels[:b], step.labels[b:])
    assert not torch.equal(step.inputs[:b], step.inputs[b:])  # two different views
    raw = trainer.data.train.floats(step.index[:b])
    for view in (step.inputs[:b], step.inputs[b:]):  # crops of the same images: shifted, never brighter
        assert (view.sum((1, 2, 3)) <= raw.sum((1, 2, 3)) + 1e-5).all() and torch.allclose(view.mean(), raw.mean(), atol=0.1)
    step.adv_inputs = _ours(trainer, step)
    ref_model = copy.deepcopy(trainer.model).train()
    terms = trainer.loss_terms(step, trainer.model)
    ours = sum(terms.values())
    out = ref_model(step.adv_inputs)
    o1, o2 = out.chunk(2)
    loss = F.cross_entropy(out, step.labels) + 1.0 * _ref_jsd(o1, o2, 0.5)
    assert torch.allclose(ours, loss, rtol=1e-5)
    for a, g in zip(torch.autograd.grad(ours, list(trainer.model.parameters())),
                    torch.autograd.grad(loss, list(ref_model.parameters()))):
        assert torch.allclose(a, g, rtol=1e-4, atol=1e-7)


def test_consistency_needs_augmentation_and_refuses_per_sample_buffers():
    with pytest.raises(ConfigError, match="two augmented views"):
        make_trainer(["pgd_at", "consistency"]).fit()
    with pytest.raises(ConfigError, match="cannot stack with fgsm_pgk"):
        make_trainer(["fgsm_pgk", "consistency"], ["data.augment=crop"]).fit()
    history = make_trainer(["pgd_at", "consistency"], ["data.augment=crop", "pgd_at.steps=1"]).fit()
    assert history[-1]["loss_consistency"] >= 0
