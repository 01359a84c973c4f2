"""Interval bound propagation (issue 28): bounds that no point of the ball escapes, equal to ART's IBP intervals; the
verified accuracy in ``evaluate --certify ibp``; IBP training's schedule and loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regdefense.bounds import UnsupportedLayer, interval_bounds, verified, worst_case_logits
from regdefense.models._registry import Normalize
from regdefense.testing import make_trainer


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))


def _nets():
    torch.manual_seed(0)
    nets = [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5)),
        nn.Sequential(Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(6, 5)),
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Residual(4), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 5)),
    ]
    for net in nets:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        net.eval()
    return nets


@pytest.mark.parametrize("k", range(3))
def test_no_point_of_the_ball_leaves_the_bounds_on_random_small_networks(k):
    net, eps = _nets()[k], 0.1
    x = torch.rand(6, 1, 8, 8)
    lo, hi = interval_bounds(net, x, eps)
    assert (lo <= hi).all()
    ball_lo, ball_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    samples = [ball_lo + (ball_hi - ball_lo) * torch.rand_like(x) for _ in range(200)]
    samples += [torch.where(torch.rand_like(x) < 0.5, ball_lo, ball_hi) for _ in range(200)]  # corners
    with torch.no_grad():
        for s in samples:
            z = net(s)
            assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all()
    for c in range(5):  # PGD pushing each logit up and down
        for sign in (1.0, -1.0):
            d = torch.zeros_like(x, requires_grad=True)
            for _ in range(30):
                z = net((x + d).clamp(0, 1))
                (g,) = torch.autograd.grad((sign * z[:, c]).sum(), d)
                d = (d + 0.02 * g.sign()).clamp(-eps, eps).detach().requires_grad_(True)
            with torch.no_grad():
                z = net((x + d).clamp(0, 1))
            assert (z[:, c] >= lo[:, c] - 1e-5).all() and (z[:, c] <= hi[:, c] + 1e-5).all()
    tight_lo, tight_hi = interval_bounds(net, x, 0.0)
    with torch.no_grad():
        assert torch.allclose(tight_lo, net(x), atol=1e-5) and torch.allclose(tight_hi, net(x), atol=1e-5)


def test_the_bounds_are_arts_ibp_intervals():
    from art.estimators.certification.interval import PyTorchIBPClassifier

    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(36, 10))

    class Plain(nn.Module):  # the same layers as ART's converter wants them (it flattens before Linear itself)
        def __init__(self):
            super().__init__()
            self.c1, self.r, self.c2, self.fc = seq[0], nn.ReLU(), seq[2], seq[5]

        def forward(self, x):
            return self.fc(self.r(self.c2(self.r(self.c1(x)))).flatten(1))

    art = PyTorchIBPClassifier(model=Plain(), loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                               clip_values=(0.0, 1.0))
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    theirs = art.predict_intervals(x=x, is_interval=False, bounds=0.05, limits=[0.0, 1.0])
    lo, hi = interval_bounds(seq, torch.tensor(x), 0.05)
    assert np.allclose(theirs[:, 0, :], lo.detach().numpy(), atol=1e-6)
    assert np.allclose(theirs[:, 1, :], hi.detach().numpy(), atol=1e-6)


def test_unsupported_layers_are_refused_by_name():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UnsupportedLayer, match="do not support Tanh \\(layer '1'\\)"):
        interval_bounds(nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(64, 3)), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="dropout in train mode"):
        interval_bounds(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 3)).train(), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="BatchNorm2d in train mode"):
        interval_bounds(nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(64, 3)).train(), x, 0.1)


def test_ibp_training_schedule_and_loss_and_certified_evaluation(tmp_path):
    from regdefense.evaluate import evaluate
    from regdefense.run import train
    from regdefense.step import Step
    from regdefense.testing import TINY

    trainer = make_trainer(["ibp"], ["ibp.warmup_epochs=1", "ibp.ramp_epochs=2", "ibp.kappa_end=0.5"])
    ibp = dict(trainer.pm.list_name_plugin())["ibp"]
    eps = trainer.eps
    assert ibp.schedule(0.5, eps) == (0.0, 1.0) and ibp.schedule(2.0, eps) == (pytest.approx(eps / 2), 0.75)
    assert ibp.schedule(5.0, eps) == (pytest.approx(eps), 0.5)
    trainer.hook.regdefense_fit_start(trainer=trainer)
    x, y, idx = next(iter(trainer.train_loader))
    step = Step.from_batch((x, y, idx), trainer.device)
    step.adv_inputs = step.inputs
    trainer.state.global_step = 2 * trainer.steps_per_epoch  # half-way up the ramp: eps/2, kappa 0.75
    terms = trainer.loss_terms(step, trainer.model)
    lo, hi = interval_bounds(trainer.model, step.inputs, eps / 2)
    want = 0.25 * F.cross_entropy(worst_case_logits(lo, hi, step.labels), step.labels)
    assert torch.allclose(terms["ibp"], want, rtol=1e-5)
    assert torch.allclose(terms["task"], 0.75 * F.cross_entropy(trainer.model(step.inputs), step.labels), rtol=1e-5)

    run = train(defenses=["ibp"], overrides=TINY + ["threat.eps=0.02", "train.epochs=4", "ibp.ramp_epochs=2",
                                                    "train.optimizer=adam", "train.lr=0.003", "data.limit=600"],
                out=tmp_path / "ibp", echo=lambda _m: None).run_dir
    report, _ = evaluate(run, which="last", n=64, checks=False, progress=False, certify="ibp")
    row = next(r for r in report.rows if r.kind == "certified")
    assert 0 < row.robust <= report.worst_case + 1e-9  # a certificate never exceeds what attacks leave
    assert report.meta["certified"]["verified"] == row.robust
    t_model = __import__("regdefense").load_model(run, which="last")
    t = __import__("regdefense.targets", fromlist=["load_target"]).load_target(run, which="last", n=64)
    ok = verified(t_model, t.x, t.y, 0.02)
    d = torch.zeros_like(t.x[ok], requires_grad=True)  # PGD on the verified points: none is broken
    for _ in range(20):
        loss = F.cross_entropy(t_model((t.x[ok] + d).clamp(0, 1)), t.y[ok])
        (g,) = torch.autograd.grad(loss, d)
        d = (d + 0.005 * g.sign()).clamp(-0.02, 0.02).detach().requires_grad_(True)
    with torch.no_grad():
        assert (t_model((t.x[ok] + d).clamp(0, 1)).argmax(1) == t.y[ok]).all()


def test_certify_on_a_model_ibp_cannot_bound_warns_and_completes(tmp_path):
    from regdefense.evaluate import evaluate_model  # noqa: F401
    from regdefense.evaluate import evaluate

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 10)).eval()
    path = tmp_path / "tanh.pt2"
    batch = torch.export.Dim("batch", max=1024)
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},)), str(path))
    report, files = evaluate(path, n=16, checks=False, progress=False, certify="ibp")
    assert any(w.startswith("IBP certification not applicable") for w in report.warnings), report.warnings
    assert files["md"].exists() and not [r for r in report.rows if r.kind == "certified"]
