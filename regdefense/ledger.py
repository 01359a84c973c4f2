"""The best-known ledger: every attack ever run on one checkpoint, per test point, so a headline can only go down.

Each evaluation of the same weights (identified by the SHA-256 of the checkpoint file) at the same ε, norm and
dataset adds its per-point results to ``ledger.json`` next to the report. A point counts as robust only while it is
classified correctly clean and no attack in the ledger has broken it; the first attack that broke it is named.
The report's ``best known`` row is that per-point worst case over everything ever run — as RobustBench reports
external attacks — so a later, stronger attack lowers it and a weaker one leaves it where it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from regdefense.errors import UserError

FORMAT = 1


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a checkpoint or model file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(meta: dict[str, Any]) -> str:
    return f"{meta['weights_sha256']}|{meta['dataset']}|{meta['norm']}|eps={float(meta['eps']):.6g}"


def record(ledger_path: Path, meta: dict[str, Any], clean_ok: Tensor, broken_by: dict[str, Tensor]) -> dict[str, Any]:
    """Add one evaluation to the ledger and return the entry for these weights, ε and norm.

    :param clean_ok: per-point clean correctness of the evaluated points (the first ``len(clean_ok)`` test points).
    :param broken_by: ``{attack label: per-point "still correct" under that attack}``, in the order the attacks ran.
    """
    data: dict[str, Any] = {"format": FORMAT, "entries": {}}
    if ledger_path.exists():
        try:
            data = json.loads(ledger_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(
                f"{ledger_path} is not a readable ledger ({exc}); move it away to start a new one"
            ) from None
    entry = data["entries"].setdefault(_key(meta), {"attacks": [], "points": {}})
    points = entry["points"]
    for i, ok in enumerate(clean_ok.tolist()):
        p = points.setdefault(str(i), {"broken_by": None})
        if not ok and p["broken_by"] is None:
            p["broken_by"] = "clean"
    for label, still in broken_by.items():
        if label not in entry["attacks"]:
            entry["attacks"].append(label)
        for i, ok in enumerate(still.tolist()):
            p = points[str(i)]
            if not ok and p["broken_by"] is None:
                p["broken_by"] = label
    tmp = ledger_path.with_suffix(".json.tmp")
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, ledger_path)  # atomic: an interrupted write never leaves half a ledger
    return entry


def headline(entry: dict[str, Any], n: int | None = None) -> tuple[float, int]:
    """Best-known robust accuracy over the ledger's first ``n`` points (default: all it holds) and that count."""
    pts = entry["points"]
    ids = [str(i) for i in range(n)] if n is not None else list(pts)
    ids = [i for i in ids if i in pts]
    robust = sum(pts[i]["broken_by"] is None for i in ids)
    return (robust / len(ids) if ids else float("nan")), len(ids)
