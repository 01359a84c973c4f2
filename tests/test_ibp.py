"""Interval bound propagation (issues 28, 33): bounds equal to independent implementations (ART's interval layers, and
a W⁺/W⁻ restatement written here), that no point of the ball escapes; refusals by name; the elided margins of Gowal
et al.; the verified accuracy in ``evaluate --certify ibp``; IBP training's schedule and loss.

The expected side never calls ``regdefense.evaluation.bounds``: :func:`ref_bounds` and :func:`ref_margins` restate it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from regdefense.evaluation.bounds import UnsupportedLayer, interval_bounds, last_linear, margin_bounds, trace, verified
from regdefense.models._registry import Normalize
from regdefense.testing import make_trainer

MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, Normalize)


def ref_layer(m: nn.Module, lo, hi):
    """One layer's interval, restated: a monotone layer maps both ends; an affine one is written as its dense matrix A
    (its responses to the basis vectors) and bias b, and [A⁺l + A⁻h + b, A⁺h + A⁻l + b] with A⁺ = max(A, 0)."""
    if isinstance(m, MONOTONE):
        return m(lo), m(hi)
    assert isinstance(m, AFFINE) and not (isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training), m
    shape = lo.shape[1:]
    n = shape.numel()
    with torch.no_grad():
        b = m(torch.zeros(1, *shape, dtype=lo.dtype))
        a = (m(torch.eye(n, dtype=lo.dtype).view(n, *shape)) - b).reshape(n, -1).T  # (out, in)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        low = lo.flatten(1) @ pos.T + hi.flatten(1) @ neg.T + b.flatten()
        high = hi.flatten(1) @ pos.T + lo.flatten(1) @ neg.T + b.flatten()
    return low.view(-1, *b.shape[1:]), high.view(-1, *b.shape[1:])


def ref_bounds(layers, x, eps):
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for m in layers:
        lo, hi = ref_layer(m, lo, hi)
    return lo, hi


def ref_margins(net: nn.Sequential, x, y, eps, elide=True):
    """Lower bounds of z_y − z_j: naive (l_y − u_j) or elided, (W_y − W_j)·h + b_y − b_j bounded over h's interval."""
    if not elide:
        lo, hi = ref_bounds(net, x, eps)
        return (lo.gather(1, y[:, None]) - hi).scatter(1, y[:, None], 0.0)
    lo, hi = ref_bounds(net[:-1], x, eps)
    w, b = net[-1].weight.detach(), net[-1].bias.detach()
    d = w[y][:, None, :] - w[None]  # (batch, classes, hidden)
    return (d.clamp(min=0) * lo[:, None] + d.clamp(max=0) * hi[:, None]).sum(-1) + (b[y][:, None] - b[None])


def _stats(net):
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):  # statistics that are not the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)  # negative scales too
    return net.eval()


# ---------------------------------------------------------------- independent implementations, layer by layer


def test_each_layer_equals_arts_interval_classes():
    from art.estimators.certification.interval import (
        PyTorchIntervalConv2D,
        PyTorchIntervalDense,
        PyTorchIntervalFlatten,
        PyTorchIntervalReLU,
    )

    torch.manual_seed(1)
    x = torch.rand(3, 2, 7, 7) * 0.8 + 0.1
    eps = 0.05
    box = torch.stack([x - eps, x + eps], 1)  # ART's form: (batch, 2, ...), lower then upper
    for stride, padding in ((1, 1), (2, 0), (1, 2)):
        conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding)
        art = PyTorchIntervalConv2D(
            2,
            3,
            3,
            input_shape=(3, 2, 7, 7),
            device="cpu",
            stride=stride,
            padding=padding,
            dilation=1,
            supplied_input_weights=conv.weight.data,
            supplied_input_bias=conv.bias.data,
        )
        theirs = art(box).detach()
        lo, hi = interval_bounds(nn.Sequential(conv), x, eps)
        assert torch.allclose(lo, theirs[:, 0], atol=1e-5) and torch.allclose(hi, theirs[:, 1], atol=1e-5)
    dense, art_dense = nn.Linear(98, 5), PyTorchIntervalDense(98, 5)
    art_dense.weight.data, art_dense.bias.data = dense.weight.data.clone(), dense.bias.data.clone()
    theirs = art_dense(PyTorchIntervalFlatten.forward(box)).detach()
    lo, hi = interval_bounds(nn.Sequential(nn.Flatten(), dense), x, eps)
    assert torch.allclose(lo, theirs[:, 0], atol=1e-5) and torch.allclose(hi, theirs[:, 1], atol=1e-5)
    theirs = PyTorchIntervalReLU()(art_dense(PyTorchIntervalFlatten.forward(box))).detach()
    lo, hi = interval_bounds(nn.Sequential(nn.Flatten(), dense, nn.ReLU()), x, eps)
    assert (theirs[:, 0] == 0).any() and (theirs[:, 1] > 0).any()
    assert torch.allclose(lo, theirs[:, 0], atol=1e-5) and torch.allclose(hi, theirs[:, 1], atol=1e-5)


def test_the_bounds_are_arts_ibp_intervals_end_to_end():
    from art.estimators.certification.interval import PyTorchIBPClassifier

    torch.manual_seed(1)
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 10),
    )

    class Plain(nn.Module):  # the same layers as ART's converter wants them (it flattens before Linear itself)
        def __init__(self):
            super().__init__()
            self.c1, self.r, self.c2, self.fc = seq[0], nn.ReLU(), seq[2], seq[5]

        def forward(self, x):
            return self.fc(self.r(self.c2(self.r(self.c1(x)))).flatten(1))

    art = PyTorchIBPClassifier(
        model=Plain(), loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
    )
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    theirs = art.predict_intervals(x=x, is_interval=False, bounds=0.05, limits=[0.0, 1.0])
    lo, hi = interval_bounds(seq, torch.tensor(x), 0.05)
    assert np.allclose(theirs[:, 0, :], lo.detach().numpy(), atol=1e-6)
    assert np.allclose(theirs[:, 1, :], hi.detach().numpy(), atol=1e-6)


def _layer_nets():
    torch.manual_seed(2)
    return {
        "batchnorm2d": nn.Sequential(nn.BatchNorm2d(2)),
        "batchnorm1d": nn.Sequential(nn.Flatten(), nn.BatchNorm1d(50)),
        "avgpool": nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)),
        "avgpool-no-pad-count": nn.Sequential(nn.AvgPool2d(2, padding=1, count_include_pad=False)),
        "adaptive-avgpool": nn.Sequential(nn.AdaptiveAvgPool2d(2)),
        "normalize": nn.Sequential(Normalize([0.4, 0.5], [0.2, 0.3])),
        "conv-groups-dilation": nn.Sequential(nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2)),
        "maxpool-flatten-linear": nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
        "mixed": nn.Sequential(
            Normalize([0.5], [0.25]),
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 3, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(3, 5),
        ),
    }


@pytest.mark.parametrize("name", list(_layer_nets()))
def test_the_other_layers_equal_an_independent_restatement(name):
    net = _stats(_layer_nets()[name]).double()
    x = torch.rand(4, 2, 5, 5, dtype=torch.float64)
    lo, hi = interval_bounds(net, x, 0.1)
    want_lo, want_hi = ref_bounds(net, x, 0.1)
    assert torch.allclose(lo, want_lo, atol=1e-12) and torch.allclose(hi, want_hi, atol=1e-12)


def ref_conv(m: nn.Conv2d, lo, hi):
    """A convolution with its padding mode, restated: pad both ends as the mode does (reflect, replicate and circular
    padding copy input elements), then [W⁺ * l + W⁻ * h + b, W⁺ * h + W⁻ * l + b] unpadded."""
    ph, pw = m.padding
    lo, hi = (
        F.pad(t, (pw, pw, ph, ph), mode="constant" if m.padding_mode == "zeros" else m.padding_mode) for t in (lo, hi)
    )
    pos, neg = m.weight.detach().clamp(min=0), m.weight.detach().clamp(max=0)

    def conv(t, w):
        return F.conv2d(t, w, None, m.stride, 0, m.dilation, m.groups)

    b = m.bias.detach().view(1, -1, 1, 1)
    return conv(lo, pos) + conv(hi, neg) + b, conv(hi, pos) + conv(lo, neg) + b


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_bounds_hold_for_every_padding_mode(mode):  # issue 33 item 5: the radius lost the border's padding
    torch.manual_seed(3)
    net = (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode),
            nn.ReLU(),
            nn.Conv2d(3, 2, 3, stride=2, padding=2, padding_mode=mode),
        )
        .double()
        .eval()
    )
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)
    lo, hi = interval_bounds(net, x, 0.1)
    first = ref_conv(net[0], (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1))
    want_lo, want_hi = ref_conv(net[2], *(t.clamp(min=0) for t in first))
    assert torch.allclose(lo, want_lo, atol=1e-12) and torch.allclose(hi, want_hi, atol=1e-12)
    # never narrower than the exact interval of each layer as a dense affine map (reflect and replicate padding use an
    # input element twice in a window, where the dense map can be tighter than padding then convolving)
    dense_lo, dense_hi = ref_bounds(net, x, 0.1)
    assert (lo <= dense_lo + 1e-12).all() and (hi >= dense_hi - 1e-12).all()


# ---------------------------------------------------------------- arguments honoured or refused by name


class _Add(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.how = nn.Linear(6, 3), nn.Linear(6, 3), how

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.how == "alpha=-1":
            return torch.add(a, b, alpha=-1)
        if self.how == "alpha=0.5":
            return torch.add(a, b, alpha=0.5)
        if self.how == "sub":
            return a - b
        return torch.sub(a, b, alpha=2)


@pytest.mark.parametrize("how", ["alpha=-1", "alpha=0.5", "sub", "torch.sub alpha=2"])
def test_additions_honour_their_arguments(how):  # issue 33 item 6: alpha was ignored
    torch.manual_seed(4)
    net = _Add(how).double().eval()
    k = {"alpha=-1": -1.0, "alpha=0.5": 0.5, "sub": -1.0, "torch.sub alpha=2": -2.0}[how]
    x = torch.rand(5, 6, dtype=torch.float64)
    lo, hi = interval_bounds(net, x, 0.1)
    (la, ha), (lb, hb) = ref_bounds([net.a], x, 0.1), ref_bounds([net.b], x, 0.1)
    want_lo, want_hi = la + torch.minimum(k * lb, k * hb), ha + torch.maximum(k * lb, k * hb)
    assert torch.allclose(lo, want_lo, atol=1e-12) and torch.allclose(hi, want_hi, atol=1e-12)
    with torch.no_grad():
        assert ((lo <= net(x)) & (net(x) <= hi)).all()


class _Call(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how, self.w = nn.Linear(16, 3), how, nn.Parameter(torch.ones(16, 3))
        self.same = nn.Identity()

    def forward(self, x):
        if self.how == "return_indices":
            x = F.max_pool2d(x, 2, return_indices=True)[0]
        elif self.how == "view dtype":
            x = x.view(torch.int32).float()
        elif self.how == "extra argument":
            x = self.same(x, 3)
        elif self.how == "mul":
            x = x * 2
        elif self.how == "parameter":
            return x.flatten(1) @ self.w
        return self.fc(x.flatten(1))


def test_unsupported_layers_calls_and_arguments_are_refused_by_name():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UnsupportedLayer, match="do not support Tanh \\(layer '1'\\)"):
        interval_bounds(nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(64, 3)), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="dropout in train mode"):
        interval_bounds(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 3)).train(), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="BatchNorm2d in train mode"):
        interval_bounds(nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(64, 3)).train(), x, 0.1)
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(UnsupportedLayer, match="the operation 'max_pool2d_with_indices'"):
        interval_bounds(_Call("return_indices"), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="the arguments of 'view' \\(call_method 'view'\\)"):
        interval_bounds(_Call("view dtype"), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="divisor_override <= 0 \\(layer '0'\\)"):  # a decreasing map
        interval_bounds(nn.Sequential(nn.AvgPool2d(2, divisor_override=-1)), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="layer 'same' called with more than its input"):
        interval_bounds(_Call("extra argument"), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="the operation 'mul'"):
        interval_bounds(_Call("mul"), x, 0.1)
    with pytest.raises(UnsupportedLayer, match="a parameter used directly \\('w'\\)"):
        interval_bounds(_Call("parameter"), x, 0.1)


class _FlattenKw(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(start_dim=1))


def test_flatten_with_keyword_arguments_on_a_batch():  # issue 33 item 7: kwargs dropped on the upper end
    torch.manual_seed(5)
    net = _FlattenKw().double().eval()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    lo, hi = interval_bounds(net, x, 0.1)
    want_lo, want_hi = ref_bounds([net.conv, nn.ReLU(), nn.Flatten(), net.fc], x, 0.1)
    assert torch.allclose(lo, want_lo, atol=1e-12) and torch.allclose(hi, want_hi, atol=1e-12)


def _certify(net, n=8):
    """``_add_certified`` on a report stand-in: the rows and warnings it adds."""
    from regdefense.evaluation.runner import _add_certified

    torch.manual_seed(6)
    x, y = torch.rand(n, 1, 4, 4), torch.randint(0, 3, (n,))
    rep = SimpleNamespace(
        meta={"norm": "linf", "eps": 0.01},
        warnings=[],
        rows=[],
        clean=1.0,
        clean_points=torch.ones(n, dtype=torch.bool),
    )
    _add_certified(rep, SimpleNamespace(model=net.eval(), x=x, y=y, device=torch.device("cpu")))
    return rep


def test_certify_refusals_are_warnings_and_the_evaluation_goes_on():  # issue 33 item 7: a bare AssertionError
    rep = _certify(nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False), nn.Flatten(), nn.Linear(16, 3)))
    assert not rep.rows and len(rep.warnings) == 1
    assert rep.warnings[0].startswith("IBP certification not applicable: ") and "track_running_stats" in rep.warnings[0]
    rep = _certify(_FlattenKw())
    assert [r.label for r in rep.rows] == ["IBP verified (certified lower bound)", "IBP verified, naive bounds"]


# ---------------------------------------------------------------- specification elision (issue 33 item 8)


def test_elided_margins_equal_the_restatement_and_are_never_looser():
    torch.manual_seed(7)
    net = _stats(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )
    ).double()
    x, y = torch.rand(16, 1, 4, 4, dtype=torch.float64), torch.randint(0, 5, (16,))
    elided, naive = margin_bounds(net, x, y, 0.03), margin_bounds(net, x, y, 0.03, elide=False)
    assert torch.allclose(elided, ref_margins(net, x, y, 0.03), atol=1e-12)
    assert torch.allclose(naive, ref_margins(net, x, y, 0.03, elide=False), atol=1e-12)
    assert (elided >= naive - 1e-12).all() and (elided > naive + 1e-6).any()
    assert (elided.gather(1, y[:, None]) == 0).all()
    assert last_linear(net) == "6"
    ok, ok_naive = verified(net, x, y, 0.03), verified(net, x, y, 0.03, elide=False)
    assert (ok >= ok_naive).all()
    wrapped = nn.Sequential(net, nn.ReLU())  # the output is not a Linear layer (a purifier, a wrapper): naive bounds
    assert last_linear(wrapped) is None
    lo, hi = ref_bounds(list(net) + [nn.ReLU()], x, 0.03)
    want = (lo.gather(1, y[:, None]) - hi).scatter(1, y[:, None], 0.0)
    assert torch.allclose(margin_bounds(wrapped, x, y, 0.03), want, atol=1e-12)


def test_certify_reports_the_elided_and_the_naive_certificate():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    rep = _certify(net, n=32)
    elided, naive = rep.rows
    assert rep.meta["certified"]["bounds"] == "elided" and elided.robust == rep.meta["certified"]["verified"]
    assert naive.robust == rep.meta["certified"]["verified_naive"] <= elided.robust
    assert not rep.warnings
    rep = _certify(nn.Sequential(net, nn.ReLU()), n=32)
    assert len(rep.rows) == 1 and rep.meta["certified"]["bounds"] == "naive"
    assert rep.warnings and "naive" in rep.warnings[0] and "not a Linear layer" in rep.warnings[0]


# ---------------------------------------------------------------- soundness on random networks of every layer


class _Net(nn.Module):
    """A random small network of the supported layers, as modules and as functions (traced by torch.fx)."""

    def __init__(self, blocks, mode, head):
        super().__init__()
        self.blocks, self.head, c, side = blocks, head, 1, 6
        self.layers = nn.ModuleList()
        for kind in blocks:
            if kind in ("conv", "conv_stride", "residual", "alpha"):
                stride = 2 if kind == "conv_stride" else 1
                self.layers.append(nn.Conv2d(c, 3, 3, stride=stride, padding=1, padding_mode=mode))
                c, side = 3, (side + 1) // 2 if stride == 2 else side
                if kind == "residual":
                    self.layers.append(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)))
                if kind == "alpha":
                    self.layers.append(nn.Conv2d(3, 3, 1))
            elif kind == "maxpool":
                self.layers.append(nn.MaxPool2d(2, ceil_mode=True))
                side = (side + 1) // 2
            else:
                self.layers.append(
                    {
                        "bn": nn.BatchNorm2d(c),
                        "relu": nn.ReLU(),
                        "avgpool": nn.AvgPool2d(3, 1, 1),
                        "normalize": Normalize([0.3] * c, [0.7] * c),
                        "identity": nn.Identity(),
                        "dropout": nn.Dropout(0.3),
                    }[kind]
                )
        self.fc1, self.fc2 = nn.Linear(c * side * side, 8), nn.Linear(8, 4)

    def forward(self, x):
        layers = iter(self.layers)
        for kind in self.blocks:
            x = next(layers)(x)
            if kind == "residual":
                x = F.relu(x + next(layers)(x))
            elif kind == "alpha":
                x = torch.relu(torch.add(x, next(layers)(x), alpha=-0.5))
        if self.head == "module":
            x = nn.functional.relu(x).flatten(1)
        elif self.head == "view":
            x = x.view(x.size(0), -1)
        else:
            x = torch.flatten(x, start_dim=1)
        return self.fc2(F.relu(self.fc1(x)))


BLOCKS = [
    "conv",
    "conv_stride",
    "residual",
    "alpha",
    "maxpool",
    "bn",
    "relu",
    "avgpool",
    "normalize",
    "identity",
    "dropout",
]


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**16),
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    head=st.sampled_from(["module", "view", "flatten"]),
    eps=st.floats(0.005, 0.2),
)
def test_no_point_of_the_ball_leaves_the_bounds_on_random_networks(seed, blocks, mode, head, eps):
    torch.manual_seed(seed)
    net = _stats(_Net(blocks, mode, head)).double()
    graph = trace(net)
    x, y = torch.rand(3, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (3,))
    lo, hi = interval_bounds(net, x, eps, graph)
    margins, naive = margin_bounds(net, x, y, eps, graph), margin_bounds(net, x, y, eps, graph, elide=False)
    assert (lo <= hi).all() and (margins >= naive - 1e-9).all()
    ball_lo, ball_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)

    def inside(s):
        with torch.no_grad():
            z = net(s)
        m = z.gather(1, y[:, None]) - z
        return (lo - 1e-9 <= z).all() and (z <= hi + 1e-9).all() and (margins <= m + 1e-9).all()

    assert inside(x)
    for _ in range(8):
        assert inside(ball_lo + (ball_hi - ball_lo) * torch.rand_like(x))
        assert inside(torch.where(torch.rand_like(x) < 0.5, ball_lo, ball_hi))  # a corner
    direction = torch.randn(4, dtype=torch.float64)
    objectives = [lambda z: z @ direction, lambda z: -z @ direction]  # the logits, one way and the other
    objectives += [lambda z, c=c: z[:, c] - z.gather(1, y[:, None])[:, 0] for c in range(4)]  # each margin down
    for objective in objectives:  # PGD inside the box
        d = torch.zeros_like(x, requires_grad=True)
        for _ in range(3):
            (g,) = torch.autograd.grad(objective(net((x + d).clamp(0, 1))).sum(), d)
            d = (d + eps / 2 * g.sign()).clamp(-eps, eps).detach().requires_grad_(True)
        assert inside((x + d.detach()).clamp(0, 1))
    tight_lo, tight_hi = interval_bounds(net, x, 0.0, graph)
    with torch.no_grad():
        assert torch.allclose(tight_lo, net(x), atol=1e-9) and torch.allclose(tight_hi, net(x), atol=1e-9)


# ---------------------------------------------------------------- training and certified evaluation


def test_ibp_training_schedule_and_loss():
    from regdefense.host.step import Step

    for elide in (True, False):
        trainer = make_trainer(
            ["ibp"],
            ["ibp.warmup_epochs=1", "ibp.ramp_epochs=2", "ibp.kappa_end=0.5", f"ibp.elide={str(elide).lower()}"],
        )
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
        net = trainer.raw_model
        assert isinstance(net, nn.Sequential) and isinstance(net[-1], nn.Linear)
        # Gowal et al.'s loss: CE over (upper bounds of z_j − z_y for j ≠ y, 0 for y) with the label on the 0
        want = 0.25 * F.cross_entropy(-ref_margins(net, step.inputs, step.labels, eps / 2, elide), step.labels)
        assert torch.allclose(terms["ibp"], want, rtol=1e-5)
        clean = 0.75 * F.cross_entropy(trainer.model(step.inputs), step.labels)
        assert torch.allclose(terms["task"], clean, rtol=1e-5)


def test_ibp_training_and_certified_evaluation(tmp_path):
    from regdefense.evaluation.runner import evaluate
    from regdefense.testing import TINY
    from regdefense.training.run import train

    run = train(
        defenses=["ibp"],
        overrides=TINY
        + [
            "threat.eps=0.02",
            "train.epochs=4",
            "ibp.ramp_epochs=2",
            "train.optimizer=adam",
            "train.lr=0.003",
            "data.limit=600",
        ],
        out=tmp_path / "ibp",
        echo=lambda _m: None,
    ).run_dir
    report, _ = evaluate(run, which="last", n=64, checks=False, progress=False, certify="ibp")
    row, naive = (r for r in report.rows if r.kind == "certified")
    assert 0 < row.robust <= report.worst_case + 1e-9  # a certificate never exceeds what attacks leave
    assert report.meta["certified"]["verified"] == row.robust and naive.robust <= row.robust
    t_model = __import__("regdefense").load_model(run, which="last")
    t = __import__("regdefense.evaluation.targets", fromlist=["load_target"]).load_target(run, which="last", n=64)
    ok = verified(t_model, t.x, t.y, 0.02)
    d = torch.zeros_like(t.x[ok], requires_grad=True)  # PGD on the verified points: none is broken
    for _ in range(20):
        loss = F.cross_entropy(t_model((t.x[ok] + d).clamp(0, 1)), t.y[ok])
        (g,) = torch.autograd.grad(loss, d)
        d = (d + 0.005 * g.sign()).clamp(-0.02, 0.02).detach().requires_grad_(True)
    with torch.no_grad():
        assert (t_model((t.x[ok] + d).clamp(0, 1)).argmax(1) == t.y[ok]).all()


def test_certify_on_a_model_ibp_cannot_bound_warns_and_completes(tmp_path):
    from regdefense.evaluation.runner import evaluate

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 10)).eval()
    path = tmp_path / "tanh.pt2"
    batch = torch.export.Dim("batch", max=1024)
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},)), str(path))
    # a .pt2 program is code: trusted as `regdefense evaluate --trust-code` does
    report, files = evaluate(path, n=16, checks=False, progress=False, certify="ibp", trust_code=True)
    assert any(w.startswith("IBP certification not applicable") for w in report.warnings), report.warnings
    assert files["md"].exists() and not [r for r in report.rows if r.kind == "certified"]
