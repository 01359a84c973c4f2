"""The baseline defenses: each loss against an independent computation of its formula, and the stacks."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from regdefense.attacks import pgd
from regdefense.errors import PluginError
from regdefense.losses import kl
from regdefense.plugins import activate
from regdefense.step import Step
from regdefense.testing import make_trainer
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


def test_trades_attack_and_loss_match_independent_computations():
    trainer = make_trainer(["trades"], ["trades.steps=5"])
    _train_a_little(trainer)
    step, model = _step(trainer), trainer.model
    eps = trainer.eps
    torch.manual_seed(5)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    # trades.py: x' = x + 0.001·N(0, I) (not clipped before the first forward, unlike torchattacks' TPGD, which
    # clamps the start to [0, 1]), then sign steps on KL(p(x) ‖ p(x')) summed, clipped to the ε-ball and [0, 1]
    torch.manual_seed(5)
    x, alpha = step.inputs, 2.5 * eps / 5
    model.eval()
    p_clean = F.softmax(model(x), dim=1).detach()
    ref = x + 0.001 * torch.randn_like(x)
    for _ in range(5):
        ref.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(ref), dim=1), p_clean, reduction="sum")
        (g,) = torch.autograd.grad(loss, ref)
        ref = torch.min(torch.max(ref.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    assert torch.allclose(adv, ref, atol=1e-6)
    step.adv_inputs = adv
    terms = trainer.loss_terms(step, model)
    expected_robust = 6.0 * _kl_manual(model(step.inputs), model(adv)).mean()
    assert terms["task"].item() == pytest.approx(F.cross_entropy(model(step.inputs), step.labels).item(), rel=1e-5)
    assert terms["robust"].item() == pytest.approx(expected_robust.item(), rel=2e-3)
    assert terms["robust"].item() > 0


def test_mart_loss_matches_its_formula():
    trainer = make_trainer(["mart"], ["mart.steps=3"])
    _train_a_little(trainer)
    step, model = _step(trainer), trainer.model
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    terms = trainer.loss_terms(step, model)
    za, zc, y = model(step.adv_inputs), model(step.inputs), step.labels
    pa, pc = _probs(za), _probs(zc)
    bce = []
    for i in range(len(y)):
        other = max(pa[i, k].item() for k in range(pa.shape[1]) if k != y[i])
        bce.append(-math.log(pa[i, y[i]].item()) - math.log(1.0001 - other + 1e-12))
    robust = [_kl_manual(zc[i:i + 1], za[i:i + 1]).item() * (1.0000001 - pc[i, y[i]].item()) for i in range(len(y))]
    assert terms["task"].item() == pytest.approx(sum(bce) / len(y), rel=1e-4)
    assert terms["robust"].item() == pytest.approx(6.0 * sum(robust) / len(y), rel=2e-3)  # float32 KL of near-equal p


def test_awp_perturbation_size_exact_restore_and_gradient_at_perturbed_weights():
    trainer = make_trainer(["pgd_at", "awp"], ["pgd_at.steps=2", "awp.warmup_epochs=0", "awp.gamma=0.01"])
    awp, model = trainer.pm.get_plugin("awp"), trainer.raw_model
    awp.regdefense_fit_start(trainer)
    _train_a_little(trainer)
    step = _step(trainer)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    v = awp.perturbation(trainer, step)
    assert set(v) == {n for n, _ in perturbable(model)} and all(before[n].dim() > 1 for n in v)
    for n, dv in v.items():
        assert (dv.norm() / before[n].norm()).item() == pytest.approx(0.01, rel=1e-4)  # relative norm γ per layer
    # the wrapper: gradients are those of the objective at w + v, weights restored bit-exactly afterwards
    perturbed = {n: (before[n] + v[n] if n in v else before[n]).requires_grad_(True) for n in before}
    ref = torch.func.functional_call(model, perturbed, (step.adv_inputs,))
    expected = torch.autograd.grad(F.cross_entropy(ref, step.labels), [p for p in perturbed.values()],
                                   allow_unused=True)
    torch.manual_seed(0)
    trainer.optimizer.zero_grad()
    trainer.hook.regdefense_forward_backward(trainer=trainer, step=step)
    for (n, p), g in zip(model.named_parameters(), expected):
        assert torch.equal(p.detach(), before[n])
        assert torch.allclose(p.grad, g, atol=1e-5), n


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


def test_lbgat_loss_and_guide():
    trainer = make_trainer(["lbgat"], ["lbgat.steps=2", "lbgat.beta=6"])
    guide = trainer.modules["lbgat_guide"]
    assert any(p is q for g in trainer.optimizer.param_groups for p in g["params"] for q in guide.parameters())
    step, model = _step(trainer), trainer.model
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    terms = trainer.loss_terms(step, model)
    g, za = guide(step.inputs), model(step.adv_inputs)
    assert terms["task"].item() == pytest.approx(F.mse_loss(za, g).item(), rel=1e-5)
    assert terms["guide"].item() == pytest.approx(F.cross_entropy(g, step.labels).item(), rel=1e-5)
    assert terms["robust"].item() == pytest.approx(6 * _kl_manual(model(step.inputs), za).mean().item(), rel=2e-3)


def test_fast_at_is_fgsm_with_random_start():
    trainer = make_trainer(["fast_at"], [])
    step, model = _step(trainer), trainer.model
    eps = trainer.eps
    torch.manual_seed(1)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(1)
    delta = torch.empty_like(step.inputs).uniform_(-eps, eps)
    delta = (step.inputs + delta).clamp(0, 1) - step.inputs
    d = delta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(step.inputs + d), step.labels, reduction="sum"), d)
    ref = (step.inputs + (delta + 1.25 * eps * g.sign()).clamp(-eps, eps)).clamp(0, 1)
    assert torch.allclose(adv, ref, atol=1e-6)


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
    trainer = make_trainer(["pgd_at", "ema"], ["pgd_at.steps=1", "ema.decay=0.5", "ema.warmup=false"])
    trainer.fit()
    ema = trainer.pm.get_plugin("ema")
    assert trainer.hook.regdefense_eval_model(trainer=trainer) is ema.model
    # replay: the EMA of the weights seen after each step equals the plugin's copy
    trainer2 = make_trainer(["pgd_at"], ["pgd_at.steps=1"])
    seen = []

    class Spy:
        name = "spy"

        from regdefense import hookimpl

        @hookimpl
        def regdefense_batch_end(self, trainer):
            seen.append({k: v.clone() for k, v in trainer.raw_model.state_dict().items()})

    trainer2.pm.register(Spy(), name="spy")
    trainer2.fit()
    avg = {k: v.clone() for k, v in make_trainer(["pgd_at"]).raw_model.state_dict().items()}
    for sd in seen:
        for k in avg:
            avg[k] = 0.5 * avg[k] + 0.5 * sd[k]
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
