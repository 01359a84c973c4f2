"""FAT (early-stopped PGD) against a restatement of the authors' loop, and defensive distillation end to end:
trained as the paper does, it must be flagged by the evaluation's masking checks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from regdefense.attacks.adapter import early_stopped_pgd
from regdefense.host.step import Step
from regdefense.testing import bn_trainer, far_apart, make_trainer


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _reference_fat(model, x, y, eps, alpha, steps, tau):
    """The authors' earlystop(), one point at a time, without noise: freeze a misclassified point with no
    steps left; a misclassified point with steps left uses one; everything still moving takes a sign step."""
    out = []
    for i in range(len(x)):
        xi, yi, left = x[i:i + 1], y[i:i + 1], tau
        adv = xi.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            logits = model(adv)
            if logits.argmax(1).item() != yi.item():
                if left == 0:
                    break
                left -= 1
            (g,) = torch.autograd.grad(F.cross_entropy(logits, yi), adv)
            adv = torch.min(torch.max(adv.detach() + alpha * g.sign(), xi - eps), xi + eps).clamp(0, 1)
        out.append(adv.detach())
    return torch.cat(out)


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_early_stopped_pgd_matches_the_authors_loop(tau):
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import load_data

    data = load_data(DataConfig(name="digits"), 0)
    x, y = data.test.floats(torch.arange(64)), data.test.y[:64]
    model = Linear()
    info = {}
    ours = early_stopped_pgd(model, x, y, eps=0.3, alpha=0.05, steps=8, tau=tau, random_init=False, info=info)
    ref = _reference_fat(model, x, y, 0.3, 0.05, 8, tau)
    assert torch.allclose(ours, ref, atol=1e-6)
    full = early_stopped_pgd(model, x, y, eps=0.3, alpha=0.05, steps=8, tau=99, random_init=False)
    moved_less = (ours - x).abs().flatten(1).sum(1) <= (full - x).abs().flatten(1).sum(1) + 1e-6
    assert moved_less.all() and info["kappa"].max() <= 8


def _their_earlystop(model, data, target, start, step_size, epsilon, K, tau, train_mode=False):
    """earlystop.py (loss_fn cent, omega 0) batched as theirs: model.eval(); each iteration classifies the points still
    iterating, moves out those misclassified with no steps left, spends a step of the other misclassified ones, takes
    the batch-mean CE's sign step on the rest — the batch shrinks as points leave. Returned in the input order
    (theirs concatenates the frozen points first; the mean loss does not see the order)."""
    model.train(train_mode)
    control = torch.full((len(target),), tau)
    iter_adv, iter_clean, iter_target, ids = start.clone(), data, target, torch.arange(len(target))
    out = torch.empty_like(data)
    while K > 0:
        iter_adv.requires_grad_()
        output = model(iter_adv)
        pred = output.max(1, keepdim=True)[1].squeeze(1)
        output_index, iter_index = [], []
        for idx in range(len(pred)):
            if pred[idx] != iter_target[idx]:
                if control[idx] == 0:
                    output_index.append(idx)
                else:
                    control[idx] -= 1
                    iter_index.append(idx)
            else:
                iter_index.append(idx)
        out[ids[output_index]] = iter_adv[output_index].detach()
        (grad,) = torch.autograd.grad(F.cross_entropy(output, iter_target), [iter_adv])
        if not iter_index:
            return out
        control, iter_adv, iter_clean = control[iter_index], iter_adv[iter_index], iter_clean[iter_index]
        iter_target, ids, grad = iter_target[iter_index], ids[iter_index], grad[iter_index]
        iter_adv = iter_adv.detach() + step_size * grad.sign()
        iter_adv = torch.clamp(torch.min(torch.max(iter_adv, iter_clean - epsilon), iter_clean + epsilon), 0, 1)
        K -= 1
    out[ids] = iter_adv.detach()
    return out


def test_fat_plugin_is_the_authors_earlystop_and_loss_on_a_batchnorm_model():
    """Through the plugin, on the BatchNorm digits CNN with skewed running statistics: the examples are earlystop()'s
    (eval mode, fixed in code; uniform start), the loss FAT.py's CE in train mode. The mode is seen: the same
    restatement in train mode misses by far."""
    trainer = bn_trainer(["fat"], ["fat.steps=4", "fat.tau=1", "fat.omega=0"])
    x, y, idx = next(iter(trainer.train_loader))
    step, model, eps = Step.from_batch((x[:32], y[:32], idx[:32]), trainer.device), trainer.model, trainer.eps
    ref = copy.deepcopy(model)
    model.train()
    torch.manual_seed(6)
    adv = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=model)
    torch.manual_seed(6)
    X, Y, alpha = step.inputs, step.labels, 2.5 * eps / 4
    start = torch.clamp(X + torch.empty_like(X).uniform_(-eps, eps), 0.0, 1.0)  # their numpy draw, here torch's
    theirs = _their_earlystop(ref, X, Y, start, alpha, eps, 4, 1)
    assert torch.allclose(adv, theirs, atol=1e-6)
    moved = (theirs - start).abs().flatten(1).amax(1)
    assert (moved < 1.5 * alpha).any() and (moved > 1.5 * alpha).any()  # some points stop after a step, others go on
    step.adv_inputs = adv
    terms = trainer.loss_terms(step, model)
    ref.train()
    loss = F.cross_entropy(ref(theirs), Y)
    assert sum(terms.values()).item() == pytest.approx(loss.item(), rel=1e-5)
    ours = torch.autograd.grad(sum(terms.values()), list(model.parameters()))
    for a, b in zip(ours, torch.autograd.grad(loss, list(ref.parameters()))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    in_train = _their_earlystop(copy.deepcopy(ref), X, Y, start, alpha, eps, 4, 1, train_mode=True)
    assert far_apart(adv, in_train, atol=alpha / 2)


def test_fat_tau_grows_on_the_authors_schedule():
    from regdefense_baselines.fat import FAT

    fat = FAT()
    assert [fat.current_tau(e) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]


def test_fat_trains_and_feeds_gairat():
    trainer = make_trainer(["fat", "gairat"], ["gairat.burn_in_epochs=0", "fat.steps=3"])
    trainer.fit()
    assert trainer.history[-1]["loss"] > 0


def test_distillation_losses_are_the_papers_with_the_teacher_in_inference_mode(tmp_path):
    """Teacher run: CE(softmax(z/T), y); student run: CE of softmax(z/T) against the teacher's softmax(z_t/T), the
    teacher in inference mode (Keras' predict in Carlini's train_models.py, which restates the paper's procedure),
    the student's forward in train mode — on BatchNorm networks with skewed running statistics."""
    from regdefense.base import checkpoint

    teacher_run = bn_trainer(["distillation"], ["distillation.temperature=20"])
    x, y, idx = next(iter(teacher_run.train_loader))
    step = Step.from_batch((x[:32], y[:32], idx[:32]), teacher_run.device)
    step.adv_inputs = step.inputs  # no adversary: the loop trains on the inputs
    ref = copy.deepcopy(teacher_run.model).train()
    teacher_run.model.train()
    terms = teacher_run.loss_terms(step, teacher_run.model)
    assert terms["task"].item() == pytest.approx(F.cross_entropy(ref(step.inputs) / 20, step.labels).item(), rel=1e-5)

    checkpoint.save({"format": checkpoint.FORMAT, "model": teacher_run.raw_model.state_dict()}, tmp_path / "t.pt")
    student = bn_trainer(["distillation"], ["distillation.temperature=20", f"distillation.teacher={tmp_path / 't.pt'}"])
    teacher = copy.deepcopy(student.modules["distillation_teacher"])
    ref = copy.deepcopy(student.model).train()
    student.model.train()
    terms = student.loss_terms(step, student.model)
    ours = torch.autograd.grad(terms["task"], list(student.model.parameters()))
    with torch.no_grad():
        soft = F.softmax(teacher.eval()(step.inputs) / 20, dim=1)
        soft_train = F.softmax(teacher.train()(step.inputs) / 20, dim=1)
    loss = -(soft * F.log_softmax(ref(step.inputs) / 20, dim=1)).sum(1).mean()
    assert terms["task"].item() == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(ours, torch.autograd.grad(loss, list(ref.parameters()))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert far_apart(soft, soft_train, atol=1e-3)  # the teacher's mode is seen


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from regdefense.training.run import train

    base = tmp_path_factory.mktemp("distill")
    common = ["train.progress=false", "train.device=cpu", "train.epochs=12", "eval.val_samples=32",
              "eval.pgd_steps=1", "distillation.temperature=100", "train.optimizer=adam", "train.lr=0.01"]
    teacher = train(defenses=["distillation"], overrides=common, out=base / "teacher", echo=lambda s: None).run_dir
    student = train(defenses=["distillation"], overrides=[*common, f"distillation.teacher={teacher}"],
                    out=base / "student", echo=lambda s: None)
    return student


def test_the_student_learns_the_teachers_soft_labels(distilled):
    assert distilled.history[-1]["val_clean"] > 0.7  # it classifies, from the teacher's soft labels alone


def test_defensive_distillation_is_flagged_by_the_evaluation(distilled):
    from regdefense.evaluation.runner import evaluate

    report, _ = evaluate(distilled.run_dir, suites=["quick"], n=200, progress=False, adaptive="off")
    warned = {c["name"] for c in report.checks if c["status"] == "warn"}
    assert report.clean > 0.7
    # the saturated softmax zeroes the CE gradient, and a gradient-free attack breaks what PGD cannot; a loss that
    # ignores the logits' scale (DLR) and a transfer from the automatic clean surrogate do too
    assert {"input gradients", "black-box vs white-box", "scale-invariant loss (DLR) vs CE",
            "transfer from a clean surrogate"} <= warned, report.checks
    assert "overstates robustness" in (distilled.run_dir / "eval" / "report.md").read_text()
    # the checks' attacks enter the checkpoint's ledger: the best-known headline is far below the suites' own
    assert report.meta["best_known"]["robust"] < report.worst_case - 0.3
