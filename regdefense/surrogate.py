"""The clean surrogate of the transfer check: a model trained without any defense on the evaluated run's data, once,
in the cache.

Evaluation never needs the training loop except here, when ``--surrogate auto`` finds no cached surrogate: the one
import of :mod:`regdefense.run` sits inside :func:`clean_surrogate` for that reason (declared in the architecture
test), so that evaluating a run imports no training code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from typing import Any, Callable

from torch import nn

from regdefense.config import DataConfig
from regdefense.data import load_data
from regdefense.paths import cache_dir
from regdefense.runtime import resolve_device
from regdefense.targets import load_target

#: on a CPU, ``--surrogate auto`` trains a surrogate only up to this many images (epochs × training split)
CPU_SURROGATE_IMAGES = 200_000


def clean_surrogate(
    data: dict[str, Any],
    *,
    epochs: int = 10,
    seed: int = 1,
    device: str = "auto",
    echo: Callable[[str], None] | None = print,
) -> nn.Module | None:
    """A model of the data's default architecture trained ``epochs`` epochs with no defense on ``data`` (a run's
    data section), for the transfer check. Trained once per (data, epochs, seed) into the cache and reused. On a CPU,
    a surrogate that would take more than ``CPU_SURROGATE_IMAGES`` training images (CIFAR-10 for 10 epochs would take
    hours) is not trained: None, and the transfer check is skipped with a message."""
    key = hashlib.sha256(json.dumps([data, epochs, seed], sort_keys=True, default=str).encode()).hexdigest()[:16]
    run = cache_dir() / "surrogates" / f"{data.get('name', 'data')}-{key}"
    ckpt = run / "checkpoints" / "last.pt"
    if not ckpt.exists():
        if resolve_device(device).type == "cpu":
            images = epochs * len(load_data(DataConfig(**data)).train)
            if images > CPU_SURROGATE_IMAGES:
                if echo:
                    echo(
                        f"transfer check skipped: a clean surrogate would train on {images} images on the CPU; "
                        f"pass --surrogate RUN (a run without defenses on this data) or train on a GPU"
                    )
                return None
        if echo:
            echo(
                f"training a clean surrogate for the transfer check ({epochs} epochs, cached in {run}; "
                f"--surrogate none skips it)"
            )
        if run.exists():  # an earlier attempt stopped before its last checkpoint
            shutil.rmtree(run)
        from regdefense.run import train  # the training loop, only when a surrogate must be trained (module doc)

        train(
            defenses=[],
            overrides={
                "data": data,
                "train": {"epochs": epochs, "seed": seed, "progress": False, "device": device},
                "eval": {"val_samples": 32, "pgd_steps": 1},
            },
            out=run,
            echo=lambda _m: None,
        )
    return load_target(ckpt, device=device, n=1).model
