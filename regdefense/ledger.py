"""The best-known ledger: every attack ever run on one checkpoint, per test point, so a headline can only go down.

Each evaluation of the same weights (identified by the SHA-256 of the checkpoint file) at the same ε, norm and
dataset adds its per-point results to the weights' own ledger in the cache (``cache_dir()/ledgers/SHA.json``, or
``$REGDEFENSE_LEDGER``), whatever ``--out`` folder the report goes to, and to ``ledger.json`` next to the report (a
copy that travels with it; its entries are merged back when the report folder is evaluated again on another machine).
A point counts as robust only while it is classified correctly clean and no attack in the ledger has broken it; the
first attack that broke it is named.
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
from regdefense.paths import cache_dir

FORMAT = 1


def home() -> Path:
    """Where the per-weights ledgers live: ``$REGDEFENSE_LEDGER``, else ``cache_dir()/ledgers``."""
    return Path(os.environ["REGDEFENSE_LEDGER"]) if os.environ.get("REGDEFENSE_LEDGER") else cache_dir() / "ledgers"


def weights_ledger(sha256: str) -> Path:
    """The ledger of one set of weights, wherever its reports are written."""
    return home() / f"{sha256}.json"


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a checkpoint or model file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(meta: dict[str, Any]) -> str:
    return f"{meta['weights_sha256']}|{meta['dataset']}|{meta['norm']}|eps={float(meta['eps']):.6g}"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"format": FORMAT, "entries": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable ledger ({exc}); move it away to start a new one") from None


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other``'s attacks and broken points to ``into`` (a point broken in either is broken)."""
    for key, entry in other.get("entries", {}).items():
        mine = into["entries"].setdefault(key, {"attacks": [], "points": {}})
        mine["attacks"] += [a for a in entry["attacks"] if a not in mine["attacks"]]
        for i, p in entry["points"].items():
            q = mine["points"].setdefault(i, {"broken_by": None})
            if q["broken_by"] is None:
                q["broken_by"] = p["broken_by"]


def record(
    ledger_path: Path | list[Path], meta: dict[str, Any], clean_ok: Tensor, broken_by: dict[str, Tensor]
) -> dict[str, Any]:
    """Add one evaluation to the ledger and return the entry for these weights, ε and norm.

    :param ledger_path: the ledger file, or several copies of it (the weights' own and the report folder's): their
        entries are merged, the evaluation added, and every copy written.
    :param clean_ok: per-point clean correctness of the evaluated points (the first ``len(clean_ok)`` test points).
    :param broken_by: ``{attack label: per-point "still correct" under that attack}``, in the order the attacks ran.
    """
    paths = [ledger_path] if isinstance(ledger_path, Path) else list(ledger_path)
    data: dict[str, Any] = {"format": FORMAT, "entries": {}}
    for path in paths:
        _merge(data, _read(path))
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
    for path in paths:
        tmp = path.with_suffix(".json.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # atomic: an interrupted write never leaves half a ledger
    return entry


def headline(entry: dict[str, Any], n: int | None = None) -> tuple[float, int]:
    """Best-known robust accuracy over the ledger's first ``n`` points (default: all it holds) and that count."""
    pts = entry["points"]
    ids = [str(i) for i in range(n)] if n is not None else list(pts)
    ids = [i for i in ids if i in pts]
    robust = sum(pts[i]["broken_by"] is None for i in ids)
    return (robust / len(ids) if ids else float("nan")), len(ids)
