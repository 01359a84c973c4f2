"""The best-known ledger: every attack ever run on one checkpoint, per test point, so a headline can only go down.

Each evaluation of the same weights (identified by the SHA-256 of the checkpoint file) as the same architecture at
the same ε, norm and dataset adds its per-point results to the weights' own ledger in the cache
(``cache_dir()/ledgers/SHA.json``, or ``$REGDEFENSE_LEDGER``), whatever ``--out`` folder the report goes to, and to
``ledger.json`` next to the report (a copy that travels with it; its entries are merged back when the report folder is
evaluated again on another machine). A point counts as robust only while it is classified correctly clean and no
attack in the ledger has broken it; the first attack that broke it is named.
The report's ``best known`` row is that per-point worst case over everything ever run — as RobustBench reports
external attacks — so a later, stronger attack lowers it and a weaker one leaves it where it was.

The ledger is a store that concurrent evaluations share: :func:`record` takes an exclusive lock on every copy
(``NAME.lock`` beside it, :func:`regdefense.base.files.try_lock`), in a fixed order, then reads, merges and
writes each copy inside the lock through a unique temporary file, ``fsync`` and ``os.replace``, so no evaluation's
attacks are lost and no reader sees half a ledger. A copy that is not a ledger (not JSON, the wrong shape, a directory)
is moved aside to ``NAME.corrupt-<time>`` with a note and a new one started; one that cannot be written raises
:class:`LedgerError`. Format 2 adds the architecture (``meta["model"]``) to the key; an entry written before (format 1,
no architecture) is taken over by the next evaluation of those weights that names one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from regdefense.base.checkpoint import fingerprint  # noqa: F401  (the ledger's key; callers use ledger.fingerprint)
from regdefense.base.errors import UserError, first_line
from regdefense.base.files import WriteError, try_lock, write_atomic
from regdefense.base.paths import cache_dir

FORMAT = 2
#: seconds :func:`record` waits for another process's lock on a ledger before giving up
LOCK_TIMEOUT = 60.0


class LedgerError(UserError):
    """A ledger that cannot be locked, read or written."""


def home() -> Path:
    """Where the per-weights ledgers live: ``$REGDEFENSE_LEDGER``, else ``cache_dir()/ledgers``."""
    return Path(os.environ["REGDEFENSE_LEDGER"]) if os.environ.get("REGDEFENSE_LEDGER") else cache_dir() / "ledgers"


def weights_ledger(sha256: str) -> Path:
    """The ledger of one set of weights, wherever its reports are written."""
    return home() / f"{sha256}.json"


def _key(meta: dict[str, Any], arch: bool = True) -> str:
    key = f"{meta['weights_sha256']}|{meta['dataset']}|{meta['norm']}|eps={float(meta['eps']):.6g}"
    return f"{key}|arch={meta['model']}" if arch and meta.get("model") else key


def _empty() -> dict[str, Any]:
    return {"format": FORMAT, "entries": {}}


def _fix(path: Path) -> str:
    if path.parent == home():
        return "make that folder writable, or set REGDEFENSE_LEDGER=<a writable folder> to keep the ledgers elsewhere"
    return "make that folder writable"


def _failed(what: str, path: Path, exc: OSError) -> LedgerError:
    reason = exc.strerror or first_line(exc)
    return LedgerError(f"cannot {what} the best-known ledger {path}: {reason}; {_fix(path)}")


def _is_ledger(data: Any) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return False
    for entry in data["entries"].values():
        if not (isinstance(entry, dict) and isinstance(entry.get("attacks"), list)):
            return False
        if not isinstance(entry.get("points"), dict):
            return False
        for p in entry["points"].values():
            if not (isinstance(p, dict) and (p.get("broken_by") is None or isinstance(p["broken_by"], str))):
                return False
    return True


def _move_aside(path: Path, why: str, notes: list[str] | None) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, k = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while os.path.lexists(dest):
        dest, k = path.with_name(f"{path.name}.corrupt-{stamp}-{k}"), k + 1
    try:
        os.replace(path, dest)
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise LedgerError(
            f"the best-known ledger {path} is {why} and cannot be moved aside: {reason}; move or delete it, "
            "or set REGDEFENSE_LEDGER=<another folder> to keep the ledgers elsewhere"
        ) from None
    note = (
        f"the best-known ledger {path} was {why}: moved aside to {dest.name} and a new one started "
        "(the attacks it held no longer count towards the best-known row)"
    )
    if notes is None:
        warnings.warn(note, stacklevel=3)
    else:
        notes.append(note)


def _read(path: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """The ledger at ``path`` (empty when there is none); one that is not a ledger is moved aside (see module)."""
    if path.is_dir():
        _move_aside(path, "a directory", notes)
        return _empty()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return _empty()
    except OSError as exc:
        raise _failed("read", path, exc) from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        _move_aside(path, "not JSON", notes)
        return _empty()
    if not _is_ledger(data):
        _move_aside(path, "not a ledger (no per-point entries)", notes)
        return _empty()
    fmt = data.get("format", 1)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise LedgerError(
            f"the best-known ledger {path} has format {fmt!r}, newer than this regdefense's {FORMAT}: upgrade "
            "regdefense, or set REGDEFENSE_LEDGER=<another folder> to start a separate one"
        )
    return data


def _merge_entry(mine: dict[str, Any], entry: dict[str, Any]) -> None:
    mine["attacks"] += [a for a in entry["attacks"] if a not in mine["attacks"]]
    if "kind" in entry:
        mine["kind"] = entry["kind"]
    for i, p in entry["points"].items():
        q = mine["points"].setdefault(i, {"broken_by": None})
        if q["broken_by"] is None:
            q["broken_by"] = p["broken_by"]
        if "radius" in p:  # a certified entry: the smallest radius any of its certifications gave
            q["radius"] = min(q.get("radius", p["radius"]), p["radius"])


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other``'s attacks and broken points to ``into`` (a point broken in either is broken)."""
    for key, entry in other.get("entries", {}).items():
        _merge_entry(into["entries"].setdefault(key, {"attacks": [], "points": {}}), entry)


def _write(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` by ``data`` atomically (see :func:`regdefense.base.files.write_atomic`)."""
    try:
        write_atomic(path, json.dumps(data, indent=1), "the best-known ledger")
    except WriteError as exc:
        raise LedgerError(f"{exc}; {_fix(path)}") from None


@contextlib.contextmanager
def _lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock of the ledger at ``path`` (its ``NAME.lock``), waiting at most ``timeout`` seconds."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = try_lock(path.with_name(path.name + ".lock"), timeout)
    except OSError as exc:
        raise _failed("lock", path, exc) from None
    if fd is None:
        raise LedgerError(
            f"the best-known ledger {path} stayed locked by another regdefense process for {timeout:g} s; wait for "
            f"that evaluation to finish and evaluate again"
        )
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock; the lock file stays (removing it would let two processes lock)


def record(
    ledger_path: Path | list[Path],
    meta: dict[str, Any],
    clean_ok: Tensor,
    broken_by: dict[str, Tensor],
    *,
    notes: list[str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Add one evaluation to the ledger and return the entry for these weights, architecture, ε and norm.

    :param ledger_path: the ledger file, or several copies of it (the weights' own and the report folder's): all are
        locked, their entries merged (in this order), the evaluation added, and every copy written.
    :param meta: ``weights_sha256``, ``dataset``, ``norm``, ``eps`` and, when known, ``model`` (the architecture).
    :param clean_ok: per-point clean correctness of the evaluated points (the first ``len(clean_ok)`` test points).
    :param broken_by: ``{attack label: per-point "still correct" under that attack}``, in the order the attacks ran.
    :param notes: a list to which a line is added per copy that was not a ledger and was moved aside (without it,
        those lines are issued as warnings); this evaluation is still recorded.
    :param timeout: seconds to wait for another process's lock (default :data:`LOCK_TIMEOUT`).
    :raises LedgerError: a copy that cannot be locked, read or written (its folder read-only, the file immutable).
    """
    given = [ledger_path] if isinstance(ledger_path, Path) else [Path(p) for p in ledger_path]
    paths: list[Path] = []
    for path in given:  # one lock per file: a copy named twice (or through a link) would wait for itself
        if all(path.resolve() != p.resolve() for p in paths):
            paths.append(path)
    wait = LOCK_TIMEOUT if timeout is None else timeout
    with contextlib.ExitStack() as held:
        for path in sorted(paths, key=lambda p: str(p.resolve())):  # one order in every process: no deadlock
            held.enter_context(_lock(path, wait))
        data = _empty()
        for path in paths:
            _merge(data, _read(path, notes))
        key, legacy = _key(meta), _key(meta, arch=False)
        entry = data["entries"].setdefault(key, {"attacks": [], "points": {}})
        if legacy != key and legacy in data["entries"]:  # format 1 had no architecture: its entry is this one's
            _merge_entry(entry, data["entries"].pop(legacy))
        points = entry["points"]
        for i, ok in enumerate(clean_ok.tolist()):
            p = points.setdefault(str(i), {"broken_by": None})
            if not ok and p["broken_by"] is None:
                p["broken_by"] = "clean"
        for label, still in broken_by.items():
            if label not in entry["attacks"]:
                entry["attacks"].append(label)
            for i, ok in enumerate(still.tolist()):
                p = points.setdefault(str(i), {"broken_by": None})
                if not ok and p["broken_by"] is None:
                    p["broken_by"] = label
        data["format"] = FORMAT
        for path in paths:
            _write(path, data)
    return entry


def record_certified(
    ledger_path: list[Path],
    meta: dict[str, Any],
    method: str,
    settings: dict[str, Any],
    label: str,
    radius: Tensor,
    *,
    notes: list[str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Add a certification's per-point radii to the ledger as an entry of its own kind (``"kind": "certified"``,
    keyed by the weights, data, architecture, ``method`` and its ``settings``), never the empirical entry of
    :func:`record`: per point the smallest radius any such certification gave (−1: abstained or wrong, then
    ``broken_by`` names it), so a repeated certification can only lower it. Locking and copies as :func:`record`."""
    paths: list[Path] = []
    for path in ledger_path:
        if all(Path(path).resolve() != p.resolve() for p in paths):
            paths.append(Path(path))
    setting = ",".join(f"{k}={v}" for k, v in sorted(settings.items()))
    key = f"{meta['weights_sha256']}|{meta['dataset']}|certified={method}|{setting}"
    key += f"|arch={meta['model']}" if meta.get("model") else ""
    with contextlib.ExitStack() as held:
        for path in sorted(paths, key=lambda p: str(p.resolve())):
            held.enter_context(_lock(path, LOCK_TIMEOUT if timeout is None else timeout))
        data = _empty()
        for path in paths:
            _merge(data, _read(path, notes))
        entry = data["entries"].setdefault(key, {"kind": "certified", "attacks": [], "points": {}})
        entry["kind"] = "certified"
        _merge_entry(
            entry,
            {
                "attacks": [label],
                "points": {
                    str(i): {"broken_by": None if r >= 0 else label, "radius": r} for i, r in enumerate(radius.tolist())
                },
            },
        )
        data["format"] = FORMAT
        for path in paths:
            _write(path, data)
    return entry


def headline(entry: dict[str, Any], n: int | None = None) -> tuple[float, int]:
    """Best-known robust accuracy over the ledger's first ``n`` points (default: all it holds) and that count."""
    pts = entry["points"]
    ids = [str(i) for i in range(n)] if n is not None else list(pts)
    ids = [i for i in ids if i in pts]
    robust = sum(pts[i]["broken_by"] is None for i in ids)
    return (robust / len(ids) if ids else float("nan")), len(ids)
