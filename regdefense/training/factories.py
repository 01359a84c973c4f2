"""What the loop trains with, built outside it: the optimizer, the training batches, the training split's placement.

:class:`~regdefense.training.loop.Trainer` calls these once, in its constructor; each takes the config and the parts
it needs and nothing of the loop, so the ART bridge and tests can build the same things the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from regdefense.base.config import RunConfig, TrainConfig
from regdefense.base.errors import DataError
from regdefense.data.sources import BatchLoader, Data, Split
from regdefense.data.stream import StreamLoader
from regdefense.training.extra import MixedLoader


def peak_lr(t: TrainConfig) -> float:
    """``train.lr``, scaled by the global batch over ``lr_base_batch`` with ``lr_scaling=linear``."""
    return t.lr * (t.batch_size * t.accumulate / t.lr_base_batch if t.lr_scaling == "linear" else 1.0)


def build_optimizer(params: Iterable[torch.nn.Parameter], t: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` at the peak learning rate over ``params``."""
    lr, params = peak_lr(t), list(params)
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov and t.momentum > 0
        )
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=t.weight_decay, betas=(t.betas[0], t.betas[1]))


def adopt_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Use a caller's optimizer (ART's classifier's); parameters it does not hold (extra modules') join as a group."""
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    extra = [p for p in params if id(p) not in known]
    if extra:
        optimizer.add_param_group({"params": extra})
    return optimizer


def place_train_split(data: Data, config: RunConfig, device: torch.device, mixed: bool) -> tuple[Data, bool]:
    """The data with its training split in GPU memory when ``data.on_device`` asks (auto: if it fits easily), and
    whether it moved. A caller's ``Data`` object stays as it was."""
    mode, split = config.data.on_device, data.train
    if device.type != "cuda" or mode == "off" or not isinstance(split, Split):
        return data, False
    if mixed and mode == "auto":  # mixed batches are assembled on the host anyway
        return data, False
    if mode == "auto":
        total = torch.cuda.get_device_properties(device).total_memory
        if split.x.element_size() * split.x.nelement() > total // 4:
            return data, False
    moved = Split(split.x.to(device, non_blocking=True), split.y.to(device, non_blocking=True))
    return dataclasses.replace(data, train=moved), True


def build_train_loader(data: Data, extra: Any, config: RunConfig, dist: Any, device: torch.device, on_device: bool):
    """The training batches ``(x, y, index)``: in-memory, mixed with extra data (``data.extra``), or streamed files
    decoded in worker processes."""
    t = config.train
    pin = device.type == "cuda" and not on_device
    if extra is not None:  # generated / pseudo-labelled images mixed into every batch
        if not isinstance(data.train, Split):
            raise DataError("data.extra works with in-memory training data; set data.stream=off")
        fraction = config.data.extra_fraction
        return MixedLoader(
            data.train, extra, t.batch_size, fraction, seed=t.seed, augment=data.augment, dist=dist, pin=pin
        )
    if isinstance(data.train, Split):
        return BatchLoader(data.train, t.batch_size, seed=t.seed, augment=data.augment, dist=dist, pin=pin)
    return StreamLoader(
        data.train,
        t.batch_size,
        seed=t.seed,
        augment=data.augment,
        workers=config.data.workers,
        skip_corrupt=config.data.skip_corrupt,
        dist=dist,
        pin=device.type == "cuda",
    )
