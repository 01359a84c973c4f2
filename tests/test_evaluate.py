"""Evaluation: suites, per-point worst case, metrics against independent computations, sanity checks, reports."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from regdefense.attacks.adapter import resolve_attack
from regdefense.base.errors import ConfigError
from regdefense.evaluation.checks import input_gradient_norms
from regdefense.evaluation.metrics import auroc, psnr, wilson_interval
from regdefense.evaluation.runner import evaluate_model
from regdefense.evaluation.suites import build_suite


def _eval(model, data, suites=("quick",), n=200, **kw):
    x, y = data.test.floats()[:n], data.test.y[:n]
    kw.setdefault("checks", False)
    kw.setdefault("adaptive", "off")  # these tests are about the checks; the escalations have tests/test_escalation.py
    return evaluate_model(model, x, y, suites=list(suites), default_eps=0.2, num_classes=10, progress=False, **kw)


def _check(report, name):
    return next(c for c in report.checks if c["name"] == name)


# --- metrics against independent computations -------------------------------------------------


def test_psnr_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a = rng.random((5, 1, 8, 8)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    expected = [10 * np.log10(1.0 / np.mean((a[i] - b[i]) ** 2)) for i in range(5)]
    assert psnr(torch.tensor(a), torch.tensor(b)).tolist() == pytest.approx(expected, rel=1e-5)
    assert psnr(torch.tensor(a), torch.tensor(a))[0] == float("inf")


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    neg = np.round(rng.normal(0, 1, 300), 1)
    pos = np.round(rng.normal(0.7, 1, 200), 1)  # rounding creates ties
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[neg, pos])
    assert auroc(torch.tensor(neg), torch.tensor(pos)) == pytest.approx(expected, abs=1e-12)


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 20), (7, 20), (20, 20), (513, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_accuracy_acc_drop_and_worst_case_match_direct_computation(digits_models):
    model, data = digits_models["pgd_at"], digits_models["data"]
    report = _eval(model, data, seed=3)
    x, y = data.test.floats()[:200], data.test.y[:200]
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    from regdefense.evaluation.runner import batch_seed

    torch.manual_seed(batch_seed(3, 0))  # one batch of 200: seeded by the evaluation seed and its first index
    pgd = torchattacks.PGD(model, eps=0.2, alpha=0.025, steps=20, random_start=True)(x, y)
    fgsm = torchattacks.FGSM(model, eps=0.2)(x, y)
    with torch.no_grad():
        pgd_ok, fgsm_ok = model(pgd).argmax(1) == y, model(fgsm).argmax(1) == y
    rows = {r.label: r for r in report.rows}
    assert report.clean == pytest.approx(clean_ok.float().mean().item())
    assert rows["PGD-20"].robust == pytest.approx(pgd_ok.float().mean().item())
    assert rows["FGSM"].robust == pytest.approx(fgsm_ok.float().mean().item())
    assert rows["PGD-20"].acc_drop == pytest.approx(report.clean - rows["PGD-20"].robust)
    worst = (clean_ok & pgd_ok & fgsm_ok).float().mean().item()
    assert report.worst_case == pytest.approx(worst)  # per point, not the minimum of the means
    assert worst <= min(rows["PGD-20"].robust, rows["FGSM"].robust)
    assert rows["PGD-20"].norms["linf_max"] <= 0.2 + 1e-6
    expected_psnr = psnr(x, pgd)
    assert rows["PGD-20"].psnr_mean == pytest.approx(expected_psnr[torch.isfinite(expected_psnr)].mean().item(), rel=1e-4)
    again = _eval(model, data, seed=3)
    assert [r.robust for r in again.rows] == [r.robust for r in report.rows]  # deterministic with --seed


# --- suites -----------------------------------------------------------------------------------


def test_the_torchattacks_assembly_has_the_official_standard_settings():
    suite = build_suite("autoattack-ta", eps=8 / 255, default_eps=0.1, norm="linf", num_classes=100, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 100))
    objs = {a.label: resolve_attack(a.spec)._build(model, torch.rand(2, 3, 4, 4)) for a in suite.attacks}
    assert list(objs) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert all(a.group == "AutoAttack" for a in suite.attacks)  # each runs on still-robust points
    # official autoattack (fra31) version='standard': apgd.n_iter=100, n_restarts=1; apgd_targeted.n_target_classes=9;
    # fab.n_target_classes=9, n_iter=100; square.n_queries=5000, p_init=0.8, resc_schedule=False
    ce, t, fab, sq = objs["APGD-CE"], objs["APGD-T"], objs["FAB-T"], objs["Square"]
    assert (ce.steps, ce.n_restarts, ce.loss, ce.eot_iter, ce.thr_decr, ce.norm, ce.eps) == (100, 1, "ce", 1, 0.75, "Linf", 8 / 255)
    assert (t.steps, t.n_restarts, t.n_target_classes, t.eot_iter) == (100, 1, 9, 1)
    assert (fab.steps, fab.n_restarts, fab.n_target_classes, fab.multi_targeted) == (100, 1, 9, True)
    assert (sq.n_queries, sq.n_restarts, sq.p_init, sq.rescale_schedule, sq.loss) == (5000, 1, 0.8, False, "margin")
    rand = build_suite("autoattack-rand-ta", eps=0.1, default_eps=0.1, norm="linf", num_classes=10, seed=0)
    objs = [resolve_attack(a.spec)._build(model, torch.rand(2, 3, 4, 4)) for a in rand.attacks]
    assert [(o.loss, o.eot_iter, o.steps) for o in objs] == [("ce", 20, 100), ("dlr", 20, 100)]


def test_autoattack_suites_run_the_official_code_one_attack_at_a_time():
    from pyautoattack import AutoAttack

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    suite = build_suite("autoattack", eps=8 / 255, default_eps=0.1, norm="linf", num_classes=10, seed=0)
    objs = {a.label: resolve_attack(a.spec)._build(model, torch.rand(2, 3, 4, 4)) for a in suite.attacks}
    assert list(objs) == ["APGD-CE", "APGD-T", "FAB-T", "Square"] and all(a.group == "AutoAttack" for a in suite.attacks)
    assert all(isinstance(o, AutoAttack) and o.version == "standard" for o in objs.values())
    assert [o.attacks_to_run for o in objs.values()] == [["apgd-ce"], ["apgd-t"], ["fab-t"], ["square"]]
    sq = objs["Square"].square
    assert (sq.n_queries, sq.p_init, objs["APGD-T"].apgd_targeted.n_target_classes) == (5000, 0.8, 9)
    rand = build_suite("autoattack-rand", eps=0.1, default_eps=0.1, norm="linf", num_classes=10, seed=0)
    objs = [resolve_attack(a.spec)._build(model, torch.rand(2, 3, 4, 4)) for a in rand.attacks]
    assert [o.attacks_to_run for o in objs] == [["apgd-ce"], ["apgd-dlr"]] and objs[0].apgd.eot_iter == 20


def test_the_autoattack_suite_equals_an_independent_official_call(digits_models):
    """Same points, ε and seed: our cascade of official attacks gives the official run's per-point worst case."""
    from pyautoattack import AutoAttack

    model, data = digits_models["pgd_at"], digits_models["data"]
    x, y = data.test.floats()[:40], data.test.y[:40]
    report = evaluate_model(model, x, y, suites=["autoattack"], eps=0.2, num_classes=10, progress=False, checks=False,
                            seed=0)
    official = AutoAttack(model, norm="Linf", eps=0.2, version="standard", seed=0, device="cpu")
    official.verbose = False
    adv, _ = official.run_standard_evaluation(x, y, batch_size=40)
    with torch.no_grad():
        theirs = (model(adv).argmax(1) == y).float().mean().item()
    ours = next(r for r in report.rows if r.label == "AutoAttack (worst case)").robust
    assert abs(ours - theirs) <= 1 / 40 + 1e-9, (ours, theirs)


def test_paper_suites_and_specs():
    p1 = build_suite("paper-001", eps=None, default_eps=0.2, norm="linf", num_classes=10)
    assert [a.label for a in p1.attacks] == ["FGSM", "BIM", "PGD-100", "C&W"] and p1.eps == 0.1
    pgd = resolve_attack(p1.attacks[2].spec)._build(nn.Linear(2, 2), torch.rand(1, 2))
    assert (pgd.eps, pgd.alpha, pgd.steps) == (0.1, 2 / 255, 100)
    cw = resolve_attack(p1.attacks[3].spec)._build(nn.Linear(2, 2), torch.rand(1, 2))
    assert (cw.c, cw.steps, cw.lr) == (1.0, 100, 0.001)
    p2 = build_suite("paper-002", eps=8 / 255, default_eps=0.2, norm="linf", num_classes=10)
    assert [a.label for a in p2.attacks][:6] == ["PGD-10", "PGD-20", "PGD-50", "PGD-100", "CW-Linf-20", "APGD"]
    apgd = resolve_attack(p2.attacks[5].spec)._build(nn.Linear(2, 2), torch.rand(1, 2))
    assert (apgd.loss, apgd.steps, apgd.eps) == ("ce", 100, 8 / 255) and not p2.attacks[5].group
    assert resolve_attack(p2.attacks[4].spec).cls.__module__ == "regdefense.attacks.fixes"
    assert [a.label for a in p2.attacks if a.group] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    one = build_suite("art:HopSkipJump(max_iter=2)", eps=None, default_eps=0.2, norm="linf", num_classes=10)
    assert one.attacks[0].spec == "art:HopSkipJump(max_iter=2)"
    with pytest.raises(ConfigError, match="unknown attack suite 'autoatack'.*did you mean 'autoattack'"):
        build_suite("autoatack", eps=None, default_eps=0.2, norm="linf", num_classes=10)


def test_cascade_attacks_only_still_robust_points(digits_models, monkeypatch):
    import regdefense.attacks.adapter as attacks
    import regdefense.evaluation.suites as suites

    model, data = digits_models["pgd_at"], digits_models["data"]
    two = suites.Suite("two", [suites.SuiteAttack("FGSM", "torchattacks:FGSM(eps=0.2)", group="G"),
                               suites.SuiteAttack("PGD", "torchattacks:PGD(eps=0.2, alpha=0.025, steps=10)", group="G")])
    monkeypatch.setitem(suites.SUITES._builtin, "two", lambda request: two)  # a suite registered like a built-in
    seen, real = [], attacks.LibraryAttack.__call__

    def spy(self, m, x, y):
        seen.append((self.spec.name, len(y)))
        return real(self, m, x, y)

    monkeypatch.setattr(attacks.LibraryAttack, "__call__", spy)
    rep = _eval(model, data, suites=["two"], n=64)
    rows = {r.label: r for r in rep.rows}
    n_clean = round(rep.clean * 64)
    n_after_fgsm = round(rows["G: after FGSM"].robust * 64)
    assert seen == [("FGSM", n_clean), ("PGD", n_after_fgsm)]  # each step only on still-robust points
    assert rows["G (worst case)"].robust == rows["G: after PGD"].robust <= rows["G: after FGSM"].robust
    assert torch.equal(rows["G (worst case)"].points, rows["G: after PGD"].points)


# --- sanity checks ----------------------------------------------------------------------------


class Quantised(nn.Module):
    """Input quantisation with zero gradient everywhere: a classic gradient-masking defense."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class Noisy(nn.Module):
    """A randomized defense: Gaussian noise on the input at every forward pass."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x + 0.1 * torch.randn_like(x)).clamp(0, 1))


def test_pgd_at_model_passes_every_check(digits_models):
    report = _eval(digits_models["pgd_at"], digits_models["data"], n=256, checks=True, check_samples=256,
                   surrogate=digits_models["surrogate"])
    status = {c["name"]: c["status"] for c in report.checks}
    assert status.pop("BPDA (identity) vs white-box") == "skip"  # nothing non-differentiable in a plain CNN
    assert set(status.values()) == {"pass"} and len(status) == 10, report.checks
    assert not report.warnings
    assert report.eps_curve[0]["acc"] == report.clean or report.eps_curve[0]["eps"] == 0
    from regdefense.evaluation.report import eps_floor

    assert eps_floor(report) is None  # a PGD-AT model's sweep reaches zero: nothing to mark
    accs = [p["acc"] for p in report.eps_curve]
    assert accs[-1] < 0.1 and accs[0] > 0.9


def test_gradient_masking_model_trips_its_checks(digits_models):
    model = Quantised(digits_models["clean"]).eval()
    norms = input_gradient_norms(model, digits_models["data"].test.floats()[:32], digits_models["data"].test.y[:32], "cpu")
    assert (norms == 0).all()
    report = _eval(model, digits_models["data"], n=256, checks=True, check_samples=256)
    assert _check(report, "input gradients")["status"] == "warn"
    assert _check(report, "black-box vs white-box")["status"] == "warn"
    assert any("input gradients" in w for w in report.warnings)
    from regdefense.evaluation.report import eps_floor

    floor = eps_floor(report)  # the ε-sweep plot marks where accuracy fails to reach zero
    assert floor is not None and floor["eps"] == max(p["eps"] for p in report.eps_curve) and floor["acc"] > 0.1


def test_randomized_model_without_eot_is_flagged(digits_models):
    model = Noisy(digits_models["pgd_at"]).eval()
    report = _eval(model, digits_models["data"], n=128, checks=True, check_samples=48)
    check = _check(report, "randomized model without EOT")
    assert check["status"] == "warn" and check["numbers"]["randomized"] and not check["numbers"]["eot"]
    assert any("without EOT" in w for w in report.warnings)
    # the official rand version ran on the check points, and its per-point result is kept for the ledger
    rand = report.check_points["check: AutoAttack-rand (EOT-20)"]
    assert len(rand) == 48 and check["numbers"]["autoattack_rand"] == pytest.approx(float(rand.float().mean()))


def test_collapsed_model_is_flagged(digits_models):
    class Constant(nn.Module):
        """Always predicts class 3 (still differentiable, so the attacks run)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return 0.01 * self.net(x) + 5 * nn.functional.one_hot(torch.tensor(3), 10).float()

    report = _eval(Constant(digits_models["clean"]), digits_models["data"], n=128, checks=True, check_samples=64)
    c = _check(report, "collapse (one class)")
    assert c["status"] == "warn" and c["numbers"]["top_class"] == 3 and c["numbers"]["share"] == 1.0


# --- the command ------------------------------------------------------------------------------


def test_evaluate_command_writes_reports_for_a_run(tmp_path, digits_models):
    from regdefense.training.run import train

    result = train(defenses=["pgd_at"], overrides=["train.epochs=1", "data.limit=128", "pgd_at.steps=1",
                                                   "eval.pgd_steps=1", "eval.test_samples=16", "train.progress=false"],
                   out=tmp_path / "run", echo=lambda s: None)
    out = subprocess.run([sys.executable, "-m", "regdefense", "evaluate", str(result.run_dir), "--n", "48",
                          "--attacks", "quick", "--json", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["meta"]["n"] == 48 and {r["label"] for r in data["rows"]} >= {"FGSM", "PGD-20"}
    for f in ("report.json", "report.md", "robust_vs_eps.png", "examples.png"):
        assert (result.run_dir / "eval" / f).stat().st_size > 0
    md = (result.run_dir / "eval" / "report.md").read_text()
    assert "| PGD-20 | quick |" in md and "Sanity checks" in md


def test_evaluate_a_users_own_state_dict_and_bad_inputs(tmp_path, digits_models):
    path = tmp_path / "mine.pt"
    torch.save(digits_models["clean"].state_dict(), path)
    out = subprocess.run([sys.executable, "-m", "regdefense", "evaluate", str(path), "--arch", "digits_cnn",
                          "--n", "32", "--no-checks", "--json", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["clean"] > 0.8
    bad = subprocess.run([sys.executable, "-m", "regdefense", "evaluate", str(path), "--arch", "resnet18",
                          "--n", "8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not fit architecture 'resnet18'" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "regdefense", "evaluate", str(path), "--arch", "digits_cnn",
                          "--attacks", "torchattacks:PGD(epsilon=1)"], capture_output=True, text=True)
    assert bad.returncode == 2 and "has no argument 'epsilon'" in bad.stderr


def test_torchscript_model_file(tmp_path, digits_models):
    path = tmp_path / "m.ts"
    torch.jit.script(digits_models["clean"]).save(str(path))
    from regdefense.evaluation.runner import evaluate
    report, files = evaluate(path, arch="torchscript", n=32, checks=False, progress=False, out=tmp_path / "ev",
                             trust_code=True)  # TorchScript is code: as `regdefense evaluate --trust-code`
    assert report.clean > 0.8 and files["md"].exists()


def test_evaluating_a_run_whose_defense_has_state(tmp_path):
    """fgsm_pgk's buffers and ema's copy must be rebuilt (fit_start) before the checkpoint is loaded into them."""
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    result = train(defenses=["fgsm_pgk", "ema"], overrides=["train.epochs=1", "data.limit=128", "eval.pgd_steps=1",
                                                            "eval.test_samples=16", "train.progress=false"],
                   out=tmp_path / "run", echo=lambda s: None)
    report, _ = evaluate(result.run_dir, n=32, checks=False, progress=False)
    assert report.meta["stack"] == ["fgsm_pgk", "ema"] and 0 <= report.clean <= 1


def test_the_best_known_ledger_only_lowers_the_headline_and_names_the_breaking_attack(tmp_path):
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    run = train(overrides=["train.epochs=3", "train.progress=false", "train.device=cpu", "eval.val_samples=32",
                           "eval.pgd_steps=1"], out=tmp_path / "run", echo=lambda s: None).run_dir
    weak_spec = "torchattacks:PGD(eps=0.2, alpha=0.005, steps=2)"  # the same ε as quick, a weaker attack
    kw = {"n": 60, "progress": False, "checks": False}
    weak, _ = evaluate(run, suites=[weak_spec], **kw)
    strong, _ = evaluate(run, suites=["quick"], **kw)
    again, _ = evaluate(run, suites=[weak_spec], **kw)
    heads = [next(r for r in rep.rows if r.kind == "best known").robust for rep in (weak, strong, again)]
    assert heads[0] == pytest.approx(weak.worst_case)
    assert heads[1] <= min(heads[0], strong.worst_case) + 1e-9 and heads[1] < heads[0]
    assert heads[2] == pytest.approx(heads[1])  # a weaker re-evaluation leaves the best known where it was
    names = {"PGD (torchattacks:PGD(eps=0.2, alpha=0.005, steps=2))", "FGSM (quick)", "PGD-20 (quick)"}
    broken = again.meta["best_known"]["broken_by"]
    assert broken and set(broken.values()) <= names
    entries = json.loads((run / "eval" / "ledger.json").read_text())["entries"]
    (entry,) = entries.values()
    assert set(entry["attacks"]) == names
    other_eps, _ = evaluate(run, suites=["torchattacks:FGSM(eps=0.05)"], **kw)  # another ε: its own entry
    assert len(json.loads((run / "eval" / "ledger.json").read_text())["entries"]) == 2
    assert next(r for r in other_eps.rows if r.kind == "best known").robust == pytest.approx(other_eps.worst_case)


# --- resuming an interrupted evaluation -------------------------------------------------------


def test_an_interrupted_evaluation_resumes_where_it_stopped(digits_models, tmp_path, monkeypatch):
    import regdefense.attacks.adapter as attacks

    model, data = digits_models["pgd_at"], digits_models["data"]
    kw = {"suites": ["quick", "torchattacks:PGD(eps=0.2, alpha=0.05, steps=5, random_start=True)"], "n": 96,
          "batch_size": 32}  # 3 attacks × 3 batches
    whole = _eval(model, data, **kw, state_path=tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()  # a completed evaluation leaves no progress file

    calls, real = [], attacks.LibraryAttack.__call__

    def counting(stop_at):
        def call(self, m, x, y):
            calls.append(len(y))
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return real(self, m, x, y)
        return call

    monkeypatch.setattr(attacks.LibraryAttack, "__call__", counting(5))
    with pytest.raises(KeyboardInterrupt):
        _eval(model, data, **kw, state_path=tmp_path / "b.pt")
    assert (tmp_path / "b.pt").exists()  # four finished batches were saved at the interruption
    calls.clear()
    monkeypatch.setattr(attacks.LibraryAttack, "__call__", counting(-1))
    resumed = _eval(model, data, **kw, state_path=tmp_path / "b.pt")
    assert len(calls) == 9 - 4  # only the batches not finished before
    for a, b in zip(whole.rows, resumed.rows):
        assert (a.label, a.robust) == (b.label, b.robust) and torch.equal(a.points, b.points)
        if a.psnr_mean is not None:  # perturbations are kept in float16: PSNR agrees to its fourth digit
            assert b.psnr_mean == pytest.approx(a.psnr_mean, rel=1e-3)

    # progress saved for other weights is not reused
    calls.clear()
    monkeypatch.setattr(attacks.LibraryAttack, "__call__", counting(2))
    with pytest.raises(KeyboardInterrupt):
        _eval(model, data, **kw, state_path=tmp_path / "c.pt")
    calls.clear()
    monkeypatch.setattr(attacks.LibraryAttack, "__call__", counting(-1))
    _eval(digits_models["clean"], data, **kw, state_path=tmp_path / "c.pt")
    assert len(calls) == 9


def test_a_corrupt_progress_file_starts_over(digits_models, tmp_path, capsys):
    (tmp_path / "p.pt").write_bytes(b"not a checkpoint")
    x, y = digits_models["data"].test.floats()[:32], digits_models["data"].test.y[:32]
    report = evaluate_model(digits_models["pgd_at"], x, y, suites=["quick"], default_eps=0.2, checks=False,
                            state_path=tmp_path / "p.pt")
    assert "could not read the saved progress" in capsys.readouterr().out and 0 <= report.worst_case <= 1


def test_an_evaluation_in_chunks_equals_the_whole(tmp_path):
    """Chunks are decoded, attacked and merged: per-point results, accuracies and every metric match one pass."""
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    run = train(overrides=["train.epochs=2", "train.progress=false", "train.device=cpu", "eval.val_samples=32",
                           "eval.pgd_steps=1"], out=tmp_path / "run", echo=lambda s: None).run_dir
    kw = {"suites": ["quick", "torchattacks:PGD(eps=0.2, alpha=0.05, steps=3, random_start=True)"], "n": 100,
          "batch_size": 25, "checks": False, "progress": False, "surrogate": None}
    whole, _ = evaluate(run, out=tmp_path / "whole", **kw)
    parts, _ = evaluate(run, out=tmp_path / "parts", chunk=50, **kw)
    assert parts.meta["chunks"] == 2 and parts.meta["n"] == whole.meta["n"] == 100
    assert parts.clean == whole.clean and torch.equal(parts.clean_points, whole.clean_points)
    for a, b in zip(whole.rows, parts.rows):
        assert (a.label, a.robust, a.n) == (b.label, b.robust, b.n) and torch.equal(a.points, b.points)
        for key in ("psnr_mean", "auroc"):
            va, vb = getattr(a, key), getattr(b, key)
            assert (va is None and vb is None) or va == pytest.approx(vb, rel=1e-6), (a.label, key)
        assert all(a.norms[k] == pytest.approx(b.norms[k], rel=1e-6) for k in a.norms)
    assert not list((tmp_path / "parts").glob("progress*.pt"))  # a finished evaluation leaves no progress behind

