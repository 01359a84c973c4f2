"""Sanity checks that catch overstated robustness (Carlini et al. 2019; Croce & Hein 2020).

Checks are a registry (:func:`check`), open to third parties through the ``regdefense.checks`` entry-point group:
a paper's own sanity check can ship as a pip package. Each check returns ``{"name", "status": "pass" | "warn" |
"skip", "message", "numbers"}`` (:func:`result`) and runs on a subset of the evaluation points. A warning does not
stop the evaluation; it is printed with the
report, because a number that trips one should not be published without a closer look.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from regdefense.attacks.adapter import model_mode, pgd_spec, resolve_attack
from regdefense.attacks.bpda import bpda_view
from regdefense.attacks.measure import NoInputGradient, attack_points, logits_of
from regdefense.base.errors import first_line
from regdefense.base.registry import Registry
from regdefense.evaluation.results import Report
from regdefense.evaluation.suites import official_autoattack

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
MASKING = (
    "single-step vs iterative",
    "black-box vs white-box",
    "very large ε",
    "input gradients",
    "randomized model without EOT",
    "BPDA (identity) vs white-box",
    "transfer from a clean surrogate",
    "scale-invariant loss (DLR) vs CE",
)


def result(name: str, ok: bool | None, message: str, **numbers: Any) -> dict[str, Any]:
    """A check's answer: ``ok`` True passes, False warns, None skips ("not applicable")."""
    status = "skip" if ok is None else ("pass" if ok else "warn")
    return {"name": name, "status": status, "message": message, "numbers": numbers}


def _ok(model, x, y, spec: str | None, seed: int, kw, measure: nn.Module | None = None, bar: Any = None) -> Tensor:
    """Per point: still classified correctly by ``measure`` (default ``model``) after ``spec`` ran on ``model``. An
    attack that finds no input gradient leaves the points where they are (the gradient check reports it)."""
    if spec is None:
        return logits_of(model, x, **kw).argmax(1) == y
    torch.manual_seed(seed)
    try:
        return attack_points(model, x, y, resolve_attack(spec), measure=measure, progress=bar, **kw)[1]
    except NoInputGradient:
        return logits_of(measure or model, x, **kw).argmax(1) == y
    finally:
        if bar is not None:
            bar.close()


def _acc(model, x, y, spec: str | None, seed: int, kw, bar: Any = None) -> float:
    return float(_ok(model, x, y, spec, seed, kw, bar=bar).float().mean())


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


@dataclass
class CheckContext:
    """What a check sees: the evaluated ``model``, the first ``n_check`` points (``x``, ``y``), the threat model, the
    suites that ran, the report so far, an optional clean ``surrogate``, and the white-box numbers the built-in checks
    share (``clean``, ``pgd20``, ``white``), computed once on first use.

    A check that attacks should do it through :meth:`ok`, so that the headline check (and the ledger) count its
    attack per point."""

    model: nn.Module
    x: Tensor
    y: Tensor
    all_x: Tensor  #: every evaluated point (the collapse check looks at all of them)
    all_y: Tensor
    eps: float
    norm: str
    num_classes: int
    seed: int
    suites: list
    report: Report
    kw: dict[str, Any]
    surrogate: nn.Module | Callable[[], nn.Module] | None = None  #: a function: called when the transfer check runs
    found: dict[str, Tensor] = field(default_factory=dict)  #: check attack -> per-point correctness on ``x``
    progress: bool = False  #: a bar with ETA for every attack a check runs
    stage: str = ""  #: "check k/n: name", the bars' prefix
    _cache: dict[str, float] = field(default_factory=dict)

    def bar(self, label: str, total: int | None = None) -> Any:
        """A progress bar for one attack of the current check (None when progress is off)."""
        if not self.progress:
            return None
        n = len(self.y) if total is None else total
        return tqdm(total=n, desc=f"{self.stage}: {label}", unit="img", leave=False, dynamic_ncols=True)

    def ok(self, label: str, spec: str, on: nn.Module | None = None) -> float:
        """Accuracy of the model under ``spec`` run on ``on`` (default: the model), kept per point under ``label``."""
        self.found[label] = _ok(
            on if on is not None else self.model,
            self.x,
            self.y,
            spec,
            self.seed,
            self.kw,
            measure=self.model,
            bar=self.bar(label),
        )
        return float(self.found[label].float().mean())

    def acc(self, spec: str | None, label: str = "") -> float:
        """Accuracy under ``spec`` (None: clean), not kept for the headline."""
        bar = self.bar(label or str(spec).split("(")[0]) if spec is not None else None
        return _acc(self.model, self.x, self.y, spec, self.seed, self.kw, bar=bar)

    def pgd(self, steps: int, eps: float | None = None) -> str:
        return pgd_spec(self.norm, self.eps if eps is None else eps, steps)

    @property
    def clean(self) -> float:
        if "clean" not in self._cache:
            self._cache["clean"] = self.acc(None)
        return self._cache["clean"]

    @property
    def pgd20(self) -> float:
        if "pgd20" not in self._cache:
            self._cache["pgd20"] = self.ok("PGD-20", self.pgd(20))
        return self._cache["pgd20"]

    @property
    def strong(self) -> float:
        """PGD-100 with 3 restarts in sequence (one seeding for the three)."""
        if "strong" not in self._cache:
            torch.manual_seed(self.seed)
            strong_ok = torch.ones(len(self.y), dtype=torch.bool)
            attack = resolve_attack(self.pgd(100))
            for k in range(3):
                bar = self.bar(f"PGD-100 restart {k + 1}/3")
                try:
                    strong_ok &= attack_points(self.model, self.x, self.y, attack, progress=bar, **self.kw)[1]
                except NoInputGradient:
                    strong_ok &= logits_of(self.model, self.x, **self.kw).argmax(1) == self.y
                finally:
                    if bar is not None:
                        bar.close()
            self.found["PGD-100 × 3 restarts"] = strong_ok
            self._cache["strong"] = float(strong_ok.float().mean())
        return self._cache["strong"]

    @property
    def white(self) -> float:
        """The best white-box accuracy: min(PGD-20, PGD-100 × 3)."""
        return min(self.pgd20, self.strong)


CheckFn = Callable[[CheckContext], "dict[str, Any] | None"]


@dataclass
class RegisteredCheck:
    name: str
    fn: CheckFn
    order: int


#: third parties register checks under this entry-point group: ``name = "package.module:function"``, a function
#: taking a :class:`CheckContext` and returning :func:`result` (or None to say nothing)
GROUP = "regdefense.checks"
#: every check by name: the built-in ones (with their order), then those of the group (order 500; one that fails to
#: load is left out, with a warning)
CHECKS: Registry[RegisteredCheck] = Registry(
    "sanity check",
    GROUP,
    adapt=lambda name, fn: RegisteredCheck(name, fn, 500),  # type: ignore[arg-type]
)


def check(name: str, *, order: int = 500) -> Callable[[CheckFn], CheckFn]:
    """Register a sanity check under ``name``; checks run by ``order`` (the headline comparison runs last, at 1000,
    so it counts every attack the other checks ran)."""

    def wrap(fn: CheckFn) -> CheckFn:
        CHECKS.register(name, RegisteredCheck(name, fn, order))
        return fn

    return wrap


def registry() -> list[RegisteredCheck]:
    """Every check in the order they run: the built-in ones and those installed through ``regdefense.checks``."""
    return sorted(CHECKS.all().values(), key=lambda c: c.order)


def run_checks(
    report: Report,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    num_classes: int,
    seed: int,
    n_check: int,
    suites: list,
    batch_size: int,
    device,
    surrogate: nn.Module | Callable[[], nn.Module] | None = None,
    progress: bool = False,
) -> CheckContext:
    """Run every registered check on the first ``n_check`` points; append results, warnings and the ε curve to
    ``report``; return the context (the escalations, :mod:`regdefense.evaluation.escalate`, go on from it).

    Each check's attack is kept per point in ``report.check_points`` (the ledger adds them), and a last check
    compares the suites' worst case with the worst case over the checks' attacks on the same points. A check that
    raises is reported as not applicable, with why, and the others still run."""
    ctx = CheckContext(
        model=model,
        x=x[:n_check],
        y=y[:n_check],
        all_x=x,
        all_y=y,
        eps=eps,
        norm=norm,
        num_classes=num_classes,
        seed=seed,
        suites=suites,
        report=report,
        kw={"batch_size": batch_size, "device": device},
        surrogate=surrogate,
        progress=progress,
    )
    ctx.clean  # noqa: B018  (the clean accuracy first, as the checks have always measured it)
    results = []
    checks = registry()
    for k, c in enumerate(checks, 1):
        ctx.stage = f"check {k}/{len(checks)} ({c.name})"
        try:
            out = c.fn(ctx)
        except Exception as exc:  # a check must never lose the evaluation
            out = result(
                c.name,
                None,
                f"not applicable: {type(exc).__name__}: {first_line(exc, 200)}",
            )
        if out is not None:
            results.append(out)
    report.meta["checks_on"] = len(ctx.y)
    report.checks = results
    report.check_points = {f"check: {k}": v for k, v in ctx.found.items()}
    report.warnings += [f"check '{c['name']}': {c['message']}" for c in results if c["status"] == "warn"]
    return ctx


# --- the built-in checks ----------------------------------------------------------------------


@check("single-step vs iterative", order=10)
def single_step(ctx: CheckContext) -> dict[str, Any]:
    """A single-step attack beating an iterative one means the loss surface misleads gradient steps."""
    eps, pgd20 = ctx.eps, ctx.pgd20
    single = (
        f"torchattacks:FGSM(eps={eps!r})"
        if ctx.norm == "linf"
        else f"torchattacks:PGDL2(eps={eps!r}, alpha={eps!r}, steps=1, random_start=False)"
    )
    fgsm = ctx.ok("FGSM", single)
    return result(
        "single-step vs iterative",
        fgsm >= pgd20 - TOL_SINGLE_STEP,
        f"FGSM {fgsm:.1%} vs PGD-20 {pgd20:.1%}"
        + (" — a single step beats 20: gradient masking or a bad step size" if fgsm < pgd20 - TOL_SINGLE_STEP else ""),
        fgsm=fgsm,
        pgd20=pgd20,
    )


@check("convergence (steps, restarts)", order=20)
def convergence(ctx: CheckContext) -> dict[str, Any]:
    """More steps and restarts should not change the answer much."""
    pgd20, strong = ctx.pgd20, ctx.strong
    return result(
        "convergence (steps, restarts)",
        pgd20 - strong <= TOL_CONVERGENCE,
        f"PGD-20 {pgd20:.1%} vs PGD-100 × 3 restarts {strong:.1%}"
        + (" — not converged: report the stronger attack" if pgd20 - strong > TOL_CONVERGENCE else ""),
        pgd20=pgd20,
        pgd100_x3=strong,
    )


@check("black-box vs white-box", order=30)
def black_box(ctx: CheckContext) -> dict[str, Any]:
    """A black-box attack beating white-box ones points at obfuscated gradients."""
    eps, white = ctx.eps, ctx.white
    n = "Linf" if ctx.norm == "linf" else "L2"
    square = ctx.ok(
        "Square (1000 queries)",
        f"torchattacks:Square(norm='{n}', eps={eps!r}, n_queries=1000, "
        f"p_init=0.8, resc_schedule=False, seed={ctx.seed})",
    )
    return result(
        "black-box vs white-box",
        square >= white - TOL_BLACK_BOX,
        f"Square (1000 queries) {square:.1%} vs best white-box {white:.1%}"
        + (" — black-box beats white-box: gradients are obfuscated" if square < white - TOL_BLACK_BOX else ""),
        square=square,
        white_box=white,
    )


@check("very large ε", order=40)
def large_eps(ctx: CheckContext) -> dict[str, Any]:
    """Accuracy against ε, up to a budget that should break any classifier (also the report's ε curve, which ends
    there: 0, ¼, ½, 1, 1.5, 2 and 3 × ε below it, then the very large ε itself)."""
    eps, norm, xs = ctx.eps, ctx.norm, ctx.x
    large = 0.5 if norm == "linf" else 0.5 * float(xs[0].numel()) ** 0.5
    curve = []
    for factor in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0):
        e = eps * factor
        if e >= large and factor != 1.0:  # the curve ends at the very large ε (0.5 under L∞), as documented
            continue
        curve.append(
            {
                "eps": e,
                "acc": ctx.clean
                if e == 0
                else (ctx.pgd20 if factor == 1.0 else ctx.acc(ctx.pgd(20, e), f"PGD-20 at ε = {e:.3g}")),
            }
        )
    big = ctx.acc(ctx.pgd(20, large), f"PGD-20 at ε = {large:.3g}")
    curve.append({"eps": large, "acc": big})
    ctx.report.eps_curve = sorted(curve, key=lambda p: p["eps"])
    limit = max(MAX_LARGE_EPS_ACC, 1.0 / ctx.num_classes)
    return result(
        "very large ε",
        big <= limit,
        f"PGD-20 accuracy {big:.1%} at ε = {large:.3g}"
        + (" — should be near zero: the attack is not working" if big > limit else ""),
        eps=large,
        acc=big,
    )


@check("collapse (one class)", order=50)
def collapse(ctx: CheckContext) -> dict[str, Any]:
    """One class for most inputs (seed 001's constant-accuracy rows)."""
    preds = logits_of(ctx.model, ctx.all_x, **ctx.kw).argmax(1)
    counts = torch.bincount(preds, minlength=ctx.num_classes)
    top = int(counts.argmax())
    share = float(counts[top]) / len(preds)
    label_share = float((ctx.all_y == top).float().mean())
    collapsed = share > COLLAPSE_SHARE and share > 2 * label_share
    return result(
        "collapse (one class)",
        not collapsed,
        f"most predicted class {top}: {share:.1%} of inputs (its label share {label_share:.1%})"
        + (" — the model predicts one class: its accuracy is the class frequency" if collapsed else ""),
        top_class=top,
        share=share,
        label_share=label_share,
    )


@check("input gradients", order=60)
def input_gradients(ctx: CheckContext) -> dict[str, Any]:
    """Zero or non-finite input gradients."""
    bs, xs, ys = ctx.kw["batch_size"], ctx.x, ctx.y
    norms = torch.cat(
        [
            input_gradient_norms(ctx.model, xs[i : i + bs], ys[i : i + bs], ctx.kw["device"])
            for i in range(0, len(ys), bs)
        ]
    )
    bad = float(((norms == 0) | ~torch.isfinite(norms)).float().mean())
    return result(
        "input gradients",
        bad <= MAX_ZERO_GRAD,
        f"{bad:.1%} of points have zero or non-finite input gradients"
        + (
            " — gradient-based attacks are blind there (masking); use BPDA or black-box attacks"
            if bad > MAX_ZERO_GRAD
            else ""
        ),
        zero_or_nonfinite=bad,
    )


@check("randomized model without EOT", order=70)
def randomized_without_eot(ctx: CheckContext) -> dict[str, Any]:
    """Randomness without EOT: the official rand version runs here on the check points."""
    name = "randomized model without EOT"
    eot = any(a.eot for s in ctx.suites for a in s.attacks)
    if not is_randomized(ctx.model, ctx.x, ctx.kw["device"]):
        return result(name, True, "deterministic forward pass", randomized=False, eot=eot)
    if eot:
        return result(name, True, "two forward passes differ: EOT attacks were run", randomized=True, eot=True)
    rand = _rand_autoattack(ctx)
    ctx.found["AutoAttack-rand (EOT-20)"] = rand
    acc = float(rand.float().mean())
    for row in ctx.report.rows:
        if not row.eot and row.kind != "worst case":
            ctx.report.warnings.append(f"{row.label}: computed without EOT on a randomized model")
    return result(
        name,
        False,
        f"two forward passes differ and no EOT attack ran; on these points AutoAttack-rand "
        f"(official, EOT-20) gives {acc:.1%} against PGD-20's {ctx.pgd20:.1%} — report "
        f"`--attacks autoattack-rand`, numbers without EOT overstate robustness",
        randomized=True,
        eot=False,
        autoattack_rand=acc,
    )


@check("BPDA (identity) vs white-box", order=80)
def bpda(ctx: CheckContext) -> dict[str, Any]:
    """BPDA with the identity through a declared or exposed non-differentiable step."""
    name = "BPDA (identity) vs white-box"
    view = bpda_view(ctx.model, ctx.x)
    if view is None:
        return result(name, None, "no non-differentiable step declared or exposed")
    white = ctx.white
    acc = ctx.ok("BPDA-PGD-20", ctx.pgd(20), on=view[0])
    return result(
        name,
        acc >= white - TOL_ADAPTIVE,
        f"PGD-20 with the identity's gradient through {view[1]}: {acc:.1%} vs white-box {white:.1%}"
        + (" — the step masks gradients: report BPDA" if acc < white - TOL_ADAPTIVE else ""),
        bpda=acc,
        white_box=white,
        through=view[1],
    )


@check("transfer from a clean surrogate", order=90)
def transfer(ctx: CheckContext) -> dict[str, Any]:
    """Transfer from a model trained without any defense on the same data."""
    name = "transfer from a clean surrogate"
    if ctx.surrogate is None:
        return result(name, None, "no surrogate given")
    if not isinstance(ctx.surrogate, nn.Module):  # trained (or found in the cache) only now, after the attacks
        try:
            ctx.surrogate = ctx.surrogate()
        except Exception as exc:
            return result(name, None, f"not applicable: {first_line(exc, 300)}")
    white = ctx.white
    acc = ctx.ok("transfer PGD-20 (clean surrogate)", ctx.pgd(20), on=ctx.surrogate)
    return result(
        name,
        acc >= white - TOL_ADAPTIVE,
        f"PGD-20 on a clean surrogate, measured here: {acc:.1%} vs white-box {white:.1%}"
        + (
            " — a transferred attack beats the white-box one: gradients are masked"
            if acc < white - TOL_ADAPTIVE
            else ""
        ),
        transfer=acc,
        white_box=white,
    )


@check("scale-invariant loss (DLR) vs CE", order=100)
def scale_invariant(ctx: CheckContext) -> dict[str, Any]:
    """A loss that does not saturate when logits are scaled (distillation, ×T logits)."""
    name = "scale-invariant loss (DLR) vs CE"
    if ctx.num_classes < 3:
        return result(name, None, "fewer than 3 classes", dlr=None, white_box=ctx.white)
    n = "Linf" if ctx.norm == "linf" else "L2"
    dlr = ctx.ok(
        "APGD-DLR-20",
        f"torchattacks:APGD(norm='{n}', eps={ctx.eps!r}, steps=20, n_restarts=1, loss='dlr', seed={ctx.seed})",
    )
    white = ctx.white
    return result(
        name,
        dlr >= white - TOL_ADAPTIVE,
        f"APGD-DLR (20 steps) {dlr:.1%} vs CE white-box {white:.1%}"
        + (
            " — the CE loss saturates (scaled logits?): report a margin/DLR attack such as AutoAttack"
            if dlr < white - TOL_ADAPTIVE
            else ""
        ),
        dlr=dlr,
        white_box=white,
    )


@check("headline vs the checks' attacks", order=1000)
def headline(ctx: CheckContext) -> dict[str, Any] | None:
    """The headline against everything the checks ran, per point."""
    headline_pts = next((r.points for r in ctx.report.rows if r.kind == "worst case" and r.points is not None), None)
    if headline_pts is None:
        return None
    suites_ok = headline_pts[: len(ctx.y)]
    both = suites_ok.clone()
    for v in ctx.found.values():
        both &= v
    a, b = float(suites_ok.float().mean()), float(both.float().mean())
    breakers = sorted({k for k, v in ctx.found.items() if bool((suites_ok & ~v).any())})
    return result(
        "headline vs the checks' attacks",
        a - b <= TOL_HEADLINE,
        f"on these {len(ctx.y)} points the suites' worst case is {a:.1%}, with the checks' attacks "
        f"{b:.1%}"
        + (f" — the headline overstates robustness; broken by {', '.join(breakers)}" if a - b > TOL_HEADLINE else ""),
        suites=a,
        with_checks=b,
    )


def _rand_autoattack(ctx: CheckContext) -> Tensor:
    """Per point: correct after the official AutoAttack-rand cascade (APGD-CE then APGD-DLR, EOT-20)."""
    model, x, y, seed, kw = ctx.model, ctx.x, ctx.y, ctx.seed, ctx.kw
    robust = _ok(model, x, y, None, seed, kw)
    for a in official_autoattack(ctx.eps, ctx.norm, ctx.num_classes, seed, "rand"):
        idx = robust.nonzero().flatten()
        if len(idx):
            robust[idx] = _ok(model, x[idx], y[idx], a.spec, seed, kw, bar=ctx.bar(a.label, len(idx)))
    return robust
