"""RobustBench's model zoo through the ``robustbench`` package: ``robustbench:NAME`` as a target and an architecture.

- ``regdefense evaluate robustbench:Wang2023Better_WRN-28-10`` and ``--init robustbench:NAME`` load a zoo model with
  robustbench's own loader (``robustbench.utils.load_model``: its architecture, its checkpoint quirks). Its weights
  download when online; offline, a local file at ``<models>/<dataset>/<threat>/<NAME>.pt`` is used, where
  ``<models>`` is ``$ROBUSTBENCH_MODELS`` or ``$REGDEFENSE_CACHE/robustbench`` (``~/.cache/regdefense/robustbench``).
- ``model.name = "robustbench:NAME"`` trains the zoo entry's architecture from scratch (add ``model.pretrained =
  true`` to start from its weights).

The name may carry its leaderboard: ``robustbench:cifar100/Linf/NAME``; otherwise the data's (``cifar10``,
``cifar100``, ``imagenet``) and ``Linf``. Zoo models take [0, 1] inputs with any normalisation inside, as regdefense
models do.

robustbench 1.1 reads its checkpoints with a bare ``torch.load`` (weights-only since torch 2.6, but not under
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``); :func:`load` makes every ``torch.load`` of that call weights-only.

robustbench 1.1 imports ``pkg_resources`` (gone from setuptools 81) and the official AutoAttack under its original
module name ``autoattack``, which ``pyautoattack`` provides as ``pyautoattack``; :func:`import_robustbench` supplies
both for the duration of the import only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

from regdefense.base.errors import ConfigError, UserError, first_line

DATASETS = ("cifar10", "cifar100", "imagenet")
THREATS = ("Linf", "L2", "corruptions")


@contextlib.contextmanager
def _stand_ins():
    added = []
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, resource: str) -> str:
            from importlib.resources import files

            return str(files(package.rpartition(".")[0] or package) / resource)

        shim.resource_filename = resource_filename
        sys.modules["pkg_resources"] = shim
        added.append("pkg_resources")
    if importlib.util.find_spec("autoattack") is None:
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
        added.append("autoattack")
    try:
        yield
    finally:
        for name in added:  # robustbench keeps its references; nothing else sees the stand-ins
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _weights_only():
    """``torch.load`` reads tensors and plain containers only, whatever its caller or the environment asks (for the
    duration of robustbench's loader: it passes no ``weights_only``)."""
    real = torch.load

    def load(*args, **kwargs):
        return real(*args, **{**kwargs, "weights_only": True})

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real  # type: ignore[assignment]


def import_robustbench():
    """``robustbench.utils`` and the zoo (``all_models``), imported once."""
    if "robustbench.utils" not in sys.modules:
        if importlib.util.find_spec("robustbench") is None:
            raise ConfigError(
                "robustbench: targets need the robustbench package: pip install 'regdefense[robustbench]'"
            )
        import warnings

        with _stand_ins(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources', torch.jit's and timm's deprecation notices
            importlib.import_module("robustbench.utils")
    utils = sys.modules["robustbench.utils"]
    return utils, utils.all_models


def parse(target: str, dataset: str | None = None) -> tuple[str, str, str]:
    """``robustbench:[DATASET/THREAT/]NAME`` → (name, dataset, threat); the zoo must list it."""
    spec = target.split(":", 1)[1] if target.startswith("robustbench:") else target
    parts = spec.split("/")
    if len(parts) == 3:
        ds, threat, name = parts
    elif len(parts) == 1:
        ds, threat, name = dataset if dataset in DATASETS else "cifar10", "Linf", parts[0]
    else:
        raise UserError(
            f"'{target}': write robustbench:NAME or robustbench:DATASET/THREAT/NAME "
            f"(e.g. robustbench:cifar10/Linf/Wang2023Better_WRN-28-10)"
        )
    if ds not in DATASETS or threat not in THREATS:
        raise UserError(
            f"'{target}': RobustBench's datasets are {', '.join(DATASETS)} and its threat models {', '.join(THREATS)}"
        )
    _, zoo = import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = zoo[BenchmarkDataset(ds)][ThreatModel(threat)]
    if name not in models:
        close = [m for m in models if name.lower()[:6] in m.lower()][:5]
        raise UserError(
            f"RobustBench has no {ds}/{threat} model '{name}'"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    return name, ds, threat


def model_dir() -> Path:
    if os.environ.get("ROBUSTBENCH_MODELS"):
        return Path(os.environ["ROBUSTBENCH_MODELS"])
    return Path(os.environ.get("REGDEFENSE_CACHE", Path.home() / ".cache" / "regdefense")) / "robustbench"


def weights_path(name: str, dataset: str, threat: str) -> Path:
    """Where robustbench's loader looks for (and downloads) the zoo model's checkpoint."""
    return model_dir() / dataset / threat / f"{name}.pt"


def load(target: str, dataset: str | None = None) -> nn.Module:
    """The zoo model with its weights, loaded by robustbench's ``load_model`` (eval mode, inputs in [0, 1])."""
    name, ds, threat = parse(target, dataset)
    utils, _ = import_robustbench()
    path = weights_path(name, ds, threat)
    try:
        with _weights_only():  # a zoo file is data: never unpickled beyond tensors
            return utils.load_model(name, model_dir=str(model_dir()), dataset=ds, threat_model=threat)
    except Exception as exc:  # robustbench's download (Google Drive, requests) or its loading failed
        where = (
            ""
            if path.exists()
            else (
                f"; offline, put the checkpoint at {path} (or set ROBUSTBENCH_MODELS to "
                f"the folder holding {ds}/{threat}/{name}.pt)"
            )
        )
        raise UserError(
            f"RobustBench could not load {ds}/{threat}/{name}: {type(exc).__name__}: {first_line(exc, 200)}{where}"
        ) from None


def architecture(target: str, *, num_classes: int, pretrained: bool = False, dataset: str | None = None) -> nn.Module:
    """The zoo entry's network for training: freshly initialised, or with ``pretrained`` its RobustBench weights."""
    name, ds, threat = parse(target, dataset)
    if pretrained:
        net = load(target, dataset)
    else:
        _, zoo = import_robustbench()
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        net = zoo[BenchmarkDataset(ds)][ThreatModel(threat)][name]["model"]()
    classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[ds]
    if num_classes != classes:
        raise ConfigError(f"{target} is a {ds} architecture with {classes} classes; this data has {num_classes}")
    return net
