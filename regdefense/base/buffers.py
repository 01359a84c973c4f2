"""Per-sample buffers that may not fit: on the device, in host memory, or memory-mapped on disk.

FGSM-PGK keeps a prior perturbation and a momentum per training image: 2·N·C·H·W numbers, 1.2 GB for CIFAR-10 but
about 1.5 TB in float32 for ImageNet at 224 px. :func:`allocate` puts a buffer where it fits — the training device,
else host memory, else a file memory-mapped from the run directory (``torch.from_file``: the operating system pages
rows in and out) — and can store it in float16 (half the bytes; perturbations of a few 255ths lose nothing that
matters at that precision). :func:`rows` and :func:`write_rows` move the rows of a batch between wherever the buffer
lives and the batch's device and dtype.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from regdefense.base.errors import ConfigError

PLACES = ("auto", "device", "host", "disk")


def host_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def place(nbytes: int, device: torch.device, wanted: str = "auto") -> str:
    """Where ``nbytes`` of buffers go: the device while they take under a quarter of its memory, else host memory
    under a quarter of it, else disk."""
    if wanted not in PLACES:
        raise ConfigError(f"buffer place must be one of {', '.join(PLACES)}, got {wanted!r}")
    if wanted != "auto":
        return wanted
    if device.type == "cuda":
        if nbytes < torch.cuda.get_device_properties(device).total_memory // 4:
            return "device"
    elif nbytes < host_memory() // 4:
        return "device"
    return "host" if nbytes < host_memory() // 4 else "disk"


def allocate(
    shape: tuple[int, ...], *, where: str, device: torch.device, dtype: torch.dtype, path: Path | None = None
) -> Tensor:
    """A zero buffer of ``shape`` on the device, in (pinned when a GPU trains) host memory, or mapped from ``path``."""
    if where == "device":
        return torch.zeros(shape, dtype=dtype, device=device)
    if where == "host":
        return torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")
    if path is None:
        raise ConfigError("a disk buffer needs a run directory (or a buffer_dir) to live in")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a fresh buffer is zeros; an old file from another run is not
    return torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)


def rows(buffer: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """``buffer[index]`` on ``like``'s device and in its dtype."""
    return buffer[index.to(buffer.device)].to(like.device, like.dtype, non_blocking=True)


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
