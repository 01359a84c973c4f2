"""Regression tests for the five fidelity bugs of issue 15, and the declared data contract between plugins.

Each bug test fails on the code before the fix: it checks the quantity the bug changed, computed independently.
"""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from regdefense import hookimpl
from regdefense.attacks.adapter import resolve_attack
from regdefense.attacks.fixes import CW, UPGD, margin
from regdefense.base.errors import PluginError
from regdefense.evaluation.runner import accuracy
from regdefense.host import contract
from regdefense.host.discovery import activate, call_order, catalogue
from regdefense.host.step import Step
from regdefense.testing import bn_trainer, far_apart, make_trainer
from regdefense_baselines.mail import mail_weights

# --- bug 1: FGSM-PGK's adaptive EMA in recipe order -------------------------------------------------------------

EMA_ADAPTIVE = ["ema.adaptive_tau=0.82", "ema.warmup=false", "train.seed=3"]


def _ema_weights(stack, overrides):
    trainer = make_trainer(stack, overrides)
    trainer.fit()
    ema = dict(trainer.pm.list_name_plugin())["ema"]
    return torch.cat([v.flatten().float() for v in ema.model.state_dict().values()])


def test_adaptive_ema_switches_on_in_recipe_order():
    typed = _ema_weights(["fgsm_pgk", "ema"], EMA_ADAPTIVE)
    reverse = _ema_weights(["ema", "fgsm_pgk"], EMA_ADAPTIVE)
    fixed = _ema_weights(["fgsm_pgk", "ema"], ["ema.warmup=false", "train.seed=3"])
    assert torch.equal(typed, reverse)  # the typed order no longer matters
    assert not torch.allclose(typed, fixed)  # and the adaptive decay really acts (it read acc_ratio)


def test_adaptive_ema_without_a_publisher_is_refused():
    with pytest.raises(PluginError, match=r"ema.*info.acc_ratio.*fgsm_pgk"):
        make_trainer(["pgd_at", "ema"], ["ema.adaptive_tau=0.82"])
    make_trainer(["pgd_at", "ema"])  # without adaptive_tau ema reads nothing: fine


# --- bug 2: MAIL's factor 3 -------------------------------------------------------------------------------------


def test_mail_weights_carry_the_reference_factor_three():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.5], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 0, 2])
    p = logits.softmax(1)
    for bias, slope in ((-0.5, 10.0), (0.0, 2.0)):
        expected = []
        for i in range(3):
            pm = max(p[i, k].item() for k in range(3) if k != y[i]) - p[i, y[i]].item()
            expected.append(3 / (1 + math.exp(-(pm + bias) * slope)))  # weight_assign: sigmoid((PM + b)·s)·3
        assert mail_weights(logits, y, bias, slope).tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("flip", [None, "trades.attack_mode=train"], ids=["as_reference", "mode_flipped"])
def test_mail_trades_robust_term_is_three_sigmoids_times_the_kl(flip):
    """mail_loss.py, method trades, on the BatchNorm digits CNN with skewed running statistics: model.eval() for the
    KL attack from x + 0.001·N(0, I), then model.train(), logits = f(x), logits_adv = f(x'), and
    CE(logits, y) + β·(1/B)·Σ KL_i·3·sigmoid(s·(PM_i + b)) with PM from logits_adv (detached)."""
    over = ["mail.burn_in_epochs=0", "mail.bias=0", "mail.slope=2", "trades.steps=2"] + ([flip] if flip else [])
    trainer = bn_trainer(["trades", "mail"], over)
    x, y, idx = next(iter(trainer.train_loader))
    step, model = Step.from_batch((x[:32], y[:32], idx[:32]), trainer.device), trainer.model
    ref = copy.deepcopy(model)
    eps, alpha = trainer.eps, 2.5 * trainer.eps / 2
    model.train()
    torch.manual_seed(3)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(3)
    x, y = step.inputs, step.labels
    ref.eval()
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(2):
        x_adv.requires_grad_()
        loss_ce = F.kl_div(F.log_softmax(ref(x_adv), dim=1), F.softmax(ref(x), dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss_ce, [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * torch.sign(grad), x - eps), x + eps).clamp(0.0, 1.0)
    ref.train()
    if flip:
        assert far_apart(step.adv_inputs, x_adv, atol=alpha / 2)  # the attack in train mode is seen
        return
    assert torch.allclose(step.adv_inputs, x_adv, atol=1e-6)
    terms = trainer.loss_terms(step, model)
    logits, logits_adv = ref(x), ref(x_adv)
    probs = logits_adv.softmax(1)
    probs_gt = (probs * torch.eye(10)[y]).sum(1).detach()
    top2 = probs.topk(2, largest=True)
    gt_in_top2 = (top2[1] == y.view(-1, 1)).float().sum(1) == 1
    pm = (torch.where(gt_in_top2, top2[0].sum(1) - probs_gt, top2[0][:, 0]) - probs_gt).detach()
    norm_weight = ((pm + 0) * 2).sigmoid().detach() * 3
    kl_each = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="none").sum(1)
    loss_robust = (1.0 / len(x)) * torch.sum(kl_each * norm_weight)
    assert terms["task"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert terms["robust"].item() == pytest.approx(6.0 * loss_robust.item(), rel=1e-3, abs=1e-6)
    assert terms["robust"].item() > 1e-4


# --- bug 3: C&W margins that ignore the true class wrongly ---------------------------------------------------------


class Centroids(torch.nn.Module):
    """Nearest class mean: logits −‖x − μ_k‖² are all negative, the case torchattacks' margin gets wrong."""

    def __init__(self, x, y, shift=0.0):
        super().__init__()
        self.mu = torch.stack([x[y == k].mean(0) for k in range(10)]).flatten(1)
        self.shift = shift

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.mu).pow(2) + self.shift


@pytest.fixture(scope="module")
def centroid_data():
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import load_data

    data = load_data(DataConfig(name="digits"), 0)
    x, y = data.train.floats(torch.arange(len(data.train))), data.train.y
    xt, yt = data.test.floats(torch.arange(60)), data.test.y[:60]
    return x, y, xt, yt


def test_margin_masks_the_true_class():
    z = torch.tensor([[-5.0, -1.0, -3.0], [2.0, 7.0, 1.0]])
    y = torch.tensor([0, 1])
    assert margin(z, y).tolist() == [-4.0, 5.0]
    assert torch.equal(margin(z + 10, y), margin(z, y))


@pytest.mark.parametrize("spec", ["torchattacks:CW(c=10.0, kappa=0, steps=50, lr=0.05)",
                                  "torchattacks:UPGD(eps=0.3, alpha=0.03, steps=20, loss='margin', decay=0.0)"])
def test_cw_robust_accuracy_is_invariant_to_a_constant_on_every_logit(spec, centroid_data):
    x, y, xt, yt = centroid_data
    accs = []
    for shift in (0.0, 10.0, 100.0):
        torch.manual_seed(0)
        model = Centroids(x, y, shift)
        accs.append(accuracy(model, xt, yt, resolve_attack(spec), batch_size=60, device=torch.device("cpu")))
    clean = accuracy(Centroids(x, y), xt, yt, batch_size=60, device=torch.device("cpu"))
    assert max(accs) - min(accs) <= 1 / 60 + 1e-9  # the same classifier: the same robust accuracy
    assert accs[0] < clean - 0.3  # and the attack really attacks points whose logits are all negative


def test_the_library_cw_is_replaced_and_the_original_really_fails(centroid_data):
    x, y, xt, yt = centroid_data
    assert resolve_attack("torchattacks:CW(c=1.0)").cls is CW
    assert resolve_attack("torchattacks:UPGD(eps=0.1)").cls is UPGD
    from regdefense_regularized.eatr import EATR

    assert EATR().attacks(0.1)["cw"].cls is CW  # EATR's C&W term trains on the corrected attack
    model = Centroids(x, y)  # why the fix exists: torchattacks' own CW cannot move these points at all
    adv = torchattacks.CW(model, c=1.0, steps=30, lr=0.01)(xt, yt)
    assert torch.equal(model(adv).argmax(1), model(xt).argmax(1))


# --- bug 4: AWP's probe leaves gradients in other networks ---------------------------------------------------------


def _guide_grad(stack, overrides):
    trainer = make_trainer(stack, ["lbgat.steps=2", "train.seed=5", *overrides])
    trainer.hook.regdefense_fit_start(trainer=trainer)
    x, y, idx = next(iter(trainer.train_loader))
    step = Step.from_batch((x, y, idx), trainer.device)
    torch.manual_seed(1)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.hook.regdefense_forward_backward(trainer=trainer, step=step)
    return trainer, torch.cat([p.grad.flatten() for p in trainer.modules["lbgat_guide"].parameters()])


def test_awp_probe_leaves_no_gradient_outside_its_proxy():
    _, alone = _guide_grad(["lbgat"], [])
    # a vanishing γ: the update is the unperturbed one, so the guide's gradient must be lbgat's alone
    trainer, with_awp = _guide_grad(["lbgat", "awp"], ["awp.warmup_epochs=0", "awp.gamma=1e-12"])
    assert torch.allclose(with_awp, alone, rtol=1e-4, atol=1e-6)
    awp = dict(trainer.pm.list_name_plugin())["awp"]
    trainer.optimizer.zero_grad(set_to_none=True)
    x, y, idx = next(iter(trainer.train_loader))
    step = Step.from_batch((x, y, idx), trainer.device)
    step.adv_inputs = step.inputs
    awp.perturbation(trainer, step)
    nets = [trainer.raw_model, *trainer.modules.values()]
    assert all(p.grad is None for net in nets for p in net.parameters())
    assert any(p.grad is not None for p in awp.proxy.parameters())


# --- bug 5: AToP's purifier left in eval mode -----------------------------------------------------------------------


class ModeSpy:
    name = "mode_spy"

    class Config:
        pass

    def __init__(self):
        self.seen = []

    @hookimpl
    def regdefense_batch_start(self, trainer):
        purifier = trainer.modules["atop_purifier"]
        self.seen.append((trainer.state.epoch, all(m.training for m in purifier.modules())))


def test_the_purifier_trains_in_train_mode_after_the_first_epoch():
    spy = ModeSpy()
    trainer = make_trainer(["atop", spy], ["atop.purifier_width=4", "train.epochs=2", "data.limit=128",
                                           "atop.ce_start_epoch=0"])
    trainer.fit()
    assert {e for e, _ in spy.seen} == {0, 1}
    assert all(training for _, training in spy.seen)


# --- the declared contract ------------------------------------------------------------------------------------------


def _exchanges():
    """Every (writer, reader, key) among the built-ins: a writer publishes a key the reader declares it reads."""
    cat = {n: i.cls for n, i in catalogue().items() if i.builtin and i.cls is not None}
    out = []
    for (w, wc), (r, rc) in itertools.permutations(cat.items(), 2):
        for key in contract.declared_class(wc, "publishes"):
            if any(k.name == key.name for k in contract.declared_class(rc, "reads")):
                out.append((w, r, key.name))
    return sorted(set(out))


WHEN = {"ema": ["ema.adaptive_tau=0.82"], "regmix": [], "gairat": ["gairat.burn_in_epochs=0"],
        "mail": ["mail.burn_in_epochs=0"]}


def test_the_built_ins_declare_their_exchanges():
    pairs = {(w, r) for w, r, _ in _exchanges()}
    for expected in [("fgsm_pgk", "ema"), ("pgd_at", "gairat"), ("trades", "gairat"), ("fgsm_pgk", "regmix"),
                     ("pgd_at", "regmix"), ("mail", "trades"), ("gairat", "mart"), ("mail", "dynat")]:
        assert expected in pairs


@pytest.mark.parametrize("writer, reader, key", _exchanges())
def test_every_exchanging_pair_activates_in_both_orders_with_the_writer_first(writer, reader, key):
    from regdefense.testing import tiny_config

    for stack in ([writer, reader], [reader, writer]):
        cfg = tiny_config(stack, WHEN.get(reader, []) + WHEN.get(writer, []))
        try:
            pm = activate(stack, cfg.defense)
        except PluginError as exc:  # a conflict (two objectives), or a third key the pair lacks, may refuse it
            assert "both provide" in str(exc) or f" {key} " not in str(exc), str(exc)
            continue
        plugins = dict(pm.list_name_plugin())
        w_keys = [k for k in contract.declared(plugins[writer], "publishes") if k.name == key]
        r_keys = [k for k in contract.declared(plugins[reader], "reads") if k.name == key]
        for wk, rk in itertools.product(w_keys, r_keys):
            if wk.hook == rk.hook and writer in call_order(pm, wk.hook) and reader in call_order(pm, wk.hook):
                order = call_order(pm, wk.hook)
                assert order.index(writer) < order.index(reader), (stack, order)


@pytest.mark.parametrize("stack, overrides", [
    (["fgsm_pgk", "ema"], ["ema.adaptive_tau=0.82", "ema.warmup=false"]),
    (["pgd_at", "gairat"], ["gairat.burn_in_epochs=0", "pgd_at.steps=2"]),
    (["fgsm_pgk", "regmix"], []),
    (["trades", "mail"], ["mail.burn_in_epochs=0", "trades.steps=2"]),
])
def test_a_stack_trains_the_same_whatever_order_it_is_typed_in(stack, overrides):
    def weights(s):
        trainer = make_trainer(s, ["train.seed=11", *overrides])
        trainer.fit()
        nets = [trainer.raw_model] + [p.model for _, p in trainer.pm.list_name_plugin() if hasattr(p, "model")]
        return torch.cat([v.flatten().float() for n in nets for v in n.state_dict().values()])

    assert torch.equal(weights(stack), weights(stack[::-1]))


def test_reads_written_only_later_and_unknown_key_objects_are_refused():
    class EarlyReader:
        name = "early"
        reads = (contract.Key("info.acc_ratio", "batch_start", required=True),)

        class Config:
            pass

        @hookimpl
        def regdefense_batch_start(self, step):
            pass

    with pytest.raises(PluginError, match="written only later in the step by 'fgsm_pgk'"):
        activate(["fgsm_pgk", EarlyReader()])

    class Junk(EarlyReader):
        name = "junk"
        reads = ("info.acc_ratio",)

    with pytest.raises(PluginError, match="Key objects"):
        activate([Junk()])
    with pytest.raises(ValueError, match="not a per-batch hook"):
        contract.Key("info.x", "fit_start")


def test_a_missing_optional_writer_warns():
    class Curious:
        name = "curious"
        reads = (contract.Key("info.something", "compute_loss"),)

        class Config:
            pass

        @hookimpl
        def regdefense_batch_end(self, step):
            pass

    messages = []
    activate(["pgd_at", Curious()], warn=messages.append)
    assert messages and "curious" in messages[0] and "info.something" in messages[0]


def test_weights_without_an_objective_that_applies_them_are_refused():
    class NoWeights:
        name = "plain_objective"

        class Config:
            pass

        @hookimpl
        def regdefense_compute_loss(self, step, model):
            return {"task": F.cross_entropy(model(step.adv_inputs), step.targets)}

    with pytest.raises(PluginError, match="mail.*weighters.*no active defense applies"):
        activate(["pgd_at", NoWeights(), "mail"])


# --- deviations fixed against the reference code ---------------------------------------------------------------------


@pytest.mark.parametrize("flip", [None, "dynat.guide_mode=eval"], ids=["as_reference", "mode_flipped"])
def test_dynat_own_adversary_attacks_the_dynamic_labels_as_the_authors_code(flip):
    """dynat.py's dynat_loss on BatchNorm networks with skewed running statistics: the target in eval mode, x' from
    x + 0.001·N(0, I), sign steps on CE(f_t(x'), argmax f_g(x)) with the guide in train mode (never put in eval mode
    by train_dynat_cifar100.py), clipped. ``guide_mode=eval`` gives other labels, so other examples."""
    over = ["dynat.steps=3", "dynat.alpha=0.02", "dynat.guide=digits_cnn_bn"] + ([flip] if flip else [])
    trainer = bn_trainer(["dynat"], over)
    x, y, idx = next(iter(trainer.train_loader))
    step = Step.from_batch((x[:32], y[:32], idx[:32]), trainer.device)
    model, eps = trainer.model, trainer.eps
    ref, ref_guide = copy.deepcopy(model), copy.deepcopy(trainer.modules["dynat_guide"])
    model.train()
    trainer.hook.regdefense_batch_start(trainer=trainer, step=step)
    torch.manual_seed(4)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(4)
    x = step.inputs
    ref.eval()
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(3):
        x_adv.requires_grad_()
        train_label = ref_guide.train()(x).argmax(dim=1)  # recomputed at every step, as theirs: the same labels
        (g,) = torch.autograd.grad(F.cross_entropy(ref(x_adv), train_label), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + 0.02 * g.sign(), x - eps), x + eps).clamp(0, 1)
    if flip:
        assert far_apart(adv, x_adv, atol=0.01)  # the guide's mode is seen
        return
    assert not torch.equal(train_label, step.labels)  # an untrained guide: the labels differ from the truth
    assert torch.allclose(adv, x_adv, atol=1e-6)
    # the target's mode is fixed in code (eval, as theirs): the same restatement in train mode misses by far
    torch.manual_seed(4)
    ref.train()
    x_tr = x + 0.001 * torch.randn_like(x)
    for _ in range(3):
        x_tr.requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(ref(x_tr), train_label), x_tr)
        x_tr = torch.min(torch.max(x_tr.detach() + 0.02 * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert far_apart(adv, x_tr, atol=0.01)


def test_gairat_linear_lambda_follows_the_reference_over_the_whole_run():
    from regdefense_baselines.gairat import GAIRAT

    gairat = GAIRAT(GAIRAT.Config(schedule="linear", lambda_max=3.0, lambda_=-1.0, burn_in_epochs=60))
    trainer = make_trainer(["pgd_at"], ["train.epochs=120"])
    for epoch in (60, 90, 119):
        trainer.state.epoch = epoch
        e = epoch + 1  # adjust_Lambda(epoch + 1): Λ_max − (e/E)·(Λ_max − Λ)
        assert gairat.current_lambda(trainer) == pytest.approx(3.0 - e / 120 * (3.0 - -1.0))


def test_label_smoothing_reaches_every_objective():
    for stack, term in ((["pgd_at"], "task"), (["trades"], "task"), (["dynat"], "guide")):
        values = []
        for ls in (0.0, 0.2):
            trainer = make_trainer(stack, [f"train.label_smoothing={ls}", "train.seed=2"])
            x, y, idx = next(iter(trainer.train_loader))
            step = Step.from_batch((x, y, idx), trainer.device)
            trainer.hook.regdefense_batch_start(trainer=trainer, step=step)
            step.adv_inputs = step.inputs
            values.append(trainer.loss_terms(step, trainer.model)[term].item())
            if ls:
                logits = trainer.model(step.inputs) if term == "task" else trainer.modules["dynat_guide"](step.inputs)
                smooth = F.cross_entropy(logits, step.labels, label_smoothing=0.2).item()
                assert values[-1] == pytest.approx(smooth, rel=1e-5), stack
        assert values[0] != pytest.approx(values[1])


def test_warmup_scales_the_schedule_without_moving_its_milestones():
    from regdefense.testing import tiny_config
    from regdefense.training.schedule import build_scheduler

    def rates(extra):
        t = tiny_config(["pgd_at"], ["train.epochs=6", "train.schedule=multistep", "train.milestones=[3, 5]",
                                     "train.schedule_step=epoch", *extra]).train
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
        sched, out = build_scheduler(opt, t, 4), []
        for _ in range(6):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    plain = rates([])
    const = rates(["train.warmup_epochs=1", "train.warmup=constant", "train.warmup_factor=0.2"])
    linear = rates(["train.warmup_epochs=2", "train.warmup_factor=0.5"])
    assert const == pytest.approx([0.02, *plain[1:]])
    assert linear == pytest.approx([0.05, 0.075, *plain[2:]])
    assert plain == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_adam_betas_are_configurable_and_checked():
    trainer = make_trainer(["pgd_at"], ["train.optimizer=adam", "train.betas=[0.5, 0.999]"])
    assert trainer.optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    from regdefense.base.errors import ConfigError

    with pytest.raises(ConfigError, match="train.betas"):
        make_trainer(["pgd_at"], ["train.betas=[0.5]"])
