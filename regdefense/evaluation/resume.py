"""Resumable evaluations: what each attack has finished, saved as it goes, so an interrupted run picks up there.

An evaluation of thousands of points under AutoAttack takes hours; losing it to a pre-empted job or a closed laptop
should cost at most the batch in flight. :class:`EvalState` keeps, per attack of every suite, how many points are
done, whether each stayed correctly classified and its perturbation, and writes them (atomically) to one file at
least every ``every`` seconds and whenever an attack completes. Reopened with the same key — the weights, the
points, the suites, ε, norm, seed — it hands each attack its finished prefix, and the attack continues from the
next batch. A different key (another checkpoint or setting) starts over, and says so.

Each batch's random seed is derived from the evaluation seed and the batch's first index, so a resumed run draws
the same random starts as an uninterrupted one. Correctness is stored exactly; perturbations are stored in float16
(a relative error below 1e-3 of ε, which moves PSNR and norms in their fourth digit and no accuracy).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regdefense.base.errors import UserError
from regdefense.base.files import write_atomic


def digest(*tensors: Tensor) -> str:
    """SHA-256 of tensors' bytes (the evaluated points, or a model's weights when it has no file)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    return digest(*(v.float() for v in model.state_dict().values() if isinstance(v, Tensor)))


class Slot:
    """One attack's progress: the first ``done`` points are finished."""

    def __init__(self, state: "EvalState", name: str, entry: dict[str, Any] | None) -> None:
        self.state, self.name = state, name
        self.ok: list[Tensor] = [entry["ok"]] if entry else []
        self.delta: list[Tensor] = [entry["delta"]] if entry else []
        self.done = int(entry["done"]) if entry else 0

    def add(self, x: Tensor, adv: Tensor, ok: Tensor) -> None:
        self.ok.append(ok.cpu())
        self.delta.append((adv.cpu() - x.cpu()).half())
        self.done += len(ok)
        self.state.save_soon()

    def restored(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The finished prefix as (adversarial images, correctness), or None when nothing is finished."""
        if not self.done:
            return None
        delta = torch.cat(self.delta).float()
        return (x[: self.done] + delta).clamp(0, 1), torch.cat(self.ok)

    def entry(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "ok": torch.cat(self.ok) if self.ok else torch.zeros(0, dtype=torch.bool),
            "delta": torch.cat(self.delta) if self.delta else torch.zeros(0, dtype=torch.float16),
        }


class EvalState:
    """The saved progress of one evaluation (see the module's docstring)."""

    def __init__(self, path: str | Path, key: dict[str, Any], every: float = 30.0) -> None:
        self.path, self.key, self.every = Path(path), key, every
        self.slots: dict[str, Slot] = {}
        self.saved: dict[str, Any] = {}
        self.note = ""
        self._last = time.monotonic()
        if self.path.is_dir() or (self.path.exists() and not self.path.is_file()):
            raise UserError(
                f"{self.path} is not a file, so the evaluation's progress cannot be kept there; move it away "
                f"(or choose another --out) and run the evaluation again"
            )
        if self.path.exists():
            try:
                data = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a file cut off mid-write by a crash: start over rather than fail
                self.note = f"could not read the saved progress in {self.path} ({type(exc).__name__}); starting over"
                return
            if not isinstance(data, dict) or not isinstance(data.get("slots"), dict):
                self.note = f"{self.path} holds no evaluation progress ({type(data).__name__}); starting over"
                return
            if data.get("key") == key:
                self.saved = data.get("slots", {})
                done = sum(1 for e in self.saved.values() if e["done"])
                self.note = f"resuming from {self.path}: {done} attack(s) with finished points" if done else ""
            else:
                self.note = (
                    f"{self.path} holds another evaluation's progress (other weights, points or settings); "
                    f"starting over"
                )

    def slot(self, name: str) -> Slot:
        if name not in self.slots:
            self.slots[name] = Slot(self, name, self.saved.get(name))
        return self.slots[name]

    def save_soon(self) -> None:
        if time.monotonic() - self._last >= self.every:
            self.save()

    def save(self) -> None:
        """Write the progress (atomically: an interruption mid-write leaves the previous file whole). A write that
        fails raises :class:`~regdefense.base.files.WriteError`: the evaluation stops there rather than go on with
        progress it could not keep, and an attack is never reported as "did not run" for it."""
        slots = dict(self.saved) | {n: s.entry() for n, s in self.slots.items()}
        payload = {"key": self.key, "slots": slots}
        write_atomic(self.path, lambda fh: torch.save(payload, fh), "the evaluation's progress")
        self._last = time.monotonic()

    def finish(self) -> None:
        """The evaluation completed: the progress file is no longer needed."""
        self.path.unlink(missing_ok=True)
