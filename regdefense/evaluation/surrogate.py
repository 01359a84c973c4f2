"""The clean surrogate of the transfer check: a model trained without any defense on the evaluated run's data, once,
in the cache.

Evaluation never needs the training loop except here, when ``--surrogate auto`` finds no cached surrogate: the one
import of :mod:`regdefense.training.run` sits inside :func:`clean_surrogate` for that reason (declared in the
architecture
test), so that evaluating a run imports no training code.

The surrogate is the evaluated model's own architecture (the run's ``model`` section; the data's default when the
target does not say), trained in ``cache_dir()/surrogates`` and nowhere else. Before it trains, one timed training
step on a batch of the data's shape gives an estimate of its cost; above ``budget`` seconds it is not trained (the
transfer check says why) unless the caller asks for it (``--surrogate train``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from regdefense.base.config import DataConfig
from regdefense.base.errors import UserError
from regdefense.base.files import try_lock
from regdefense.base.paths import cache_dir
from regdefense.base.runtime import resolve_device
from regdefense.data.sources import load_data
from regdefense.evaluation.targets import load_target
from regdefense.models import create_model, default_model

#: ``--surrogate auto`` trains a surrogate only when its estimated training time is below this many seconds
BUDGET_SECONDS = 300.0
#: the settings a surrogate keeps from the evaluated model's ``model`` section (never its weights or pretraining)
MODEL_KEYS = ("name", "normalize", "depth", "widen", "activation", "bn_momentum", "input_size")


class SurrogateSkipped(RuntimeError):
    """The automatic surrogate was not trained: its estimated cost is over the budget."""


def surrogate_dir(data: dict[str, Any], model: dict[str, Any], epochs: int, seed: int) -> Path:
    """Where the surrogate for this data, architecture, epochs and seed lives: always inside the cache. A folder
    dataset's name is a path; only its last part, made safe, names the folder."""
    key = hashlib.sha256(json.dumps([data, model, epochs, seed], sort_keys=True, default=str).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(data.get("name") or "data")).name).strip("-.") or "data"
    return cache_dir() / "surrogates" / f"{stem}-{key}"


def surrogate_model(model: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluated model's architecture settings, without anything that would load weights."""
    return {k: v for k, v in (model or {}).items() if k in MODEL_KEYS and v is not None}


def estimate_seconds(
    data, model: dict[str, Any], epochs: int, device: torch.device, batch: int = 128
) -> tuple[str, float]:
    """The surrogate's architecture and its estimated training time: one timed SGD step on a batch of the data's
    shape (after a warm-up step), times the batches of ``epochs`` epochs, plus a fifth for held-out checks."""
    c, h, w = data.input_shape
    name = model.get("name", "auto")
    if name == "auto":
        name = default_model(data.name, min(h, w))
    kwargs: dict[str, Any] = {k: model.get(k) for k in ("depth", "widen", "activation", "bn_momentum", "input_size")}
    net = create_model(name, in_channels=c, num_classes=data.num_classes, image_size=min(h, w), **kwargs).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.rand(batch, c, h, w, device=device)
    y = torch.randint(0, data.num_classes, (batch,), device=device)
    seconds = 0.0
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return name, 1.2 * seconds / batch * len(data.train) * epochs


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def clean_surrogate(
    data: dict[str, Any],
    *,
    model: dict[str, Any] | None = None,
    epochs: int = 10,
    seed: int = 1,
    device: str = "auto",
    echo: Callable[[str], None] | None = print,
    budget: float | None = BUDGET_SECONDS,
    progress: bool = False,
) -> nn.Module:
    """A model of the evaluated architecture (``model``: a run's model section) trained ``epochs`` epochs with no
    defense on ``data`` (a run's data section), for the transfer check; trained once into the cache and reused.

    :param budget: seconds; a surrogate estimated to take longer is not trained (None: train whatever it costs).
    :param progress: show the surrogate's training bars and epoch lines (through ``echo``).
    :raises SurrogateSkipped: its estimated cost is over ``budget`` (said through ``echo`` too).
    """
    arch = surrogate_model(model)
    run = surrogate_dir(data, arch, epochs, seed)
    ckpt = run / "checkpoints" / "last.pt"
    say = echo or (lambda _m: None)
    if not ckpt.exists():
        dev = resolve_device(device)
        loaded = load_data(DataConfig(**data))
        name, seconds = estimate_seconds(loaded, arch, epochs, dev)
        what = f"a clean {name} surrogate ({epochs} epochs × {len(loaded.train)} images on {dev.type})"
        if budget is not None and seconds > budget:
            why = (
                f"{what} would train for about {_duration(seconds)}, over the {_duration(budget)} budget "
                f"(--surrogate-budget); --surrogate train trains it anyway, --surrogate RUN uses a run without "
                f"defenses on this data"
            )
            say(f"transfer check skipped: {why}")
            raise SurrogateSkipped(why)
        say(
            f"training {what} for the transfer check, about {_duration(seconds)}; cached in {run} "
            f"(--surrogate none skips it)"
        )
        locks = run.parent.with_name("locks")  # beside the surrogates, not among them
        locks.mkdir(parents=True, exist_ok=True)
        held = try_lock(locks / f"surrogate-{run.name}.lock", timeout=2 * seconds + 600)  # one trainer at a time
        if held is None:
            raise UserError(f"another evaluation has been training the surrogate in {run} for too long; try again")
        try:
            if not ckpt.exists():  # another evaluation may have trained it while this one waited
                if run.exists():  # an earlier attempt stopped before its last checkpoint
                    shutil.rmtree(run)
                from regdefense.training.run import train  # the training loop, only when a surrogate must be trained

                train(
                    defenses=[],
                    overrides={
                        "data": data,
                        "model": arch,
                        "train": {"epochs": epochs, "seed": seed, "progress": progress, "device": device},
                        "eval": {"val_samples": 32, "pgd_steps": 1},
                    },
                    out=run,
                    echo=(lambda m: say(f"surrogate: {m}")) if progress else (lambda _m: None),
                )
        finally:
            if held >= 0:
                os.close(held)
    return load_target(ckpt, device=device, n=1).model
