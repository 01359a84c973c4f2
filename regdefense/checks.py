"""Sanity checks that catch overstated robustness (Carlini et al. 2019; Croce & Hein 2020).

Each check returns ``{"name", "status": "pass" | "warn" | "skip", "message", "numbers"}`` and runs on
a subset of the evaluation points. A warning does not stop the evaluation; it is printed with the
report, because a number that trips one should not be published without a closer look.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.attacks import model_mode, resolve_attack
from regdefense.evaluate import NoInputGradient, Report, attack_points, logits_of

#: tolerances, in accuracy points (fractions)
TOL_SINGLE_STEP = 0.02  # FGSM may not beat PGD-20 by more than this
TOL_CONVERGENCE = 0.03  # PGD-100 with 3 restarts may not lower PGD-20 accuracy by more than this
TOL_BLACK_BOX = 0.02  # Square may not beat PGD-20 by more than this
MAX_LARGE_EPS_ACC = 0.10  # accuracy allowed at a very large ε
MAX_ZERO_GRAD = 0.10  # fraction of points with zero or non-finite input gradients
COLLAPSE_SHARE = 0.5  # one class predicted for more than this share of the inputs
TOL_ADAPTIVE = 0.02  # BPDA, transfer, a scale-invariant loss or EOT may not beat the plain white-box attack by more
TOL_HEADLINE = 0.05  # the checks' attacks together may not lower the suites' worst case by more than this

#: the checks whose warning means "gradients are masked or obfuscated" (the others: convergence, collapse, headline)
MASKING = ("single-step vs iterative", "black-box vs white-box", "very large ε", "input gradients",
           "randomized model without EOT", "BPDA (identity) vs white-box", "transfer from a clean surrogate",
           "scale-invariant loss (DLR) vs CE")


def _check(name: str, ok: bool | None, message: str, **numbers: Any) -> dict[str, Any]:
    status = "skip" if ok is None else ("pass" if ok else "warn")
    return {"name": name, "status": status, "message": message, "numbers": numbers}


def _ok(model, x, y, spec: str | None, seed: int, kw, measure: nn.Module | None = None) -> Tensor:
    """Per point: still classified correctly by ``measure`` (default ``model``) after ``spec`` ran on ``model``. An
    attack that finds no input gradient leaves the points where they are (the gradient check reports it)."""
    if spec is None:
        return logits_of(model, x, **kw).argmax(1) == y
    torch.manual_seed(seed)
    try:
        return attack_points(model, x, y, resolve_attack(spec), measure=measure, **kw)[1]
    except NoInputGradient:
        return logits_of(measure or model, x, **kw).argmax(1) == y


def _acc(model, x, y, spec: str | None, seed: int, kw) -> float:
    return float(_ok(model, x, y, spec, seed, kw).float().mean())


def _pgd(norm: str, eps: float, steps: int) -> str:
    name = "PGD" if norm == "linf" else "PGDL2"
    return f"torchattacks:{name}(eps={eps!r}, alpha={2.5 * eps / steps!r}, steps={steps}, random_start=True)"


def is_randomized(model: nn.Module, x: Tensor, device) -> bool:
    """Two eval-mode forward passes on the same inputs differ."""
    with torch.no_grad(), model_mode(model, False):
        xb = x[:64].to(device)
        return not torch.allclose(model(xb), model(xb), atol=1e-6, rtol=1e-5)


def input_gradient_norms(model: nn.Module, x: Tensor, y: Tensor, device) -> Tensor:
    """Per-sample ‖∇_x CE(f(x), y)‖₂ (summed loss, so each sample's gradient is its own)."""
    with model_mode(model, False), torch.enable_grad():
        xb = x.to(device).requires_grad_(True)
        loss = F.cross_entropy(model(xb), y.to(device), reduction="sum")
        g = torch.autograd.grad(loss, xb, allow_unused=True)[0] if loss.requires_grad else None
    if g is None:  # the output does not depend on the input at all
        return torch.zeros(len(x))
    return g.flatten(1).norm(dim=1).cpu()


def run_checks(report: Report, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, num_classes: int,
               seed: int, n_check: int, suites: list, batch_size: int, device, surrogate: nn.Module | None = None) -> None:
    """Run every check on the first ``n_check`` points; append results, warnings and the ε curve to ``report``.

    Each check's attack is kept per point in ``report.check_points`` (the ledger adds them), and a last check
    compares the suites' worst case with the worst case over the checks' attacks on the same points."""
    kw = {"batch_size": batch_size, "device": device}
    xs, ys = x[:n_check], y[:n_check]
    results = []
    found: dict[str, Tensor] = {}  # check attack -> per-point correctness on xs

    def ok(label: str, spec: str, on: nn.Module = model) -> float:
        found[label] = _ok(on, xs, ys, spec, seed, kw, measure=model)
        return float(found[label].float().mean())

    clean = _acc(model, xs, ys, None, seed, kw)
    pgd20 = ok("PGD-20", _pgd(norm, eps, 20))

    # 1. a single-step attack beating an iterative one means the loss surface misleads gradient steps
    single = (f"torchattacks:FGSM(eps={eps!r})" if norm == "linf"
              else f"torchattacks:PGDL2(eps={eps!r}, alpha={eps!r}, steps=1, random_start=False)")
    fgsm = ok("FGSM", single)
    results.append(_check("single-step vs iterative", fgsm >= pgd20 - TOL_SINGLE_STEP,
                          f"FGSM {fgsm:.1%} vs PGD-20 {pgd20:.1%}" + (
                              " — a single step beats 20: gradient masking or a bad step size" if fgsm < pgd20 - TOL_SINGLE_STEP else ""),
                          fgsm=fgsm, pgd20=pgd20))

    # 2. convergence: more steps and restarts should not change the answer much
    torch.manual_seed(seed)  # one draw for the three restarts in sequence
    strong_ok = torch.ones(len(ys), dtype=torch.bool)
    attack = resolve_attack(_pgd(norm, eps, 100))
    for _ in range(3):
        try:
            strong_ok &= attack_points(model, xs, ys, attack, **kw)[1]
        except NoInputGradient:
            strong_ok &= logits_of(model, xs, **kw).argmax(1) == ys
    found["PGD-100 × 3 restarts"] = strong_ok
    strong = float(strong_ok.float().mean())
    results.append(_check("convergence (steps, restarts)", pgd20 - strong <= TOL_CONVERGENCE,
                          f"PGD-20 {pgd20:.1%} vs PGD-100 × 3 restarts {strong:.1%}" + (
                              " — not converged: report the stronger attack" if pgd20 - strong > TOL_CONVERGENCE else ""),
                          pgd20=pgd20, pgd100_x3=strong))
    white = min(pgd20, strong)

    # 3. a black-box attack beating white-box ones points at obfuscated gradients
    n = "Linf" if norm == "linf" else "L2"
    square = ok("Square (1000 queries)", f"torchattacks:Square(norm='{n}', eps={eps!r}, n_queries=1000, p_init=0.8, "
                                         f"resc_schedule=False, seed={seed})")
    results.append(_check("black-box vs white-box", square >= white - TOL_BLACK_BOX,
                          f"Square (1000 queries) {square:.1%} vs best white-box {white:.1%}" + (
                              " — black-box beats white-box: gradients are obfuscated" if square < white - TOL_BLACK_BOX else ""),
                          square=square, white_box=white))

    # 4. accuracy against ε, up to a budget that should break any classifier
    large = 0.5 if norm == "linf" else 0.5 * float(xs[0].numel()) ** 0.5
    curve = []
    for factor in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0):
        e = eps * factor
        curve.append({"eps": e, "acc": clean if e == 0 else (pgd20 if factor == 1.0 else
                                                             _acc(model, xs, ys, _pgd(norm, e, 20), seed, kw))})
    big = _acc(model, xs, ys, _pgd(norm, large, 20), seed, kw)
    curve.append({"eps": large, "acc": big})
    report.eps_curve = sorted(curve, key=lambda p: p["eps"])
    results.append(_check("very large ε", big <= max(MAX_LARGE_EPS_ACC, 1.0 / num_classes),
                          f"PGD-20 accuracy {big:.1%} at ε = {large:.3g}" + (
                              " — should be near zero: the attack is not working" if big > max(MAX_LARGE_EPS_ACC, 1.0 / num_classes) else ""),
                          eps=large, acc=big))

    # 5. collapse: one class for most inputs (seed 001's constant-accuracy rows)
    preds = logits_of(model, x, **kw).argmax(1)
    counts = torch.bincount(preds, minlength=num_classes)
    top = int(counts.argmax())
    share = float(counts[top]) / len(preds)
    label_share = float((y == top).float().mean())
    collapsed = share > COLLAPSE_SHARE and share > 2 * label_share
    results.append(_check("collapse (one class)", not collapsed,
                          f"most predicted class {top}: {share:.1%} of inputs (its label share {label_share:.1%})" + (
                              " — the model predicts one class: its accuracy is the class frequency" if collapsed else ""),
                          top_class=top, share=share, label_share=label_share))

    # 6. zero or non-finite input gradients
    norms = torch.cat([input_gradient_norms(model, xs[i:i + batch_size], ys[i:i + batch_size], device)
                       for i in range(0, len(ys), batch_size)])
    bad = float(((norms == 0) | ~torch.isfinite(norms)).float().mean())
    results.append(_check("input gradients", bad <= MAX_ZERO_GRAD,
                          f"{bad:.1%} of points have zero or non-finite input gradients" + (
                              " — gradient-based attacks are blind there (masking); use BPDA or black-box attacks" if bad > MAX_ZERO_GRAD else ""),
                          zero_or_nonfinite=bad))

    # 7. randomness without EOT: the official rand version runs here on the check points
    randomized = is_randomized(model, xs, device)
    eot = any(a.eot for s in suites for a in s.attacks)
    if not randomized:
        results.append(_check("randomized model without EOT", True, "deterministic forward pass", randomized=False, eot=eot))
    elif eot:
        results.append(_check("randomized model without EOT", True, "two forward passes differ: EOT attacks were run",
                              randomized=True, eot=True))
    else:
        rand = _rand_autoattack(model, xs, ys, eps, norm, num_classes, seed, kw)
        found["AutoAttack-rand (EOT-20)"] = rand
        acc = float(rand.float().mean())
        results.append(_check("randomized model without EOT", False,
                              f"two forward passes differ and no EOT attack ran; on these points AutoAttack-rand "
                              f"(official, EOT-20) gives {acc:.1%} against PGD-20's {pgd20:.1%} — report "
                              f"`--suite autoattack-rand`, numbers without EOT overstate robustness",
                              randomized=True, eot=False, autoattack_rand=acc))
        for row in report.rows:
            if not row.eot and row.kind != "worst case":
                report.warnings.append(f"{row.label}: computed without EOT on a randomized model")

    # 8. BPDA with the identity through a declared or exposed non-differentiable step
    from regdefense.masking import bpda_view

    view = bpda_view(model, xs)
    if view is None:
        results.append(_check("BPDA (identity) vs white-box", None, "no non-differentiable step declared or exposed"))
    else:
        bpda = ok("BPDA-PGD-20", _pgd(norm, eps, 20), on=view[0])
        results.append(_check("BPDA (identity) vs white-box", bpda >= white - TOL_ADAPTIVE,
                              f"PGD-20 with the identity's gradient through {view[1]}: {bpda:.1%} vs white-box "
                              f"{white:.1%}" + (" — the step masks gradients: report BPDA" if bpda < white - TOL_ADAPTIVE
                                               else ""), bpda=bpda, white_box=white, through=view[1]))

    # 9. transfer from a model trained without any defense on the same data
    if surrogate is None:
        results.append(_check("transfer from a clean surrogate", None, "no surrogate given"))
    else:
        transfer = ok("transfer PGD-20 (clean surrogate)", _pgd(norm, eps, 20), on=surrogate)
        results.append(_check("transfer from a clean surrogate", transfer >= white - TOL_ADAPTIVE,
                              f"PGD-20 on a clean surrogate, measured here: {transfer:.1%} vs white-box {white:.1%}" + (
                                  " — a transferred attack beats the white-box one: gradients are masked"
                                  if transfer < white - TOL_ADAPTIVE else ""), transfer=transfer, white_box=white))

    # 10. a loss that does not saturate when logits are scaled (distillation, ×T logits)
    dlr = ok("APGD-DLR-20", f"torchattacks:APGD(norm='{n}', eps={eps!r}, steps=20, n_restarts=1, loss='dlr', "
                            f"seed={seed})") if num_classes >= 3 else None
    results.append(_check("scale-invariant loss (DLR) vs CE", None if dlr is None else dlr >= white - TOL_ADAPTIVE,
                          "fewer than 3 classes" if dlr is None else
                          f"APGD-DLR (20 steps) {dlr:.1%} vs CE white-box {white:.1%}" + (
                              " — the CE loss saturates (scaled logits?): report a margin/DLR attack such as AutoAttack"
                              if dlr < white - TOL_ADAPTIVE else ""), dlr=dlr, white_box=white))

    # 11. the headline against everything the checks ran, per point
    headline_pts = next((r.points for r in report.rows if r.kind == "worst case" and r.points is not None), None)
    if headline_pts is not None:
        suites_ok = headline_pts[:n_check]
        both = suites_ok.clone()
        for v in found.values():
            both &= v
        a, b = float(suites_ok.float().mean()), float(both.float().mean())
        breakers = sorted({k for k, v in found.items() if bool((suites_ok & ~v).any())})
        results.append(_check("headline vs the checks' attacks", a - b <= TOL_HEADLINE,
                              f"on these {len(ys)} points the suites' worst case is {a:.1%}, with the checks' attacks "
                              f"{b:.1%}" + (f" — the headline overstates robustness; broken by {', '.join(breakers)}"
                                            if a - b > TOL_HEADLINE else ""), suites=a, with_checks=b))
    report.meta["checks_on"] = len(ys)
    report.checks = results
    report.check_points = {f"check: {k}": v for k, v in found.items()}
    report.warnings += [f"check '{c['name']}': {c['message']}" for c in results if c["status"] == "warn"]


def _rand_autoattack(model, x, y, eps, norm, num_classes, seed, kw) -> Tensor:
    """Per point: correct after the official AutoAttack-rand cascade (APGD-CE then APGD-DLR, EOT-20)."""
    from regdefense.suites import official_autoattack

    robust = _ok(model, x, y, None, seed, kw)
    for a in official_autoattack(eps, norm, num_classes, seed, "rand"):
        idx = robust.nonzero().flatten()
        if len(idx):
            robust[idx] = _ok(model, x[idx], y[idx], a.spec, seed, kw)
    return robust
