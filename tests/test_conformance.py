"""The GPU recipes against their authors' training scripts: the learning rate of every epoch and the epoch each
defense switches on. The references are restated here from reading the authors' code (cited per entry); their
epochs count from 1 where the script loops ``for epoch in range(1, epochs + 1)``, ours from 0.

Run with ``-s`` to see the per-recipe table.
"""

from pathlib import Path

import pytest
import torch

from regdefense.training.run import load_config
from regdefense.training.schedule import build_scheduler

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _stage(e1: int, base: float, decays: list[tuple[int, float]]) -> float:
    """``base`` times the factor of the last decay whose (1-based) epoch ``e1`` has reached."""
    factor = 1.0
    for start, f in decays:
        if e1 >= start:
            factor = f
    return base * factor


def trades_code(e):  # TRADES train_trades_cifar10.py / MART train_wideresnet.py: 1-based, x0.1 at 75, x0.01 at 90
    return _stage(e + 1, 0.1, [(75, 0.1), (90, 0.01), (100, 0.001)])


def gairat_code(e):  # GAIRAT.py, 120 epochs: lr_schedule(epoch + 1), t/120 < 0.5, 0.75, 11/12, else lr_max/200
    t = (e + 1) / 120
    return 0.1 if t < 0.5 else 0.01 if t < 0.75 else 0.001 if t < 11 / 12 else 0.0005


def mail_code(e):  # MAIL train.py (120-epoch branch, 0-based, base 0.01): MAIL resumes at epoch 75 from the base
    ref = e if e < 70 else e + 5  # model saved at epoch 70 and stops after epoch 100: our epoch 70 is its 75
    return _stage(ref, 0.01, [(75, 0.1), (90, 0.01), (100, 0.001)])


def awp_code(e):  # AWP trades_AWP/train_trades_cifar.py: 1-based, x0.1 at 100, x0.01 at 150
    return _stage(e + 1, 0.1, [(100, 0.1), (150, 0.01)])


def dynat_code(e):  # DYNAT train_dynat_cifar100(_AWP).py: 1-based, epoch 1 at 0.02, x0.1 at 76, x0.01 at 91
    return 0.02 if e == 0 else _stage(e + 1, 0.1, [(76, 0.1), (91, 0.01)])


def atas_code(e):  # ATAS.py: MultiStepLR at [24, 28] x len(loader) iterations, epochs 1..30: 0-based 24 and 28
    return _stage(e, 0.1, [(24, 0.1), (28, 0.01)])


def cohen_code(e):  # locuslab/smoothing train.py: StepLR(30, 0.1), scheduler.step(epoch) before each 0-based epoch
    return _stage(e, 0.1, [(30, 0.1), (60, 0.01)])


def salman_code(e):  # smoothing-adversarial train_pgd.py, the README's command: StepLR(50, 0.1), step(epoch) first
    return _stage(e, 0.1, [(50, 0.1), (100, 0.01)])


def macer_code(e):  # RuntianZ/macer main.py: MultiStepLR([200, 400]) stepped before each 1-based epoch: 200 is decayed
    return _stage(e + 1, 0.01, [(200, 0.1), (400, 0.01)])


#: recipe -> (epochs, lr per 0-based epoch, {defense: 0-based epoch it switches on})
REFERENCE = {
    "cifar10/gaussian_aug.toml": (90, cohen_code, {}),
    "cifar10/smoothadv.toml": (150, salman_code, {}),
    "cifar10/macer.toml": (440, macer_code, {}),
    "cifar10/atas.toml": (30, atas_code, {}),
    "cifar10/trades.toml": (76, trades_code, {}),
    "cifar10/mart.toml": (76, trades_code, {}),
    "cifar10/pgd_at_gairat.toml": (120, gairat_code, {"gairat": 59}),  # reweights when epoch + 1 >= 60
    "cifar10/trades_mail.toml": (96, mail_code, {"mail": 70}),
    "cifar10/trades_awp.toml": (200, awp_code, {"awp": 9}),  # AWP when epoch >= 10, 1-based
    "dynat/cifar10.toml": (100, dynat_code, {}),
    "dynat/cifar100.toml": (100, dynat_code, {}),
    "dynat/cifar10_awp.toml": (100, dynat_code, {"awp": 9}),
    "dynat/cifar10_inner_awp.toml": (100, dynat_code, {"awp": 9}),
    "dynat/cifar100_awp.toml": (100, dynat_code, {"awp": 9}),
    "dynat/cifar100_inner_awp.toml": (100, dynat_code, {"awp": 9}),
    # the DYNAT-GAIRAT/MAIL experiments follow GAIRAT's schedule with the paper's 70-epoch burn-in (text, no code)
    "dynat/cifar10_gairat.toml": (120, gairat_code, {"gairat": 70}),
    "dynat/cifar10_inner_gairat.toml": (120, gairat_code, {"gairat": 70}),
    "dynat/cifar10_inner_gairat_swapped.toml": (120, gairat_code, {"gairat": 70}),
    "dynat/cifar10_mail.toml": (120, gairat_code, {"mail": 70}),
    "dynat/cifar10_inner_mail.toml": (120, gairat_code, {"mail": 70}),
}

SWITCH = {"awp": "warmup_epochs", "gairat": "burn_in_epochs", "mail": "burn_in_epochs"}


def per_epoch_lr(cfg) -> list[float]:
    """The rate each epoch's first batch uses, from the same scheduler the trainer builds."""
    t = cfg.train
    per_epoch = 3 if t.schedule_step == "iter" else 1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    sched = build_scheduler(opt, t, per_epoch)
    out = []
    for _ in range(t.epochs):
        out.append(opt.param_groups[0]["lr"])
        for _ in range(per_epoch if t.schedule_step == "iter" else 1):
            opt.step()  # no gradient: a no-op, in the order the trainer calls them
            sched.step()
    return out


def _runs(values: list[float]) -> str:
    """'0-73: 0.1 | 74-75: 0.01' for a per-epoch list."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or abs(values[i] - values[start]) > 1e-12 * max(1.0, values[start]):
            parts.append(f"{start}-{i - 1}: {values[start]:.6g}")
            start = i
    return " | ".join(parts)


@pytest.mark.parametrize("recipe", sorted(REFERENCE))
def test_recipe_schedule_matches_the_reference_code(recipe):
    epochs, lr_of, switch = REFERENCE[recipe]
    cfg = load_config(str(RECIPES / recipe))
    ours = per_epoch_lr(cfg)
    theirs = [lr_of(e) for e in range(epochs)]
    print(f"\n{recipe}\n  ours:      {_runs(ours)}\n  reference: {_runs(theirs)}")
    assert cfg.train.epochs == epochs
    assert ours == pytest.approx(theirs, rel=1e-9)
    for name, epoch in switch.items():
        ours_on = getattr(cfg.defense[name], SWITCH[name])
        print(f"  {name} on from epoch {ours_on} (reference {epoch})")
        assert ours_on == epoch


def test_every_gpu_recipe_with_a_schedule_reference_is_listed():
    """A new recipe in these folders must be added above (or to the explicit list of unchecked ones)."""
    unchecked = {"cifar10/fast_at.toml", "cifar10/fgsm_pgk.toml", "cifar10/lbgat.toml", "cifar10/pgd_at.toml",
                 "cifar10/pgd_at_awp.toml",  # references not in the searchable copies: see each defense's page
                 # the fast-AT family's cyclic schedules are PyTorch's one-cycle (cosine, not linear, annealing); HAT's
                 # 'cyclic', consistency's and IBP's schedules: see each page
                 "cifar10/n_fgsm.toml", "cifar10/gradalign.toml", "cifar10/zerograd.toml", "cifar10/multigrad.toml",
                 "cifar10/free_at.toml", "cifar10/hat.toml", "cifar10/consistency.toml", "cifar10/ibp.toml"}
    found = {str(p.relative_to(RECIPES)) for folder in ("cifar10", "dynat") for p in (RECIPES / folder).glob("*.toml")}
    assert found == set(REFERENCE) | unchecked
