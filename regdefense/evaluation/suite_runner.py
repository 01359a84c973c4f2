"""One evaluation of a model on given points: each suite's attacks run one by one, then the checks and escalation.

:func:`evaluate_model` reads top to bottom: set up (:class:`Session`), run each suite (:meth:`Session.run_suite`, each
attack through :meth:`Session.run_attack`), gather the report, then the checks and the escalations they call for.
Each row is :meth:`Row.from_points` of per-point correctness, so every figure is a mean over points, and a worst case
is taken per point (the minimum over attacks of each point), never as the minimum of the means.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from regdefense.attacks.adapter import resolve_attack
from regdefense.attacks.measure import NoInputGradient, ThreatModel, attack_points, logits_of
from regdefense.base.errors import UserError, first_line
from regdefense.base.files import WriteError
from regdefense.evaluation import shards
from regdefense.evaluation.checks import run_checks
from regdefense.evaluation.escalate import BUDGET_SECONDS as ESCALATION_BUDGET
from regdefense.evaluation.escalate import escalate
from regdefense.evaluation.metrics import detection_score, per_point, wilson_interval
from regdefense.evaluation.results import Report, Row
from regdefense.evaluation.resume import EvalState, digest, model_digest
from regdefense.evaluation.suites import Suite, SuiteAttack, build_suite


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    suites: list[str],
    eps: float | None = None,
    default_eps: float = 8 / 255,
    norm: str = "linf",
    num_classes: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    checks: bool = True,
    check_samples: int = 256,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    state_path: str | Path | None = None,
    surrogate: nn.Module | Callable[[], nn.Module] | None = None,
    first_index: int = 0,
    keep_progress: bool = False,
    world: Any = None,
    adaptive: str = "auto",
    adaptive_budget: float = ESCALATION_BUDGET,
) -> Report:
    """Evaluate ``model`` on ``(x, y)`` (inputs in [0,1]) under the named suites or attack specs.

    :param state_path: save the attacks' progress there as they go and resume from it (see
        :mod:`regdefense.evaluation.resume`); the file is removed when the evaluation completes.
    :param surrogate: a model trained without any defense on the same data, for the transfer check, or a function
        that returns one (called after the attacks, so that the numbers asked for come first).
    :param first_index: the position of ``x[0]`` in a larger evaluation (a chunk's offset; seeds batches).
    :param keep_progress: leave the progress file in place at the end (the chunks of one evaluation).
    :param world: under torchrun, the :class:`~regdefense.base.distributed.Dist`: each attack's batches are split over
        the ranks and gathered (:func:`regdefense.evaluation.shards.attack_shared`), ``state_path`` is this rank's,
        and rank 0 alone runs the checks.
    :param adaptive: ``"auto"``: each check that warns runs the attack that answers it
        (:mod:`regdefense.evaluation.escalate`), within ``adaptive_budget`` seconds; ``"off"``: the checks only warn.
    """
    if adaptive not in ("auto", "off"):
        raise UserError(f"adaptive must be auto or off, got {adaptive!r}")
    if x.min() < 0 or x.max() > 1:
        raise UserError(f"evaluation inputs must lie in [0,1], found [{float(x.min()):g}, {float(x.max()):g}]")
    x, y = x.cpu().float(), y.cpu().long()
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device}
    num_classes = num_classes or int(logits_of(model, x[:2], **kw).shape[1])
    built = [
        build_suite(s, eps=eps, default_eps=default_eps, norm=norm, num_classes=num_classes, seed=seed) for s in suites
    ]
    shared = world is not None and world.enabled
    settings = {"suites": list(suites), "eps": eps, "default_eps": default_eps, "norm": norm, "seed": seed}
    session = Session.start(model, x, y, kw, seed=seed, first_index=first_index, world=world if shared else None)
    session.open_progress(state_path, settings, progress)
    session.bar = _bar(sum(len(s.attacks) for s in built) * len(y), "attacks", progress)
    try:
        for suite in built:
            session.run_suite(suite, several=len(built) > 1)
    except BaseException:  # an interruption (Ctrl-C, SIGTERM, an error): keep every finished batch
        session.save_quietly()
        raise
    finally:
        if session.bar is not None:
            session.bar.close()
    eps_used = built[0].eps if built else eps
    meta = dict(meta or {}) | {"n": len(y), "eps": eps_used, "norm": norm, "seed": seed, "suites": suites}
    report = session.report(meta | {"num_classes": num_classes}, built)
    if checks and (not shared or world.is_main):
        ctx = run_checks(
            report, model, x, y, eps=report.meta["eps"], norm=norm, num_classes=num_classes, seed=seed,
            n_check=check_samples, suites=built, surrogate=surrogate, progress=progress, **kw,
        )  # fmt: skip
        if adaptive == "auto":
            escalate(report, ctx, budget=adaptive_budget, progress=progress)
    if session.state is not None and not keep_progress:
        session.state.finish()
    return report


@dataclass
class Session:
    """What every attack of one evaluation shares: the points, their clean results, the progress and what was found."""

    model: nn.Module
    x: Tensor
    y: Tensor
    kw: dict[str, Any]  #: batch size and device of every forward pass
    seed: int
    first_index: int
    clean_ok: Tensor  #: per-point clean correctness
    clean_acc: float
    clean_scores: Tensor  #: per-point clean detection scores
    attack_fn: Callable[..., tuple[Tensor, Tensor]]  #: one process's attack_points, or shared over torchrun's ranks
    world: Any = None
    state: EvalState | None = None
    bar: Any = None
    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    examples: dict[str, Tensor] = field(default_factory=dict)
    worst: Tensor = field(default_factory=lambda: torch.ones(0, dtype=torch.bool))  #: robust to every attack so far

    @classmethod
    def start(cls, model: nn.Module, x: Tensor, y: Tensor, kw: dict[str, Any], **how: Any) -> Session:
        """The clean pass: what every row is measured against."""
        clean_logits = logits_of(model, x, **kw)
        clean_ok = clean_logits.argmax(1) == y
        world = how.get("world")
        attack_fn = functools.partial(shards.attack_shared, world) if world is not None else attack_points
        return cls(
            model, x, y, kw, how["seed"], how["first_index"], clean_ok, float(clean_ok.float().mean()),
            detection_score(clean_logits), attack_fn, world, worst=clean_ok.clone(),
        )  # fmt: skip

    def open_progress(self, path: str | Path | None, settings: dict[str, Any], progress: bool) -> None:
        """Resume from (and save to) ``path``: the attacks already finished on these points, model and settings."""
        if path is None:
            return
        rank = {"rank": self.world.rank, "world": self.world.world} if self.world is not None else {}
        key = {"points": digest(self.x, self.y), "weights": model_digest(self.model)} | settings | rank
        self.state = EvalState(path, key)
        if self.state.note and progress:
            print(self.state.note)

    def save_quietly(self) -> None:
        """Keep every finished batch on the way out; the error on its way out says what went wrong."""
        if self.state is not None:
            try:
                self.state.save()
            except WriteError:
                pass  # this save cannot make that message better

    def row(self, label: str, suite: str, kind: str, ok: Tensor, **extra: Any) -> Row:
        """A row of per-point correctness ``ok`` against this evaluation's clean pass."""
        acc, scores = self.clean_acc, self.clean_scores
        return Row.from_points(label, suite, kind, ok, clean_acc=acc, clean_scores=scores, **extra)

    def point_metrics(self, adv: Tensor) -> dict[str, Tensor]:
        """Per-point PSNR, perturbation norms and detection score of adversarial images ``adv``."""
        return per_point(self.x, adv, logits_of(self.model, adv, **self.kw))

    def run_suite(self, suite: Suite, several: bool) -> None:
        """Each attack of ``suite`` in order: a cascade group attacks only the points still robust in it."""
        n = len(self.y)
        groups: dict[str, tuple[Tensor, Tensor]] = {}  # group -> (still robust, adversarial images)
        for a in suite.attacks:
            robust, adv = groups.get(a.group, (self.clean_ok.clone(), self.x.clone())) if a.group else (None, None)
            idx = robust.nonzero().flatten() if robust is not None else torch.arange(n)
            adv_i, ok_i, seconds, outside = self.run_attack(suite, a, idx)
            adv = self.x.clone() if adv is None else adv
            adv[idx] = adv_i
            if not a.group:
                ok_i = ok_i & self.clean_ok  # a point misclassified before the attack is not made robust by it
                self.worst &= ok_i
                pp = self.point_metrics(adv)
                self.rows.append(
                    self.row(a.label, suite.name, "attack", ok_i, attack=a, per_point=pp, seconds=seconds,
                             outside=outside)
                )  # fmt: skip
            else:
                assert robust is not None
                robust = robust.clone()
                robust[idx] = ok_i
                if self.bar is not None:
                    self.bar.update(n - len(idx))  # the points already broken count as done
                groups[a.group] = (robust, adv)
                label = f"{a.group}: after {a.label}"
                self.rows.append(
                    self.row(label, suite.name, "cascade step", robust, attack=a, seconds=seconds, outside=outside)
                )
            self.examples.setdefault(f"{suite.name}: {a.label}" if several else a.label, adv[:8].clone())
            if self.state is not None:
                self.state.save()  # each finished attack is kept, whatever happens to the next
        for group, (robust, adv) in groups.items():
            self.worst &= robust
            steps = [r for r in self.rows if r.label.startswith(group + ": ") and r.suite == suite.name]
            spec = " -> ".join(a.label for a in suite.attacks if a.group == group)
            self.rows.append(
                self.row(f"{group} (worst case)", suite.name, "group worst case", robust, spec=spec,
                         per_point=self.point_metrics(adv), mask=self.clean_ok.clone(),
                         seconds=sum(r.seconds for r in steps))
            )  # fmt: skip

    def run_attack(self, suite: Suite, a: SuiteAttack, idx: Tensor) -> tuple[Tensor, Tensor, float, int]:
        """One attack on the points ``idx``: adversarial images, per-point correctness, seconds, points outside.

        An attack that cannot run on this model (no input gradient, a crash) leaves the images clean and says so.
        """
        attack = resolve_attack(a.spec)
        started = time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(f"{suite.name}: {a.label}")
        target: nn.Module | None = self.model
        if a.surrogate == "bpda":
            target = getattr(self.model, "bpda_model", None)
            if target is None:
                raise UserError(
                    "suite bpda-pgd needs a model with a purifier (it has no bpda_model); evaluate an atop run"
                )
        threat = ThreatModel(suite.eps, suite.norm, project=a.bounded)
        slot = self.state.slot(f"{suite.name}/{a.label}") if self.state else None
        try:
            adv_i, ok_i = self.attack_fn(
                target, self.x[idx], self.y[idx], attack, measure=self.model, progress=self.bar, seed=self.seed,
                slot=slot, first_index=self.first_index, threat=threat, **self.kw,
            )  # fmt: skip
        except Exception as exc:  # no input gradient, or an attack that crashes on this model
            if isinstance(exc, UserError) and not isinstance(exc, NoInputGradient):
                raise  # the user's input (a bad spec, a missing purifier): said as it is
            adv_i, ok_i = self.x[idx].clone(), self.clean_ok[idx].clone()
            why = str(exc) if isinstance(exc, NoInputGradient) else f"{type(exc).__name__}: {first_line(exc)}"
            self.warnings.append(
                f"{suite.name}: {a.label} did not run — {why}; its row is the clean accuracy and "
                f"means nothing: see the transfer, black-box and BPDA checks"
            )
            if self.bar is not None:
                self.bar.update(len(idx))
        seconds = time.perf_counter() - started
        if threat.outside:
            self.warnings.append(f"{suite.name}: {a.label} — {threat.describe(len(idx))}")
        return adv_i, ok_i, seconds, threat.outside

    def report(self, meta: dict[str, Any], built: list[Suite]) -> Report:
        """The rows so far, with the worst case over every attack, as a report."""
        n = len(self.y)
        self.rows.append(self.row("worst case over all attacks", "all", "worst case", self.worst))
        report = Report(
            meta=meta,
            clean=self.clean_acc,
            clean_ci=wilson_interval(int(self.clean_ok.sum()), n),
            rows=self.rows,
            protocols={s.name: s.protocol for s in built},
        )
        for s in built:
            report.warnings += s.notes
        report.warnings += self.warnings
        report.examples = {"clean": self.x[:8].clone(), "labels": self.y[:8].clone(), **self.examples}
        report.clean_points = self.clean_ok.clone()
        report.clean_scores = self.clean_scores
        return report


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)
