"""Escalation (issue 35): each check that fires runs the attack that answers it, and the best-known number lands near
a white-box attack on the model under the mask; an honest model is left as it was.

The zoo of masked models is benchmarks/escalation_zoo.py's (shared with the ≥ 200-point CLI table there); the
references are restated there with torchattacks directly (PGD-50 with the network's own gradient, BPDA written out,
EOT-PGD by majority vote), never through regdefense. To stay fast the escalations here start from the checks'
warnings given as results (the checks that really fire on each model: tests/test_masking_zoo.py and the benchmark),
on 40 points: the margin is 2 points of 40 (5 %), against the issue's 2 points of 200 measured by the benchmark.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from regdefense.evaluation import escalate as esc
from regdefense.evaluation.checks import CheckContext, result
from regdefense.evaluation.metrics import wilson_interval
from regdefense.evaluation.report import markdown
from regdefense.evaluation.results import Report, Row
from regdefense.evaluation.runner import evaluate_model

N = 40
MARGIN = 2 / N  # two points of the 40

_spec = importlib.util.spec_from_file_location("escalation_zoo", Path(__file__).parent.parent / "benchmarks"
                                               / "escalation_zoo.py")
zoo_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo_bench)

#: the checks each masked model trips (one-hot models: none given, the flat-scores probe alone must escalate)
TRIPS = {
    "detached forward": ["input gradients"],
    "zero gradient": ["input gradients"],
    "one-hot behind a decoy gradient": [],
    "one-hot with reversed gradient": [],
    "logits ×1e4": ["scale-invariant loss (DLR) vs CE"],
    "shattered x + a·sin(ωx)": ["transfer from a clean surrogate"],
    "reversed gradient": ["transfer from a clean surrogate"],
    "quantised input": ["BPDA (identity) vs white-box"],
    "binarised input": ["BPDA (identity) vs white-box"],
    "input noise": ["randomized model without EOT"],
}
ESCALATION = {  # the escalation that must have run for each
    "input gradients": "decision-based",
    "scale-invariant loss (DLR) vs CE": "margin losses",
    "transfer from a clean surrogate": "strong transfer",
    "BPDA (identity) vs white-box": "BPDA, longer",
    "randomized model without EOT": "EOT",
}


#: the test's budgets (time), against the defaults: 1000 queries, 50 transfer steps, EOT 5/10/20/40, PGD 200/400/800,
#: margin losses 100 steps
SMALL = {"QUERIES": 500, "TRANSFER_STEPS": 10, "EOT_COUNTS": (4, 8), "LONGER_STEPS": (100,), "MARGIN_STEPS": 25}
#: one model per escalation path (the other zoo models take the same paths: benchmarks/escalation_zoo.py runs all)
TESTED = ["detached forward", "one-hot behind a decoy gradient", "logits ×1e4", "shattered x + a·sin(ωx)",
          "quantised input", "input noise"]


@pytest.fixture(scope="module")
def zoo(digits_models):
    net = digits_models["clean"]
    data = digits_models["data"]
    x, y = data.test.floats()[:N], data.test.y[:N]
    return {"models": zoo_bench.zoo(net, zoo_bench.random_decoy(net)), "net": net, "x": x, "y": y,
            "eps": data.default_eps, "surrogate": digits_models["surrogate"]}


def _escalated(model, z, trips):
    """A report whose suites broke nothing (the worst case is the clean accuracy) and whose checks warned ``trips``,
    escalated."""
    x, y = z["x"], z["y"]
    torch.manual_seed(0)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    row = Row("worst case over all attacks", "all", "worst case", float(ok.float().mean()),
              wilson_interval(int(ok.sum()), N), 0.0, N, points=ok)
    report = Report(meta={"n": N, "eps": z["eps"], "norm": "linf", "seed": 0}, clean=row.robust, clean_ci=row.ci,
                    rows=[row], checks=[result(name, False, "warned") for name in trips])
    ctx = CheckContext(model=model, x=x, y=y, all_x=x, all_y=y, eps=z["eps"], norm="linf", num_classes=10, seed=0,
                       suites=[], report=report, kw={"batch_size": 256, "device": "cpu"}, surrogate=z["surrogate"])
    report.meta["checks_on"] = N
    esc.escalate(report, ctx, budget=120)
    return report


@pytest.mark.parametrize("name", TESTED)
def test_each_masked_model_escalates_to_near_the_white_box_attack_under_the_mask(zoo, name, monkeypatch):
    for knob, small in SMALL.items():
        monkeypatch.setattr(esc, knob, small)
    model = zoo["models"][name].eval()
    reference = zoo_bench.reference(name, model, zoo["net"], zoo["x"], zoo["y"], zoo["eps"])
    report = _escalated(model, zoo, TRIPS[name])
    ran = [e["name"] for e in report.escalations]
    for check in TRIPS[name]:
        assert ESCALATION[check] in ran, (check, ran)
    if not TRIPS[name]:  # one-hot outputs: the probe found scores without signal and called the label-only attack
        assert report.meta["flat_scores"] > 0.5 and "decision-based" in ran
    head = report.meta["headline"]
    found = head["randomized"]["majority"] if name == "input noise" else head["best_known"]
    assert found <= reference + MARGIN, (found, reference, report.escalations)
    assert head["suites"] - found > 0.3  # the escalation did the work: the suites had broken nothing
    md = markdown(report)
    assert "## Escalations" in md and ("majority vote" in md if name == "input noise" else "Best known" in md)
    # every escalation's per-point result enters what the ledger records
    assert any(k.startswith("escalation: ") for k in report.check_points)


def test_rays_needs_only_labels_and_stays_within_the_ball(zoo):
    """RayS on the one-hot model (no score signal): what it returns as broken lies within ε, and it breaks about
    what PGD on the network underneath does."""
    model, x, y, eps = zoo["models"]["one-hot with reversed gradient"], zoo["x"], zoo["y"], zoo["eps"]
    torch.manual_seed(0)
    adv = esc.rays(model, x, y, eps=eps, queries=500)
    with torch.no_grad():
        broken = model(adv).argmax(1) != y
    assert ((adv - x).abs().flatten(1).amax(1)[broken] <= eps + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert 1 - float(broken.float().mean()) <= zoo_bench.reference(
        "one-hot with reversed gradient", model, zoo["net"], x, y, eps) + MARGIN


@pytest.mark.parametrize("name", ["pgd_at", "clean"])
def test_an_honest_model_gets_no_masking_escalation_and_the_same_numbers(digits_models, name):
    """No masking escalation on the PGD-AT and the clean model; only a convergence escalation may run (PGD-20 not
    converged is a real weakness, docs/evaluation.md), and the suites' rows and the checks are those of
    ``adaptive="off"``."""
    data, model = digits_models["data"], digits_models[name]
    x, y = data.test.floats()[:32], data.test.y[:32]
    kw = dict(suites=["quick"], default_eps=data.default_eps, num_classes=10, progress=False, check_samples=32,
              surrogate=digits_models["surrogate"])
    auto = evaluate_model(model, x, y, **kw)
    off = evaluate_model(model, x, y, adaptive="off", **kw)
    assert {e["name"] for e in auto.escalations} <= {"longer white-box"}
    assert [(r.label, r.robust) for r in auto.rows] == [(r.label, r.robust) for r in off.rows]
    assert [(c["name"], c["status"], c["numbers"]) for c in auto.checks] == [
        (c["name"], c["status"], c["numbers"]) for c in off.checks]
    assert not off.escalations and "headline" not in off.meta and "## Escalations" not in markdown(off)
    assert "escalations" not in off.to_dict() and "adaptive" not in off.meta


def test_adaptive_takes_auto_or_off(digits_models):
    from regdefense.base.errors import UserError

    data = digits_models["data"]
    with pytest.raises(UserError, match="auto or off"):
        evaluate_model(digits_models["clean"], data.test.floats()[:4], data.test.y[:4], suites=["quick"],
                       adaptive="on", progress=False)
