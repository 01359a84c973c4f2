"""Randomized smoothing (issue 37): Cohen et al.'s CERTIFY restated, checked statistically on a linear classifier whose
smoothed radius is known in closed form (and shown to catch a wrong radius formula), per-point seeding across chunks
and resume, the three training defenses' losses restated on one batch, and ``evaluate --certify smoothing``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scipy.stats import binom
from torch import nn

import regdefense.evaluation.smoothing as sm
from regdefense.base.errors import ConfigError
from regdefense.evaluation.smoothing import ABSTAIN, Progress, Settings, certify, predict

# --- (a) counts -> Clopper-Pearson bound -> radius, restated ------------------------------------------------------


def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    """The root of an increasing ``f`` on [lo, hi]."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _cp_lower(k: int, n: int, alpha: float) -> float:
    """The one-sided Clopper-Pearson lower bound from its definition: the p at which P(X ≥ k | n, p) = α."""
    if k == 0:
        return 0.0
    return _bisect(lambda p: binom.sf(k - 1, n, p) - alpha, 0.0, 1.0)


def _phi_inv(p: float) -> float:
    return _bisect(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))) - p, -40.0, 40.0)


def _cohen(k: int, n: int, alpha: float, sigma: float) -> tuple[bool, float]:
    """Cohen et al.'s decision on the estimation counts: (abstains, radius)."""
    p = _cp_lower(k, n, alpha)
    return (True, 0.0) if p < 0.5 else (False, sigma * _phi_inv(p))


@pytest.mark.parametrize(
    "k,n,alpha,sigma",
    [
        (100_000, 100_000, 0.001, 0.25),
        (99_000, 100_000, 0.001, 0.5),
        (60, 100, 0.001, 0.12),
        (51, 100, 0.05, 1.0),
        (530, 1000, 0.001, 0.25),
        (1, 10, 0.1, 0.25),
        (0, 10, 0.1, 0.25),
        (7, 7, 0.01, 1.0),
    ],
)
def test_certify_decision_equals_the_restatement_on_fixed_counts(k, n, alpha, sigma):
    p = sm.lower_confidence_bound(k, n, alpha)
    assert p == pytest.approx(_cp_lower(k, n, alpha), abs=1e-9)
    abstains, radius = _cohen(k, n, alpha, sigma)
    assert (p < 0.5) == abstains
    assert sm.certified_radius(p, sigma) == pytest.approx(radius, abs=1e-7)


class _Const(nn.Module):
    def __init__(self, c: int, k: int = 10) -> None:
        super().__init__()
        self.c, self.k, self.calls = c, k, 0

    def forward(self, x):
        self.calls += len(x)
        return F.one_hot(torch.full((len(x),), self.c), self.k).float()


def test_certify_wires_counts_to_the_decision():
    s = Settings(0.5, n0=7, n=300, alpha=0.01, batch=64)
    model = _Const(3)
    r = certify(model, torch.rand(2, 1, 4, 4), s, num_classes=10)
    assert r.prediction.tolist() == [3, 3] and r.count.tolist() == [300, 300] and model.calls == 2 * 307
    assert r.radius[0].item() == pytest.approx(0.5 * _phi_inv(0.01 ** (1 / 300)), abs=1e-6)  # p̲ⁿ = α


# --- (b) the closed-form check on a linear classifier -----------------------------------------------------------


class _Linear(nn.Module):
    """Binary f(x) = [w·x + b > 0]: its smoothed classifier predicts the same side, and the exact certified radius
    of g is the distance |w·x + b| / ‖w‖ to the boundary (Cohen et al., section 3.3)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], 1)


def _linear_points(m: int, sigma: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, generator=g)
    w = w / w.norm() * 2.0
    p = 0.55 + 0.445 * torch.rand(m, generator=g)  # the true p_A of each point, 0.55 to 0.995
    dist = sigma * torch.tensor([_phi_inv(float(v)) for v in p])
    side = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    base = torch.randn(m, 6, generator=g)
    base = base - (base @ w)[:, None] * w / w.norm() ** 2  # on the boundary (b = 0)
    x = base + (side * dist)[:, None] * w / w.norm()
    return _Linear(w, 0.0), x, (side > 0).long(), dist


def _failures(model, x, cls, dist, s):
    r = certify(model, x, s, num_classes=2)
    given = r.prediction != ABSTAIN
    wrong = given & ((r.prediction != cls) | (r.radius > dist + 1e-9))
    return int(wrong.sum()), int(given.sum())


def test_certified_radii_exceed_the_true_radius_at_most_at_the_alpha_rate(monkeypatch):
    m, alpha = 200, 0.1
    s = Settings(0.5, n0=10, n=100, alpha=alpha, batch=100)
    model, x, cls, dist = _linear_points(m, s.sigma)
    limit = int(binom.ppf(0.999, m, alpha))  # failures of a sound procedure stay below this but once in 1000 runs
    bad, given = _failures(model, x, cls, dist, s)
    assert given > m // 2 and bad <= limit, (bad, given, limit)
    # the same check catches a radius from the point estimate p̂ = n_A / n instead of its lower bound
    monkeypatch.setattr(sm, "lower_confidence_bound", lambda k, n, a: min(k / n, 1 - 1e-12))
    bad_wrong, _ = _failures(model, x, cls, dist, s)
    assert bad_wrong > 2 * limit, (bad_wrong, limit)


def test_predict_returns_the_smoothed_class_or_abstains():
    model, x, cls, _ = _linear_points(100, 0.5, seed=1)
    out = predict(model, x, Settings(0.5, n=100, alpha=0.05, batch=100), num_classes=2)
    given = out != ABSTAIN
    assert given.sum() > 50 and ((out != cls) & given).sum() <= binom.ppf(0.999, 100, 0.05)


# --- (e) seeding: chunks, resume -----------------------------------------------------------------------------------


def test_chunks_and_a_resumed_run_draw_the_same_noise_as_one_pass(tmp_path):
    model, x, _, _ = _linear_points(8, 0.5, seed=2)
    s = Settings(0.5, n0=10, n=60, alpha=0.01, batch=16, seed=5)
    whole = certify(model, x, s, num_classes=2)
    parts = sm.Certified.cat(
        [certify(model, x[:3], s, num_classes=2), certify(model, x[3:], s, num_classes=2, first_index=3)]
    )
    for k in ("prediction", "count", "radius"):
        assert torch.equal(getattr(whole, k), getattr(parts, k)), k
    assert not torch.equal(whole.count, certify(model, x, Settings(0.5, 10, 60, 0.01, 16, seed=6), num_classes=2).count)
    key = {"k": 1}
    first = Progress(tmp_path / "p.pt", key)
    certify(model, x[:5], s, num_classes=2, state=first)  # saved when it stops (every 30 s, or on the way out)
    first.save()
    counting = _Counted(model)
    again = Progress(tmp_path / "p.pt", key)
    assert "5 points done" in again.note
    resumed = certify(counting, x, s, num_classes=2, state=again)
    assert torch.equal(resumed.count, whole.count) and counting.calls == 3 * (10 + 60)
    assert Progress(tmp_path / "p.pt", {"k": 2}).done.prediction.numel() == 0  # another key starts over


class _Counted(nn.Module):
    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += len(x)
        return self.inner(x)


# --- (c) the defenses' losses on one batch, on a model with BatchNorm and dropout ----------------------------------


def _bn_dropout_net():
    torch.manual_seed(11)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(384, 10)
    )
    from regdefense.testing import skew_bn

    skew_bn(net)
    return net.train()


@pytest.fixture(scope="module")
def batch():
    from regdefense.host.step import Step
    from regdefense.testing import make_trainer

    trainer = make_trainer(["gaussian_aug"])
    step = Step.from_batch(next(iter(trainer.train_loader)), trainer.device)
    return trainer, step


def _plugin(name, **config):
    from regdefense.host.discovery import catalogue

    cls = catalogue()[name].cls
    return cls(cls.Config(**config))


def test_gaussian_aug_trains_on_unclipped_noise(batch):
    trainer, step = batch
    torch.manual_seed(0)
    ours = _plugin("gaussian_aug", sigma=0.3).regdefense_make_adversarial(step=step)
    torch.manual_seed(0)
    assert torch.equal(ours, step.inputs + torch.randn_like(step.inputs) * 0.3)  # Cohen's train.py, no clip
    assert ours.min() < 0


def test_smoothadv_loss_equals_the_restated_reference(batch):
    trainer, step = batch
    x, y = step.inputs[:16], step.targets[:16]
    step = type(step)(inputs=x, labels=y, targets=y, index=step.index[:16])
    sigma, eps, steps, m = 0.25, 0.5, 3, 2
    plugin = _plugin("smoothadv", sigma=sigma, eps=eps, steps=steps, samples=m, multi_noise=True, warmup_epochs=1)
    net = _bn_dropout_net()
    twin = copy.deepcopy(net)  # our train-mode forward moves BatchNorm's running statistics: the reference starts anew
    torch.manual_seed(4)
    step.adv_inputs = plugin.regdefense_make_adversarial(trainer=trainer, step=step, model=net)
    assert net.training  # the mode is given back
    ours = plugin.regdefense_compute_loss(trainer=trainer, step=step, model=net)["task"]

    # Salman et al.'s train_pgd.py + PGD_L2._attack_mutlinoise, restated: each image's m copies side by side
    net = twin
    torch.manual_seed(4)
    b = len(x)
    reps = x.repeat((1, m, 1, 1)).view(b * m, *x.shape[1:])
    noise = torch.randn_like(reps) * sigma
    net.eval().requires_grad_(False)
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=eps / steps * 2)
    for _ in range(steps):
        logits = net(reps + delta.repeat(1, m, 1, 1).view_as(reps) + noise)
        avg = F.softmax(logits, 1).reshape(-1, m, 10).mean(1)
        loss = -F.nll_loss(torch.log(avg.clamp(min=1e-20)), y)
        opt.zero_grad()
        loss.backward()
        delta.grad.div_(delta.grad.view(b, -1).norm(dim=1).view(-1, 1, 1, 1))
        opt.step()
        delta.data.add_(x).clamp_(0, 1).sub_(x)
        delta.data.renorm_(p=2, dim=0, maxnorm=eps)
    net.train().requires_grad_(True)
    noisy = reps + delta.detach().repeat(1, m, 1, 1).view_as(reps) + noise
    ref = F.cross_entropy(net(noisy), y.unsqueeze(1).repeat(1, m).reshape(-1))
    assert torch.allclose(step.adv_inputs, x + delta.detach(), atol=1e-5)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert (step.adv_inputs - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    trainer.state.epoch = 2  # the warm-up: min(ε, (epoch + 1)·ε/warmup)
    assert _plugin("smoothadv", eps=0.5, warmup_epochs=10).epsilon(trainer) == pytest.approx(0.15)
    trainer.state.epoch = 0


def test_macer_loss_equals_the_restated_reference(batch):
    trainer, step = batch
    net = _bn_dropout_net()
    sigma, k, lam, gamma, beta = 0.25, 4, 12.0, 8.0, 16.0
    x = step.inputs[:32]
    with torch.no_grad():
        y = net.eval()(x).argmax(1)  # some points correct, so the hinge acts
    y[::3] = (y[::3] + 1) % 10
    net.train()
    step = type(step)(inputs=x, labels=y, targets=y, index=step.index[:32])
    plugin = _plugin("macer", sigma=sigma, samples=k, lam=lam, gamma=gamma, beta=beta)
    torch.manual_seed(5)
    terms = plugin.regdefense_compute_loss(trainer=trainer, step=step, model=net)

    torch.manual_seed(5)  # macer.py's macer_train, restated
    b = len(x)
    reps = x.repeat((1, k, 1, 1)).view(b * k, *x.shape[1:])
    out = net(reps + torch.randn_like(reps) * sigma).reshape(b, k, 10)
    cl = F.nll_loss(torch.log(F.softmax(out, 2).mean(1) + 1e-10), y, reduction="sum")
    score, idx = torch.topk(F.softmax(out * beta, 2).mean(1), 2)
    normal = torch.distributions.Normal(0.0, 1.0)
    sel = idx[:, 0] == y
    gap = normal.icdf(score[sel, 1]) - normal.icdf(score[sel, 0])
    keep = ~torch.isnan(gap) & ~torch.isinf(gap) & (gap.abs() <= gamma)
    rl = (gap[keep] + gamma).sum() * sigma / 2
    assert keep.sum() > 3
    assert terms["task"].item() == pytest.approx(cl.item() / b, rel=1e-5)
    assert terms["radius"].item() == pytest.approx(lam * rl.item() / b, rel=1e-4)


def test_macer_gradient_stays_finite_next_to_a_certain_point():
    """A point whose β-softmax runner-up is exactly 0 has Φ⁻¹ = −∞: outside the hinge, and no NaN in the gradient
    (masking after Φ⁻¹ gave NaN weights on the digits in the first epoch)."""
    from regdefense_baselines.smoothing import macer_terms

    logits = torch.randn(4, 3, 10)
    logits[0, :, 2] = 200.0
    logits.requires_grad_(True)
    classification, radius, hinged = macer_terms(logits, torch.tensor([2, 1, 2, 3]), 0.25, 16.0, 8.0)
    (classification + radius).backward()
    assert not hinged[0] and torch.isfinite(logits.grad).all()


def test_nonsense_stacks_are_refused_by_name():
    from regdefense.testing import make_trainer

    for stack, culprit in ((["pgd_at", "macer"], "pgd_at"), (["gaussian_aug", "ibp"], "ibp")):
        trainer = make_trainer(stack)
        with pytest.raises(ConfigError, match=f"cannot stack with {culprit}"):
            trainer.hook.regdefense_fit_start(trainer=trainer)
    with pytest.raises(Exception, match="smoothadv"):
        make_trainer(["smoothadv"], ["threat.norm=linf"])  # SmoothAdv is an L2 attack
    make_trainer(["gaussian_aug", "ema"]).hook.regdefense_fit_start(trainer=make_trainer(["gaussian_aug", "ema"]))


# --- (d) the CLI -----------------------------------------------------------------------------------------------------


def test_evaluate_certify_smoothing_from_the_cli(tmp_path, digits_models):
    from regdefense.cli import cli
    from regdefense.evaluation.ledger import home

    run = tmp_path / "g"
    run.mkdir()
    torch.save(digits_models["clean"].state_dict(), run / "model.pt")  # a user's model file: no run to train
    help_text = CliRunner().invoke(cli, ["evaluate", "--help"]).output
    assert "smoothing" in help_text and "--n-samples" in help_text and "100000" in help_text
    args = [
        "evaluate",
        str(run / "model.pt"),
        "--arch",
        "digits_cnn",
        "--n",
        "6",
        "--no-checks",
        "--quiet",
        "--certify",
        "smoothing",
        "--attacks",
        "torchattacks:FGSM(eps=0.1)",
    ]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0 and "--sigma" in refused.output
    res = CliRunner().invoke(
        cli, args + ["--sigma", "0.25", "--n0", "10", "--n-samples", "40", "--mc-batch", "50", "--radii", "0,0.2"]
    )
    assert res.exit_code == 0, res.output
    assert "## Certified accuracy: randomized smoothing" in res.output
    report = json.loads((run / "eval" / "report.json").read_text())
    summ = report["meta"]["smoothing"]
    assert [r["radius"] for r in summ["table"]] == [0.0, 0.2] and summ["n"] == 40 and summ["points"] == 6
    assert all(r["suite"] != "certify" for r in report["rows"])  # never a row among the empirical ones
    assert (run / "eval" / "certified_vs_radius.png").stat().st_size > 1000
    assert not list((run / "eval").glob("smoothing*.pt"))  # the progress is dropped once the report is written
    (ledger_file,) = home().glob("*.json")
    entries = json.loads(ledger_file.read_text())["entries"]
    kinds = {key: e.get("kind") for key, e in entries.items()}
    assert sorted(map(str, kinds.values())) == ["None", "certified"] and all(
        ("certified=smoothing" in key) == (kind == "certified") for key, kind in kinds.items()
    )
