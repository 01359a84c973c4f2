"""What an evaluation produces: report rows and the report, and merging the reports of consecutive chunks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from regdefense.evaluation.metrics import acc_drop, summarise, wilson_interval


@dataclass
class Row:
    """One line of the report: an attack, a cascade group's worst case, or the suite's worst case."""

    label: str
    suite: str
    kind: str  # "attack", "cascade step", "group worst case", "worst case"
    robust: float
    ci: tuple[float, float]
    acc_drop: float
    n: int
    spec: str = ""
    eot: bool = False
    black_box: bool = False
    psnr_mean: float | None = None
    norms: dict[str, float] = field(default_factory=dict)
    auroc: float | None = None
    seconds: float = 0.0
    #: adversarial examples the attack returned outside the threat model (projected onto it when the attack is bounded)
    outside: int = 0
    points: Tensor | None = field(default=None, repr=False)  #: per-point correctness (not written to JSON)
    #: per-point PSNR, norms and detection scores behind the metrics, and the points they cover (not in JSON)
    per_point: dict[str, Tensor] | None = field(default=None, repr=False)
    mask: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_points(
        cls,
        label: str,
        suite: str,
        kind: str,
        ok: Tensor,
        *,
        clean_acc: float,
        clean_scores: Tensor | None = None,
        attack: Any = None,
        spec: str | None = None,
        per_point: dict[str, Tensor] | None = None,
        mask: Tensor | None = None,
        seconds: float = 0.0,
        outside: int = 0,
    ) -> Row:
        """A row from per-point correctness ``ok``: accuracy, its Wilson interval and drop from ``clean_acc``, and the
        PSNR, norms and detection AUROC of ``per_point`` over ``mask`` (against ``clean_scores``).

        :param attack: the suite's attack behind the row (its ``spec``, ``eot`` and ``black_box`` are recorded).
        """
        n, acc = len(ok), float(ok.float().mean())
        m = summarise(per_point, clean_scores, mask) if per_point is not None and clean_scores is not None else {}
        return cls(
            label=label,
            suite=suite,
            kind=kind,
            robust=acc,
            ci=wilson_interval(int(ok.sum()), n),
            acc_drop=acc_drop(clean_acc, acc),
            n=n,
            spec=spec if spec is not None else (attack.spec if attack is not None else ""),
            eot=bool(attack and attack.eot),
            black_box=bool(attack and attack.black_box),
            psnr_mean=m.get("psnr_mean"),
            norms=m.get("norms", {}),
            auroc=m.get("auroc"),
            seconds=seconds,
            outside=outside,
            points=ok.clone(),
            per_point=per_point,
            mask=mask,
        )


@dataclass
class Report:
    meta: dict[str, Any]
    clean: float
    clean_ci: tuple[float, float]
    rows: list[Row]
    checks: list[dict[str, Any]] = field(default_factory=list)
    protocols: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    eps_curve: list[dict[str, float]] = field(default_factory=list)
    examples: dict[str, Any] = field(default_factory=dict)  # images for the grid (not in JSON)
    clean_points: Tensor | None = field(default=None, repr=False)  #: per-point clean correctness (not in JSON)
    #: the checks' attacks, per point of the first ``meta["checks_on"]`` points (the ledger records them)
    check_points: dict[str, Tensor] = field(default_factory=dict, repr=False)
    clean_scores: Tensor | None = field(default=None, repr=False)  #: per-point clean detection scores (not in JSON)
    #: what each escalation ran, answered, found and cost (:mod:`regdefense.evaluation.escalate`; empty with
    #: ``adaptive="off"``)
    escalations: list[dict[str, Any]] = field(default_factory=list)
    #: per-point certificates of a certification that has its own ledger kind (randomized smoothing; not in JSON)
    certified_points: Any = field(default=None, repr=False)

    @property
    def worst_case(self) -> float:
        rows = [r for r in self.rows if r.kind == "worst case"]
        return rows[0].robust if rows else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "clean": self.clean,
            "clean_ci": list(self.clean_ci),
            "protocols": self.protocols,
            "rows": [
                {k: v for k, v in r.__dict__.items() if k not in ("points", "per_point", "mask")} | {"ci": list(r.ci)}
                for r in self.rows
            ],
            "worst_case": self.worst_case,
            "checks": self.checks,
            "warnings": self.warnings,
            "robust_vs_eps": self.eps_curve,
        } | ({"escalations": self.escalations} if self.escalations else {})


def merge(reports: list[Report]) -> Report:
    """One report from the reports of consecutive chunks of the same evaluation: per-point results concatenated and
    every metric recomputed over all points; the sanity checks, the ε curve and the example images are the first
    chunk's (the checks run on the first ``check_samples`` points)."""
    first = reports[0]
    if len(reports) == 1:
        return first

    def cat(parts: list[Any]) -> Tensor:
        return torch.cat(parts)

    clean_ok = cat([r.clean_points for r in reports])
    scores = cat([r.clean_scores for r in reports])
    n, clean = len(clean_ok), float(clean_ok.float().mean())
    rows = []
    if any(len(r.rows) != len(first.rows) for r in reports):
        raise ValueError(f"chunk reports disagree on their rows: {[len(r.rows) for r in reports]}")
    for j, row in enumerate(first.rows):
        parts = [r.rows[j] for r in reports]
        if any((p.label, p.kind) != (row.label, row.kind) for p in parts):
            raise ValueError(f"chunk reports disagree at row {j}: {[p.label for p in parts]}")
        ok = cat([p.points for p in parts])
        pp = {k: cat([(p.per_point or {})[k] for p in parts]) for k in row.per_point} if row.per_point else None
        mask = cat([p.mask for p in parts]) if row.mask is not None else None
        m = summarise(pp, scores, mask) if pp is not None else {}
        acc = float(ok.float().mean())
        rows.append(
            dataclasses.replace(
                row,
                robust=acc,
                ci=wilson_interval(int(ok.sum()), n),
                acc_drop=acc_drop(clean, acc),
                n=n,
                psnr_mean=m.get("psnr_mean", row.psnr_mean),
                norms=m.get("norms", row.norms),
                auroc=m.get("auroc", row.auroc),
                seconds=sum(p.seconds for p in parts),
                outside=sum(p.outside for p in parts),
                points=ok,
                per_point=pp,
                mask=mask,
            )
        )
    warnings = list(dict.fromkeys(w for r in reports for w in r.warnings))
    return dataclasses.replace(
        first,
        meta=first.meta | {"n": n, "chunks": len(reports)},
        clean=clean,
        clean_ci=wilson_interval(int(clean_ok.sum()), n),
        rows=rows,
        warnings=warnings,
        clean_points=clean_ok,
        clean_scores=scores,
    )
