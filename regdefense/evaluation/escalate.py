"""Escalation: each sanity check that fires runs the attack that answers it (Carlini et al. 2019; Tramèr et al. 2020).

A warning says the headline is wrong; it does not give the number. After the checks, :func:`escalate` reads which of
them warned and runs, on the check points still robust, the attack that answers the symptom:

==============================================  ===================================================================
symptom (check that warned)                     escalation
==============================================  ===================================================================
zero / non-finite input gradients, one-hot or   strong transfer, then a **decision-based** attack that needs only
flat scores, transfer or black-box beating      the label, started from the transfer examples: RayS (L∞, Chen & Gu
white-box, FGSM beating PGD, very large ε,       2020, here) or ART's HopSkipJump through the attack adapter (L2)
BPDA beating white-box
transfer beating white-box                      **strong transfer**: PGD-100 (CE and DLR), MI-FGSM, DI-FGSM and
                                                VMI-FGSM from the clean surrogate(s), measured on the model
randomized forward                              **EOT-PGD** with the EOT count raised (5, 10, 20, 40) until the
                                                majority-vote accuracy stops moving; per-pass and majority vote
                                                over :data:`VOTE_PASSES` passes
BPDA beating white-box                          BPDA with more steps and restarts until the drop stops
scale-invariant loss (DLR) beating CE           APGD-DLR and APGD-T (targeted margin), 100 steps
not converged (PGD-100 × 3 below PGD-20)        PGD with more steps and restarts until the drop stops
==============================================  ===================================================================

Every escalation's adversarial examples are held to the ε-ball and the [0, 1] box (projected, as every attack's are)
and measured on the evaluated model. Its per-point result enters ``report.check_points`` as ``escalation: LABEL`` (the
ledger and the best-known row count it) and a summary enters ``report.escalations`` (what ran, why, what it found,
how long, the final budget). Only the convergence escalation can run on an honest model: a PGD-20 that has not
converged is a real weakness of the headline, not masking; it never changes the suites' rows or the checks.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from regdefense.attacks.adapter import model_mode, pgd_spec, resolve_attack
from regdefense.attacks.bpda import bpda_view
from regdefense.attacks.measure import NoInputGradient, ThreatModel, attack_points, logits_of
from regdefense.base.errors import first_line
from regdefense.evaluation.checks import CheckContext
from regdefense.evaluation.results import Report

#: seconds all escalations of one evaluation may take together (``--adaptive-budget``)
BUDGET_SECONDS = 600.0
#: queries per point of the decision-based attack (RayS)
QUERIES = 1000
#: iterations of the strong transfer attacks (PGD and APGD-DLR take twice as many)
TRANSFER_STEPS = 50
#: steps of the margin-loss escalation's APGD-DLR and APGD-T
MARGIN_STEPS = 100
#: the steps of the longer PGD rounds (convergence, BPDA), 2 restarts each, until a round stops breaking points
LONGER_STEPS = (200, 400, 800)
#: the EOT counts tried in turn until the majority-vote accuracy stops moving
EOT_COUNTS = (5, 10, 20, 40)
#: forward passes of a randomized model behind its per-pass and majority-vote accuracy
VOTE_PASSES = 15
#: an escalation round that breaks fewer than this share of the check points more has stopped moving
STOP_MOVING = 0.01
#: outputs with at most this many distinct values per point (a one-hot vector has 2) carry no score signal
FLAT_VALUES = 2

#: the checks whose warning means the gradients mislead or are missing: answered by transfer then decision-based
GRADIENT_MASKING = (
    "input gradients",
    "transfer from a clean surrogate",
    "black-box vs white-box",
    "single-step vs iterative",
    "very large ε",
    "BPDA (identity) vs white-box",
)


def flat_scores(model: nn.Module, x: Tensor, **kw: Any) -> float:
    """Share of points whose output takes at most :data:`FLAT_VALUES` distinct values (one-hot or constant scores:
    a score-based or gradient attack sees nothing until the label flips)."""
    z = logits_of(model, x, **kw)
    distinct = torch.tensor([len(torch.unique(row)) for row in z])
    return float((distinct <= FLAT_VALUES).float().mean()) if len(z) else 0.0


def rays(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, queries: int = QUERIES, start: Tensor | None = None
) -> Tensor:
    """RayS (Chen & Gu, KDD 2020), untargeted L∞, batched: a decision-based attack that needs only the predicted
    label. It searches the sign direction ``d`` whose ray ``x + r·d`` reaches another class at the smallest ``r``,
    flipping blocks of signs (halving the block each sweep) and keeping a flip when the point at the current best
    radius is already misclassified (then bisecting down). A point stops once its radius is within ``eps`` or it has
    used ``queries``. ``start``: a transfer example per point, whose signs are the first direction."""
    flat = x.flatten(1)
    n, dim = flat.shape
    d = torch.ones_like(flat) if start is None else torch.sign(start.flatten(1) - flat)
    d[d == 0] = 1
    r = torch.full((n,), float("inf"), device=x.device)
    used = torch.zeros(n, dtype=torch.long, device=x.device)

    def adversarial(direction: Tensor, radius: Tensor, idx: Tensor) -> Tensor:
        p = (flat[idx] + radius[:, None] * direction[idx]).clamp(0, 1).view(-1, *x.shape[1:])
        with torch.no_grad():
            return model(p).argmax(1) != y[idx]

    stage, block = 0, 0
    with model_mode(model, False):
        while True:
            idx = ((r > eps) & (used < queries)).nonzero().flatten()
            if not len(idx):
                break
            size = max(1, dim // 2**stage)
            cand = d.clone()
            cand[:, block * size : (block + 1) * size] *= -1
            hi = r[idx].clamp(max=1.0)
            won = adversarial(cand, hi, idx)
            used[idx] += 1
            idx, hi = idx[won], hi[won]
            if len(idx):
                lo = torch.zeros_like(hi)
                for _ in range(8):  # the boundary along the new direction, within 1/256 of the old radius
                    mid = (lo + hi) / 2
                    a = adversarial(cand, mid, idx)
                    hi, lo = torch.where(a, mid, hi), torch.where(a, lo, mid)
                used[idx] += 8
                d[idx], r[idx] = cand[idx], hi
            block += 1
            if (block * size) >= dim:
                stage, block = (0 if size == 1 else stage + 1), 0
    step = torch.where(torch.isinf(r), torch.zeros_like(r), r)
    return (flat + step[:, None] * d).clamp(0, 1).view_as(x)


class Escalator:
    """One evaluation's escalations: the check context (model, check points, surrogate), the per-point state of the
    best known so far (``alive``), the time budget and the report's section."""

    def __init__(self, report: Report, ctx: CheckContext, *, budget: float, progress: bool) -> None:
        self.report, self.ctx, self.progress = report, ctx, progress
        self.budget, self.started = budget, time.perf_counter()
        worst = next((r.points for r in report.rows if r.kind == "worst case" and r.points is not None), None)
        n = len(ctx.y)
        alive = worst[:n].clone() if worst is not None else torch.ones(n, dtype=torch.bool)
        for v in ctx.found.values():
            alive &= v
        self.alive = alive
        self.threat = ThreatModel(ctx.eps, ctx.norm)
        self.starts: Tensor | None = None  #: transfer examples, the decision-based attack's first directions
        self.entries: list[dict[str, Any]] = []

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def bar(self, label: str, total: int) -> Any:
        if not self.progress:
            return None
        return tqdm(total=total, desc=f"escalation: {label}", unit="img", leave=False, dynamic_ncols=True)

    def keep(self, label: str, ok: Tensor) -> int:
        """Record ``label``'s per-point result on the check points; returns the points it broke that nothing had."""
        new = int((self.alive & ~ok).sum())
        self.alive &= ok
        self.ctx.found[f"escalation: {label}"] = ok.clone()
        return new

    def attack(self, label: str, spec: str | Callable, on: nn.Module | None = None) -> tuple[int, Tensor]:
        """Run ``spec`` (on ``on``'s gradients; default the model) on the points still robust; measured on the
        model. Returns the points it broke and its adversarial examples for every check point."""
        ctx, idx = self.ctx, self.alive.nonzero().flatten()
        adv = ctx.x.clone()
        ok = torch.ones(len(ctx.y), dtype=torch.bool)
        if len(idx):
            torch.manual_seed(ctx.seed)
            bar = self.bar(label, len(idx))
            attack = resolve_attack(spec) if isinstance(spec, str) else spec
            try:
                adv_i, ok_i = attack_points(
                    on if on is not None else ctx.model,
                    ctx.x[idx],
                    ctx.y[idx],
                    attack,
                    measure=ctx.model,
                    progress=bar,
                    threat=self.threat,
                    **ctx.kw,
                )
                adv[idx], ok[idx] = adv_i, ok_i
            finally:
                if bar is not None:
                    bar.close()
        return self.keep(label, ok), adv

    def run(self, name: str, answers: list[str], fn: Callable[[dict[str, Any]], None]) -> None:
        """Run one escalation within the time budget; its entry says what it answered, found and cost."""
        entry: dict[str, Any] = {"name": name, "answers": answers, "attacks": [], "broke": 0}
        before = float(self.alive.float().mean())
        t0 = time.perf_counter()
        if self.left <= 0:
            entry["note"] = "skipped: the escalation time budget (--adaptive-budget) was spent"
        else:
            try:
                fn(entry)
            except Exception as exc:  # an escalation must never lose the evaluation
                entry["note"] = f"stopped: {type(exc).__name__}: {first_line(exc, 200)}"
        entry.update(
            seconds=time.perf_counter() - t0, before=before, after=float(self.alive.float().mean()), n=len(self.alive)
        )
        self.entries.append(entry)

    def note(self, entry: dict[str, Any], label: str, broke: int) -> None:
        entry["attacks"].append(label)
        entry["broke"] += broke

    # --- the escalations ---------------------------------------------------------------------------

    def surrogates(self) -> list[nn.Module]:
        sur = self.ctx.surrogate
        if sur is not None and not isinstance(sur, nn.Module):
            try:
                sur = self.ctx.surrogate = sur()
            except Exception:
                sur = None
        return [sur] if isinstance(sur, nn.Module) else []

    def strong_transfer(self, entry: dict[str, Any]) -> None:
        """MI-FGSM, DI-FGSM, PGD (CE), APGD-DLR and VMI-FGSM on each surrogate, measured on the model; the cheap
        momentum attacks first, so the costlier ones see only the points still robust."""
        surrogates = self.surrogates()
        if not surrogates:
            entry["note"] = "no surrogate (--surrogate none, or over its budget): nothing to transfer from"
            return
        eps, norm, seed, k = self.ctx.eps, self.ctx.norm, self.ctx.seed, TRANSFER_STEPS
        n = "Linf" if norm == "linf" else "L2"
        specs: dict[str, str] = {}
        if norm == "linf":
            a = 2.5 * eps / k
            specs |= {
                f"MI-FGSM-{k}": f"torchattacks:MIFGSM(eps={eps!r}, alpha={a!r}, steps={k}, decay=1.0)",
                f"DI-FGSM-{k}": f"torchattacks:DIFGSM(eps={eps!r}, alpha={a!r}, steps={k}, decay=1.0)",
            }
        specs[f"PGD-{2 * k}"] = pgd_spec(norm, eps, 2 * k)
        specs[f"APGD-DLR-{2 * k}"] = (
            f"torchattacks:APGD(norm='{n}', eps={eps!r}, steps={2 * k}, loss='dlr', seed={seed})"
        )
        if norm == "linf":
            specs[f"VMI-FGSM-{k // 2}"] = (
                f"torchattacks:VMIFGSM(eps={eps!r}, alpha={2.5 * eps / (k // 2)!r}, steps={k // 2}, decay=1.0, N=5)"
            )
        starts = self.ctx.x.clone()
        for k, sur in enumerate(surrogates):
            for label, spec in specs.items():
                name = f"transfer {label} (surrogate {k + 1})"
                idx = self.alive.nonzero().flatten()
                broke, adv = self.attack(name, spec, on=sur)
                starts[idx] = adv[idx]  # the last strong transfer example of each point still robust
                self.note(entry, name, broke)
        self.starts = starts

    def decision_based(self, entry: dict[str, Any]) -> None:
        """RayS (L∞) from the transfer examples' signs, or HopSkipJump (L2) through the attack adapter."""
        ctx = self.ctx
        if ctx.norm == "linf":
            starts = self.starts

            def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
                start = None
                if starts is not None:  # the batch's transfer examples: matched by position among the points
                    start = starts[_positions(ctx.x, x)].to(x.device)
                return rays(model, x, y, eps=ctx.eps, queries=QUERIES, start=start)

            label = f"RayS ({QUERIES} queries, from the transfer examples)"
            broke, _ = self.attack(label, attack)
        else:
            label = "HopSkipJump (L2, 20 iterations)"
            spec = "art:HopSkipJump(norm=2, max_iter=20, max_eval=500, init_eval=50, init_size=100)"
            broke, _ = self.attack(label, spec)
        self.note(entry, label, broke)

    def eot(self, entry: dict[str, Any]) -> None:
        """EOT-PGD-20 with :data:`EOT_COUNTS` samples on every clean-correct check point, until the majority-vote
        accuracy moves less than :data:`STOP_MOVING`; per-pass and majority-vote accuracy of the last one."""
        ctx = self.ctx
        if ctx.norm != "linf":  # torchattacks' EOTPGD is an L∞ attack: at an L2 ε it would be a meaningless weak one
            entry["note"] = "no EOT escalation for an L2 threat (no library EOT-PGD in L2): the count was not raised"
            return
        clean = _votes(ctx.model, ctx.x, ctx.y, VOTE_PASSES, ctx.kw)[1]
        last: float | None = None
        majority = clean  # a point stays robust only while every round's majority vote keeps it correct
        for k in EOT_COUNTS:
            if self.left <= 0:
                entry["note"] = "the time budget ended the EOT count"
                break
            spec = f"torchattacks:EOTPGD(eps={ctx.eps!r}, alpha={2.5 * ctx.eps / 20!r}, steps=20, eot_iter={k})"
            torch.manual_seed(ctx.seed)
            adv = attack_points(ctx.model, ctx.x, ctx.y, resolve_attack(spec), threat=self.threat, **ctx.kw)[0]
            per_pass, voted = _votes(ctx.model, adv, ctx.y, VOTE_PASSES, ctx.kw)
            majority = majority & voted & clean
            acc = float(majority.float().mean())
            entry.update(eot=k, per_pass=float(per_pass), majority=acc, passes=VOTE_PASSES)
            if last is not None and abs(acc - last) < STOP_MOVING:
                break
            last = acc
        if "eot" in entry:
            label = f"EOT-PGD-20 (EOT-{entry['eot']}, majority of {VOTE_PASSES} passes)"
            self.note(entry, label, self.keep(label, majority))
            entry["headline"] = "majority vote"

    def longer(self, entry: dict[str, Any], on: nn.Module | None, what: str) -> None:
        """PGD with :data:`LONGER_STEPS` steps, 2 restarts each, on the points still robust (through ``on``'s
        gradients), until a round breaks fewer than :data:`STOP_MOVING` of the check points; the final budget is
        kept."""
        for steps in LONGER_STEPS:
            if self.left <= 0:
                entry["note"] = "the time budget stopped the rounds"
                break
            broke = 0
            for restart in range(2):
                label = f"{what}PGD-{steps} restart {restart + 1}/2"
                b, _ = self.attack(label, pgd_spec(self.ctx.norm, self.ctx.eps, steps), on=on)
                self.note(entry, label, b)
                broke += b
            entry["budget"] = f"{what}PGD-{steps} × 2 restarts"
            if broke < STOP_MOVING * len(self.alive):
                break

    def margin(self, entry: dict[str, Any]) -> None:
        """APGD-DLR and APGD-T (targeted DLR), 100 steps: losses that do not saturate when logits are scaled."""
        ctx, n, k = self.ctx, "Linf" if self.ctx.norm == "linf" else "L2", MARGIN_STEPS
        for label, spec in (
            (
                f"APGD-DLR-{k}",
                f"torchattacks:APGD(norm='{n}', eps={ctx.eps!r}, steps={k}, loss='dlr', seed={ctx.seed})",
            ),
            (
                f"APGD-T-{k}",
                f"torchattacks:APGDT(norm='{n}', eps={ctx.eps!r}, steps={k}, n_classes={ctx.num_classes}, "
                f"seed={ctx.seed})",
            ),
        ):
            try:
                broke, _ = self.attack(label, spec)
            except NoInputGradient as exc:
                entry["note"] = str(exc)
                return
            self.note(entry, label, broke)


def _positions(all_x: Tensor, xb: Tensor) -> Tensor:
    """Indices in ``all_x`` of the rows of ``xb`` (the batch an attack receives), by value."""
    flat, fb = all_x.flatten(1), xb.detach().cpu().flatten(1)
    return torch.tensor([int((flat == row).all(1).nonzero()[0]) for row in fb], dtype=torch.long)


def _votes(model: nn.Module, x: Tensor, y: Tensor, passes: int, kw: dict[str, Any]) -> tuple[float, Tensor]:
    """Expected per-pass accuracy over ``passes`` forward passes, and per point the majority vote's correctness."""
    preds = torch.stack([logits_of(model, x, **kw).argmax(1) for _ in range(passes)])
    votes = F.one_hot(preds, int(preds.max()) + 1).sum(0)
    return float((preds == y).float().mean()), votes.argmax(1) == y


def plan(report: Report, ctx: CheckContext) -> list[tuple[str, list[str]]]:
    """The escalations the checks' warnings call for, in the order they run, each with the checks it answers."""
    warned = {c["name"] for c in report.checks if c["status"] == "warn"}
    steps: list[tuple[str, list[str]]] = []
    masked = sorted(warned & set(GRADIENT_MASKING))
    flat = flat_scores(ctx.model, ctx.x, **ctx.kw)
    report.meta["flat_scores"] = flat
    if flat > 0.5:
        masked.append(f"scores carry no signal ({flat:.0%} of the points one-hot or constant)")
    if masked:
        steps += [("strong transfer", masked), ("decision-based", masked)]
    if "randomized model without EOT" in warned:
        steps.append(("EOT", ["randomized model without EOT"]))
    if "BPDA (identity) vs white-box" in warned:
        steps.append(("BPDA, longer", ["BPDA (identity) vs white-box"]))
    if "scale-invariant loss (DLR) vs CE" in warned:
        steps.append(("margin losses", ["scale-invariant loss (DLR) vs CE"]))
    if "convergence (steps, restarts)" in warned:
        steps.append(("longer white-box", ["convergence (steps, restarts)"]))
    return steps


def escalate(report: Report, ctx: CheckContext, *, budget: float = BUDGET_SECONDS, progress: bool = False) -> None:
    """Run the escalations :func:`plan` names on the check points of ``ctx`` (after :func:`run_checks`); add their
    per-point results to ``report.check_points``, their summary to ``report.escalations`` and the top line's numbers
    to ``report.meta["headline"]``."""
    esc = Escalator(report, ctx, budget=budget, progress=progress)
    for name, answers in plan(report, ctx):
        if name == "strong transfer":
            esc.run(name, answers, esc.strong_transfer)
        elif name == "decision-based":
            esc.run(name, answers, esc.decision_based)
        elif name == "EOT":
            esc.run(name, answers, esc.eot)
        elif name == "BPDA, longer":
            view = bpda_view(ctx.model, ctx.x)
            esc.run(name, answers, functools.partial(esc.longer, on=view[0] if view else None, what="BPDA-"))
        elif name == "margin losses":
            esc.run(name, answers, esc.margin)
        else:
            esc.run(name, answers, functools.partial(esc.longer, on=None, what=""))
    report.escalations = esc.entries
    report.check_points.update({k: v for k, v in ctx.found.items() if k.startswith("escalation: ")})
    report.meta["adaptive"] = {"mode": "auto", "budget_s": budget, "seconds": time.perf_counter() - esc.started}
    report.meta["headline"] = headline(report)


def headline(report: Report) -> dict[str, Any]:
    """The top line's numbers from this evaluation: the per-point worst case over the suites, the checks and the
    escalations on every point (the checks and escalations cover the first ``checks_on``), the suites alone and the
    official AutoAttack's worst case (None when it did not run)."""
    worst = next(r.points for r in report.rows if r.kind == "worst case" and r.points is not None)
    best = worst.clone()
    for v in report.check_points.values():
        best[: len(v)] &= v
    aa = next((r.robust for r in report.rows if r.suite == "autoattack" and r.kind == "group worst case"), None)
    out: dict[str, Any] = {"best_known": float(best.float().mean()), "suites": report.worst_case, "autoattack": aa}
    eot = next((e for e in report.escalations if "majority" in e), None)
    if eot is not None:  # a randomized model: the majority vote under the final EOT attack is its headline
        out["randomized"] = {k: eot[k] for k in ("majority", "per_pass", "passes", "eot")} | {"n": eot["n"]}
    return out
