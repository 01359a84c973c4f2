"""Checkpoints: tensors and primitive containers only, written atomically with a checksum, loaded with
``weights_only=True``.

A file is a 16-byte magic line, the SHA-256 of the rest, then ``torch.save``'s zip. It is written to a
temporary file in the same folder, fsynced and renamed over the target, so a process killed mid-write
leaves the previous checkpoint in place; the checksum catches what a rename cannot (a disk that
flipped bits, a copy cut short). Loading never unpickles anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch

from regdefense.base.errors import CheckpointError
from regdefense.base.files import WriteError, write_atomic

FORMAT = 1
MAGIC = b"regdefense-ckpt\n"  # 16 bytes


def save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` through a temporary file, fsync and rename (never a half-written file).

    A failed write (a full disk, a vanished folder) removes the temporary file, leaves any earlier
    checkpoint at ``path`` untouched and raises :class:`CheckpointError` saying so.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getbuffer()

    def put(fh) -> None:
        fh.write(MAGIC)
        fh.write(hashlib.sha256(body).digest())
        fh.write(body)

    try:
        return write_atomic(path, put, "the checkpoint")
    except WriteError as exc:
        raise CheckpointError(f"{exc}. Free space or fix permissions, then resume from the last checkpoint") from None


def read(path: str | os.PathLike) -> Any:
    """Read any torch file safely: a checksummed regdefense file or a plain ``torch.save`` of tensors.

    Raises CheckpointError for a missing, truncated, corrupt or checksum-failing file, and for one holding
    anything other than tensors and plain containers (which is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw.startswith(MAGIC):
        digest, body = raw[len(MAGIC) : len(MAGIC) + 32], raw[len(MAGIC) + 32 :]
        if hashlib.sha256(body).digest() != digest:
            raise CheckpointError(
                f"{path} fails its checksum: the file is truncated or corrupt "
                f"({len(raw)} bytes); use another checkpoint (best.pt, epoch-N.pt)"
            )
        raw = body
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        AttributeError,
        TypeError,
        KeyError,
        IndexError,
    ) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        first = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or it holds objects "
            f"other than tensors, which are never unpickled): {first[:200]}"
        ) from None


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a regdefense checkpoint; anything else (missing, truncated, foreign) raises CheckpointError."""
    obj = read(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "model" not in obj:
        raise CheckpointError(
            f"{path} is not a regdefense checkpoint (format {FORMAT}): it holds "
            f"{_describe(obj)}; to evaluate plain weights use `regdefense evaluate FILE --arch NAME`"
        )
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:4]
        return f"a dict with keys {keys}{'...' if len(obj) > 4 else ''}"
    return f"a {type(obj).__name__}"


def differences(payload: dict[str, Any], config) -> list[str]:
    """What makes a checkpoint unfit to resume a run of ``config``: another stack, model or dataset."""
    saved = payload.get("config") or {}
    out = []
    if payload.get("stack") != list(config.defenses):
        out.append(f"defense stack {payload.get('stack')} in the file vs {list(config.defenses)} in this run")
    for section, key in (("model", "name"), ("model", "depth"), ("model", "widen"), ("data", "name")):
        have = (saved.get(section) or {}).get(key)
        want = getattr(getattr(config, section), key)
        if section in saved and have != want:
            out.append(f"{section}.{key} '{have}' in the file vs '{want}' in this run")
    return out


def rng_state() -> dict[str, Any]:
    """Every random generator the loop uses, in a weights_only-loadable form."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a checkpoint or model file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
