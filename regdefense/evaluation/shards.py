"""Evaluation beyond one process: the points split into shards, by torchrun's ranks or by ``evaluate --shard K/N``.

Why shards are whole batches: every batch of an attack is seeded by the global index of its first point
(:func:`regdefense.attacks.measure.batch_seed`), so a shard that starts on a batch boundary draws exactly what one
process
draws for the same points; :func:`split_batches` cuts only there.

Two ways, two guarantees:

- **torchrun** (:func:`attack_shared`): every rank holds all the points and splits *each attack's* points (the
  still-robust ones, for a cascade stage of AutoAttack) into contiguous blocks of whole batches; after the attack the
  blocks are gathered, so every rank knows every point's result before the next stage picks its points. The report
  equals one process's per point, cascades and the checks (rank 0 runs them on the gathered results) included.
- **job arrays** (``--shard K/N``, :func:`save_partial` / :func:`combine`): shard K evaluates its slice of the
  points alone and writes a partial; ``regdefense merge`` concatenates the partials' per-point results in shard
  order. Attacks that run on every point equal one process per point; a cascade's later stages run on the shard's
  still-robust points, so their batches (and random draws) differ, as with ``--chunk``. The checks run in the shard
  that holds point 0, on its first ``check_samples`` points.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch import Tensor

from regdefense.attacks.measure import NoInputGradient, ThreatModel, attack_points
from regdefense.base.errors import UserError
from regdefense.base.files import write_atomic
from regdefense.evaluation.results import Report, Row, merge

#: a partial evaluation's file, in its ``--out`` folder
PARTIAL = "partial.pt"
#: what every partial of one evaluation must share, with the name a refusal gives it
AGREE = {
    "weights": "weights",
    "eps": "ε",
    "norm": "norm",
    "suites": "suites",
    "seed": "seed",
    "points": "point set",
    "labels": "labels",
    "batch_size": "batch size",
}


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with 1 <= K <= N."""
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise UserError(f"--shard takes K/N (this shard's number and the count, e.g. 1/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise UserError(f"--shard {text}: K must lie between 1 and N")
    return k, n


def split_batches(n: int, batch_size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` blocks of whole batches over ``n`` points (a block may be empty)."""
    batches = -(-n // batch_size)
    cuts = [batches * k // parts for k in range(parts + 1)]
    return [(min(a * batch_size, n), min(b * batch_size, n)) for a, b in zip(cuts, cuts[1:])]


# --- torchrun: one attack's batches split over the ranks, the results gathered -----------------


def attack_shared(world: Any, model, x: Tensor, y: Tensor, attack: Callable, **kw) -> tuple[Tensor, Tensor]:
    """:func:`~regdefense.attacks.measure.attack_points` on this rank's block of ``x``, then every rank's block
    gathered:
    every rank returns the whole ``(adversarial images, correctness)``. ``world`` is a
    :class:`regdefense.base.distributed.Dist`; ``kw`` are attack_points' (its ``slot`` holds this rank's block only)."""
    bs = int(kw.get("batch_size", 256))
    blocks = split_batches(len(x), bs, world.world)
    lo, hi = blocks[world.rank]
    threat: ThreatModel | None = kw.get("threat")
    progress = kw.get("progress")
    failure: tuple[str, str] | None = None
    adv, ok = x[lo:hi].clone(), torch.zeros(hi - lo, dtype=torch.bool)
    try:
        adv, ok = attack_points(
            model, x[lo:hi], y[lo:hi], attack, **(kw | {"first_index": kw.get("first_index", 0) + lo})
        )
    except Exception as exc:  # said on every rank, so that no rank waits for a gather that never comes
        failure = (type(exc).__name__, str(exc))
    failures: list[Any] = [None] * world.world
    tdist.all_gather_object(failures, failure)
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        kind = {"NoInputGradient": NoInputGradient, "UserError": UserError}.get(first[0])
        raise (kind or RuntimeError)(first[1] if kind else f"{first[0]} on another process: {first[1]}")
    if progress is not None:
        progress.update(len(x) - (hi - lo))  # the other ranks' points are done too
    if threat is not None:  # the points each rank found outside the threat model, counted over all of them
        counts = torch.tensor([float(threat.outside)], dtype=torch.float64, device=world.device)
        worst = torch.tensor([float(threat.worst)], dtype=torch.float64, device=world.device)
        tdist.all_reduce(counts)
        tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)
        threat.outside, threat.worst = int(counts.item()), float(worst.item())
    return _gather(world, adv, blocks), _gather(world, ok.to(torch.uint8), blocks).bool()


def _gather(world: Any, part: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """Every rank's ``part`` (rank r's holds ``blocks[r]``), concatenated in rank order, on the CPU."""
    width = max(b - a for a, b in blocks)
    padded = torch.zeros((width, *part.shape[1:]), dtype=part.dtype, device=world.device)
    padded[: len(part)] = part.to(world.device)
    every = [torch.empty_like(padded) for _ in blocks]
    tdist.all_gather(every, padded)
    return torch.cat([t[: b - a].cpu() for t, (a, b) in zip(every, blocks)])


# --- job arrays: partials on disk, merged ------------------------------------------------------


def save_partial(report: Report, out: Path, key: dict[str, Any]) -> Path:
    """Write shard ``key["shard"]``'s report, per point, as plain tensors and values (read back with
    ``weights_only=True``)."""
    rows = [{f.name: getattr(r, f.name) for f in dataclasses.fields(Row)} for r in report.rows]
    payload = {f.name: getattr(report, f.name) for f in dataclasses.fields(Report)} | {"rows": rows}
    path = Path(out) / PARTIAL
    write_atomic(path, lambda fh: torch.save({"key": key, "report": payload}, fh), "the shard's partial report")
    return path


def load_partial(folder: str | Path) -> tuple[dict[str, Any], Report]:
    """A partial written by :func:`save_partial` (a folder holding ``partial.pt``, or the file)."""
    path = Path(folder)
    path = path / PARTIAL if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{folder} holds no partial evaluation ({PARTIAL}): run `regdefense evaluate --shard K/N`")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        raw = data["report"]
        rows = [Row(**r) for r in raw["rows"]]
        report = Report(**(raw | {"rows": rows}))
    except Exception as exc:
        raise UserError(f"{path} is not a readable partial evaluation ({type(exc).__name__})") from None
    return data["key"], report


def combine(folders: list[str | Path]) -> Report:
    """One report from every shard's partial: refused, by name, when they are not shards of one evaluation
    (weights, ε, norm, suites, seed, point set, labels, batch size) or when shards are missing or given twice."""
    if not folders:
        raise UserError("give the folders of the shards' partials to merge")
    parts = [(Path(f), *load_partial(f)) for f in folders]
    _, key0, _ = parts[0]
    for folder, key, _ in parts[1:]:
        for field, name in AGREE.items():
            if key.get(field) != key0.get(field):
                raise UserError(
                    f"cannot merge: {parts[0][0]} and {folder} were evaluated with different {name} "
                    f"({_short(key0.get(field))} vs {_short(key.get(field))})"
                )
        if key["shard"][1] != key0["shard"][1]:
            raise UserError(
                f"cannot merge: {parts[0][0]} is shard {key0['shard'][0]}/{key0['shard'][1]} and {folder} "
                f"shard {key['shard'][0]}/{key['shard'][1]} (different shard counts)"
            )
    count = key0["shard"][1]
    seen: dict[int, Path] = {}
    for folder, key, _ in parts:
        k = key["shard"][0]
        if k in seen:
            raise UserError(
                f"cannot merge: shard {k}/{count} is given twice ({seen[k]} and {folder}); overlapping shards"
            )
        seen[k] = folder
    missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in seen]
    if missing:
        raise UserError(f"cannot merge: shard {', '.join(missing)} missing (have {len(seen)} of {count})")
    ordered = sorted(parts, key=lambda p: p[1]["shard"][0])
    spans = [tuple(p[1]["span"]) for p in ordered]
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or spans[-1][1] != key0["count"]:
        raise UserError(f"cannot merge: the shards' points {spans} do not tile the {key0['count']} points")
    report = merge([p[2] for p in ordered])
    report.meta.pop("chunks", None)
    report.meta["shards"] = count
    return report


def _short(value: Any) -> str:
    text = str(value)
    return text[:16] + "…" if len(text) > 24 else text
