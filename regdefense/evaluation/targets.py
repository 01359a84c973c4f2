"""What to evaluate: a run, a checkpoint, an export folder, ``hf:ORG/NAME``, ``robustbench:NAME`` or a model file,
with the test points it is measured on. Checkpoints are rebuilt by :mod:`regdefense.training.restore` (the model
factory and
the defenses' hooks), never by the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regdefense.base import checkpoint
from regdefense.base.config import DataConfig
from regdefense.base.errors import UserError, first_line
from regdefense.base.runtime import resolve_device
from regdefense.data.sources import load_data
from regdefense.data.stream import subset_of
from regdefense.models import create_model, list_models, robustbench_zoo
from regdefense.models.weights import (
    export_info,
    is_export,
    load,
    load_program,
    load_torchscript,
    resolve,
    state_dict_of,
)
from regdefense.training.restore import checkpoint_file, rebuild


@dataclass
class Target:
    model: nn.Module
    x: Tensor
    y: Tensor
    default_eps: float
    norm: str
    num_classes: int
    device: torch.device
    meta: dict[str, Any]
    run_dir: Path | None = None
    data_config: dict[str, Any] = field(default_factory=dict)  #: the run's data section (for a clean surrogate)
    model_config: dict[str, Any] = field(default_factory=dict)  #: the run's model section (the surrogate's)
    split: Any = None  #: the evaluated test split (x holds its first points, decoded)
    count: int = 0  #: how many of its points are evaluated


def select_points(test, n: int | None = None, subset: str | None = None):
    """The evaluated part of a test split: its ``subset`` (see :func:`regdefense.data.stream.subset_of`), then the first
    ``n``. Returns the (sub)split and how many points of it are evaluated; nothing is decoded."""
    if subset is not None:
        test = subset_of(test, subset)
    return test, (min(n, len(test)) if n else len(test))


def load_target(
    target: str | Path,
    *,
    which: str = "best",
    arch: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    n: int | None = None,
    subset: str | None = None,
    decode: int | None = None,
    trust_code: bool = False,
) -> Target:
    """Load what to evaluate.

    :param target: a run directory (its ``checkpoints/<which>.pt``), a regdefense checkpoint, an export folder,
        ``hf:ORG/NAME``, ``robustbench:NAME``, a ``.pt2`` program, or, with ``arch``, a user's state_dict file
        (``arch`` = an architecture name) or TorchScript file (``arch="torchscript"``).
    :param trust_code: load ``.pt2`` and TorchScript programs (code, not data: refused without it, whatever
        ``arch`` or an export's ``config.json`` says).
    :param dataset: the data to evaluate on (default: the run's, else ``digits``); the test split is used.
    :param n: only the first ``n`` test points (of the subset).
    :param decode: decode only the first ``decode`` of them into ``Target.x`` (the rest stay in ``Target.split``).
    :param subset: ``robustbench`` (RobustBench's fixed 5 000 ImageNet validation images) or a file listing the
        test images to use, one path per line relative to the test folder.
    """
    if isinstance(target, str) and target.startswith("robustbench:"):
        return _zoo_target(target, dataset, device, n, subset, decode)
    path = Path(resolve(target))  # hf:ORG/NAME → its export folder in the Hugging Face cache
    if not path.exists():
        raise UserError(
            f"nothing to evaluate at {path}: give a run directory, a checkpoint, an export folder, "
            f"hf:ORG/NAME, robustbench:NAME or a model file"
        )
    dev = resolve_device(device)
    if arch is None and path.suffix == ".pt2" and path.is_file():
        arch = "torch-export"  # a torch.export program says what it is
    if arch is None and is_export(path):
        return _export_target(path, str(target), dataset, device, n, subset, decode, trust_code)
    if arch is None:
        ckpt = checkpoint_file(path, which)
        payload = checkpoint.load(ckpt)
        return _target_from_payload(payload, ckpt, dataset, device, n, subset, decode)
    data = _test_data(dataset or "digits", subset)
    c, h, w = data.input_shape
    if arch == "torchscript":
        model = load_torchscript(path, map_location=dev, trust_code=trust_code)
    elif arch == "torch-export":
        model = load_program(path, trust_code=trust_code)
    else:
        model = create_model(arch, in_channels=c, num_classes=data.num_classes, image_size=min(h, w))
        state: Any = state_dict_of(checkpoint.read(path))  # regdefense's, RobustBench's or a plain state_dict
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise UserError(f"{path} does not fit architecture '{arch}': {first_line(exc, 300)}") from None
    return _model_target(
        model,
        data,
        data.default_eps,
        "linf",
        device,
        n,
        subset,
        decode,
        {"target": str(path), "dataset": data.name, "model": arch},
    )


def _test_data(name: str, subset: str | None):
    return load_data(DataConfig(name=name, val_fraction=0.0, stream="on" if subset else "auto"))


def _model_target(
    model: nn.Module,
    data,
    eps: float,
    norm: str,
    device: str,
    n: int | None,
    subset: str | None,
    decode: int | None,
    meta: dict[str, Any],
    model_config: dict[str, Any] | None = None,
) -> Target:
    dev = resolve_device(device)
    split, count = select_points(data.test, n, subset)
    x, y = _decode(split, 0, min(count, decode or count))
    return Target(
        model=model.to(dev).eval(),
        x=x,
        y=y,
        split=split,
        count=count,
        default_eps=eps,
        norm=norm,
        num_classes=data.num_classes,
        device=dev,
        data_config={"name": data.name},
        model_config=model_config if model_config is not None else _zoo_arch(meta.get("model")),
        meta=meta,
    )


def _zoo_arch(name: Any) -> dict[str, Any]:
    """A model file's architecture as a model section, when the zoo can build it (for the clean surrogate)."""
    return {"name": name} if isinstance(name, str) and (name in list_models() or name.startswith("timm:")) else {}


def _export_target(
    folder: Path,
    target: str,
    dataset: str | None,
    device: str,
    n: int | None,
    subset: str | None,
    decode: int | None,
    trust_code: bool = False,
) -> Target:
    """An export folder (``regdefense export``, or ``hf:ORG/NAME`` fetched): its model on its data's test split."""
    info = export_info(folder)
    data = _test_data(dataset or info.get("dataset") or "digits", subset)
    if list(data.input_shape) != list(info["input_shape"]):
        raise UserError(
            f"{target} takes images of shape {info['input_shape']}; {data.name}'s are "
            f"{list(data.input_shape)}: pick its data with --dataset"
        )
    return _model_target(
        load(folder, trust_code=trust_code),
        data,
        info["threat"]["eps"],
        info["threat"]["norm"],
        device,
        n,
        subset,
        decode,
        {
            "target": target,
            "dataset": data.name,
            "model": info["architecture"],
            "stack": info.get("stack", []),
            "epoch": info.get("epoch"),
            "source": info.get("source"),
        },
        dict((info.get("config") or {}).get("model") or {}, name=info["architecture"]),
    )


#: RobustBench's budgets per leaderboard
ZOO_EPS = {
    ("cifar10", "Linf"): 8 / 255,
    ("cifar100", "Linf"): 8 / 255,
    ("imagenet", "Linf"): 4 / 255,
    ("cifar10", "L2"): 0.5,
    ("cifar100", "L2"): 0.5,
}


def _zoo_target(
    target: str, dataset: str | None, device: str, n: int | None, subset: str | None, decode: int | None
) -> Target:
    """``robustbench:NAME``: the zoo model (robustbench's loader) on its leaderboard's test split and budget."""
    name, ds, threat = robustbench_zoo.parse(target, dataset)
    if threat == "corruptions":
        raise UserError(f"{target} is a common-corruptions model; regdefense evaluates adversarial threat models")
    model = robustbench_zoo.load(target, dataset)
    data = _test_data(dataset or ds, subset)
    return _model_target(
        model,
        data,
        ZOO_EPS[(ds, threat)],
        threat.lower(),
        device,
        n,
        subset,
        decode,
        {"target": target, "dataset": data.name, "model": f"robustbench:{ds}/{threat}/{name}"},
    )


def _decode(split, start: int, stop: int) -> tuple[Tensor, Tensor]:
    return split.floats(torch.arange(start, stop)), split.y[start:stop]


def _target_from_payload(
    payload: dict[str, Any],
    ckpt: Path,
    dataset: str | None,
    device: str,
    n: int | None = None,
    subset: str | None = None,
    decode: int | None = None,
) -> Target:
    host, model, cfg, missing = rebuild(payload, dataset=dataset, device=device)
    split, count = select_points(host.data.test, n, subset)
    x, y = _decode(split, 0, min(count, decode or count))
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return Target(
        model=model,
        x=x,
        y=y,
        split=split,
        count=count,
        default_eps=host.eps_full,
        norm=host.norm,
        num_classes=host.data.num_classes,
        device=host.device,
        run_dir=run_dir,
        data_config=dict(payload["config"].get("data") or {})
        | {"extra": [], "teacher": None}
        | ({"name": dataset} if dataset else {}),
        model_config=dict(payload["config"].get("model") or {}),
        meta={
            "target": str(ckpt),
            "dataset": cfg.data.name,
            "stack": cfg.defenses,
            "epoch": payload["epoch"],
            "model": type(host.raw_model).__name__,
            **({"not_installed_training_only": missing} if missing else {}),
        },
    )
