"""FAT (early-stopped PGD) against a restatement of the authors' loop, and defensive distillation end to end:
trained as the paper does, it must be flagged by the evaluation's masking checks."""

import pytest
import torch
import torch.nn.functional as F

from regdefense.attacks import early_stopped_pgd
from regdefense.step import Step
from regdefense.testing import make_trainer


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
    from regdefense.config import DataConfig
    from regdefense.data import load_data

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


def test_fat_tau_grows_on_the_authors_schedule():
    from regdefense_baselines.fat import FAT

    fat = FAT()
    assert [fat.current_tau(e) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]


def test_fat_trains_and_feeds_gairat():
    trainer = make_trainer(["fat", "gairat"], ["gairat.burn_in_epochs=0", "fat.steps=3"])
    trainer.fit()
    assert trainer.history[-1]["loss"] > 0


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from regdefense.run import train

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
    from regdefense.evaluate import evaluate

    report, _ = evaluate(distilled.run_dir, suites=["quick"], n=200, progress=False)
    warned = {c["name"] for c in report.checks if c["status"] == "warn"}
    assert report.clean > 0.7
    # the saturated softmax zeroes the CE gradient, and a gradient-free attack breaks what PGD cannot; a loss that
    # ignores the logits' scale (DLR) and a transfer from the automatic clean surrogate do too
    assert {"input gradients", "black-box vs white-box", "scale-invariant loss (DLR) vs CE",
            "transfer from a clean surrogate"} <= warned, report.checks
    assert "overstates robustness" in (distilled.run_dir / "eval" / "report.md").read_text()
    # the checks' attacks enter the checkpoint's ledger: the best-known headline is far below the suites' own
    assert report.meta["best_known"]["robust"] < report.worst_case - 0.3
