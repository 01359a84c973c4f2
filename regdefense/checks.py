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
from regdefense.evaluate import Report, attack_all, logits_of

#: tolerances, in accuracy points (fractions)
TOL_SINGLE_STEP = 0.02  # FGSM may not beat PGD-20 by more than this
TOL_CONVERGENCE = 0.03  # PGD-100 with 3 restarts may not lower PGD-20 accuracy by more than this
TOL_BLACK_BOX = 0.02  # Square may not beat PGD-20 by more than this
MAX_LARGE_EPS_ACC = 0.10  # accuracy allowed at a very large ε
MAX_ZERO_GRAD = 0.10  # fraction of points with zero or non-finite input gradients
COLLAPSE_SHARE = 0.5  # one class predicted for more than this share of the inputs


def _check(name: str, ok: bool | None, message: str, **numbers: Any) -> dict[str, Any]:
    status = "skip" if ok is None else ("pass" if ok else "warn")
    return {"name": name, "status": status, "message": message, "numbers": numbers}


def _acc(model, x, y, spec: str | None, seed: int, kw) -> float:
    torch.manual_seed(seed)
    adv = x if spec is None else attack_all(model, x, y, resolve_attack(spec), **kw)
    return float((logits_of(model, adv, **kw).argmax(1) == y).float().mean())


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
        (g,) = torch.autograd.grad(loss, xb, allow_unused=True)
    if g is None:  # the output does not depend on the input at all
        return torch.zeros(len(x))
    return g.flatten(1).norm(dim=1).cpu()


def run_checks(report: Report, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, num_classes: int,
               seed: int, n_check: int, suites: list, batch_size: int, device) -> None:
    """Run every check on the first ``n_check`` points; append results, warnings and the ε curve to ``report``."""
    kw = {"batch_size": batch_size, "device": device}
    xs, ys = x[:n_check], y[:n_check]
    results = []
    clean = _acc(model, xs, ys, None, seed, kw)
    pgd20 = _acc(model, xs, ys, _pgd(norm, eps, 20), seed, kw)

    # 1. a single-step attack beating an iterative one means the loss surface misleads gradient steps
    single = (f"torchattacks:FGSM(eps={eps!r})" if norm == "linf"
              else f"torchattacks:PGDL2(eps={eps!r}, alpha={eps!r}, steps=1, random_start=False)")
    fgsm = _acc(model, xs, ys, single, seed, kw)
    results.append(_check("single-step vs iterative", fgsm >= pgd20 - TOL_SINGLE_STEP,
                          f"FGSM {fgsm:.1%} vs PGD-20 {pgd20:.1%}" + (
                              " — a single step beats 20: gradient masking or a bad step size" if fgsm < pgd20 - TOL_SINGLE_STEP else ""),
                          fgsm=fgsm, pgd20=pgd20))

    # 2. convergence: more steps and restarts should not change the answer much
    torch.manual_seed(seed)
    strong_ok = torch.ones(len(ys), dtype=torch.bool)
    attack = resolve_attack(_pgd(norm, eps, 100))
    for _ in range(3):
        adv = attack_all(model, xs, ys, attack, **kw)
        strong_ok &= logits_of(model, adv, **kw).argmax(1) == ys
    strong = float(strong_ok.float().mean())
    results.append(_check("convergence (steps, restarts)", pgd20 - strong <= TOL_CONVERGENCE,
                          f"PGD-20 {pgd20:.1%} vs PGD-100 × 3 restarts {strong:.1%}" + (
                              " — not converged: report the stronger attack" if pgd20 - strong > TOL_CONVERGENCE else ""),
                          pgd20=pgd20, pgd100_x3=strong))

    # 3. a black-box attack beating white-box ones points at obfuscated gradients
    n = "Linf" if norm == "linf" else "L2"
    square = _acc(model, xs, ys, f"torchattacks:Square(norm='{n}', eps={eps!r}, n_queries=1000, p_init=0.8, "
                                 f"resc_schedule=False, seed={seed})", seed, kw)
    white = min(pgd20, strong)
    results.append(_check("black-box vs white-box", square >= white - TOL_BLACK_BOX,
                          f"Square (1000 queries) {square:.1%} vs best white-box {white:.1%}" + (
                              " — black-box beats white-box: gradients are obfuscated" if square < white - TOL_BLACK_BOX else ""),
                          square=square, white_box=white))

    # 4. accuracy against ε, up to a budget that should break any classifier
    large = 0.5 if norm == "linf" else 0.5 * float(xs[0].numel()) ** 0.5
    curve = []
    for factor in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0):
        e = eps * factor
        curve.append({"eps": e, "acc": clean if e == 0 else _acc(model, xs, ys, _pgd(norm, e, 20), seed, kw)})
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

    # 7. randomness without EOT
    randomized = is_randomized(model, xs, device)
    eot = any(a.eot for s in suites for a in s.attacks)
    results.append(_check("randomized model without EOT", (not randomized) or eot,
                          ("deterministic forward pass" if not randomized else
                           "two forward passes differ" + (": EOT attacks were run" if eot else
                                                          " and no EOT attack ran — numbers without EOT overstate "
                                                          "robustness; run autoattack-rand")),
                          randomized=randomized, eot=eot))
    if randomized:
        for row in report.rows:
            if not row.eot and row.kind != "worst case":
                report.warnings.append(f"{row.label}: computed without EOT on a randomized model")
    report.meta["checks_on"] = len(ys)
    report.checks = results
    report.warnings += [f"check '{c['name']}': {c['message']}" for c in results if c["status"] == "warn"]
