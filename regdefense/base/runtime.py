"""Where and how a process runs: the device ``train.device`` names, global seeding, package versions."""

from __future__ import annotations

import importlib.metadata as md
import random

import numpy as np
import torch

from regdefense._version import __version__
from regdefense.base.errors import ConfigError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device ``train.device`` names; under torchrun, ``auto`` and ``cuda`` mean this process's GPU."""
    if name in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for CUDA but no GPU is available; use train.device=auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # set either way: a run in a process where an earlier run asked for determinism (a notebook, the ART bridge, a
    # test session) must not inherit it, or its kernels, and so its weights, depend on what ran before it
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        torch.backends.cudnn.benchmark = False


def versions() -> dict[str, str]:
    """regdefense, torch and every defense distribution's version, for provenance."""
    out = {"regdefense": __version__, "torch": str(torch.__version__)}
    for ep in md.entry_points(group="regdefense"):
        if ep.dist is not None:
            out[ep.dist.metadata["Name"]] = ep.dist.version
    return out
