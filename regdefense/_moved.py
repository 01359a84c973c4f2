"""Old module names (from before the layer subpackages) still import, with a DeprecationWarning naming the new one.

``import regdefense.defense`` gives :mod:`regdefense.host.defense` itself (the same module object), so ``isinstance``,
subclassing and monkeypatching work across both names. docs/changelog.md lists
every move; the old names go in a later release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any, Callable

MOVED: dict[str, str] = {
    "errors": "base.errors",
    "config": "base.config",
    "registry": "base.registry",
    "files": "base.files",
    "paths": "base.paths",
    "checkpoint": "base.checkpoint",
    "buffers": "base.buffers",
    "runtime": "base.runtime",
    "safety": "base.safety",
    "distributed": "base.distributed",
    "augment": "data.augment",
    "stream": "data.stream",
    "datasets": "data.registry",
    "weights": "models.weights",
    "attack_fixes": "attacks.fixes",
    "masking": "attacks.bpda",
    "measure": "attacks.measure",
    "losses": "host.losses",
    "step": "host.step",
    "hookspecs": "host.hookspecs",
    "contract": "host.contract",
    "core": "host.core",
    "defense": "host.defense",
    "plugins": "host.discovery",
    "tracking": "host.tracking",
    "template": "host.template",
    "schedule": "training.schedule",
    "parts": "training.assembly",
    "restore": "training.restore",
    "trainer": "training.loop",
    "services": "training.services",
    "extra": "training.extra",
    "run": "training.run",
    "evaluate": "evaluation.runner",
    "escalate": "evaluation.escalate",
    "report": "evaluation.report",
    "surrogate": "evaluation.surrogate",
    "checks": "evaluation.checks",
    "targets": "evaluation.targets",
    "suites": "evaluation.suites",
    "results": "evaluation.results",
    "shards": "evaluation.shards",
    "ledger": "evaluation.ledger",
    "resume": "evaluation.resume",
    "metrics": "evaluation.metrics",
    "smoothing": "evaluation.smoothing",
    "bounds": "evaluation.bounds",
    "export": "interop.export",
    "hub": "interop.hub",
    "art": "interop.art",
    "trackers": "interop.trackers",
    "sweep": "sweeps.sweep",
    "cluster": "sweeps.cluster",
    "compare": "sweeps.compare",
}
"""Old module name (under ``regdefense.``) → its new name. ``regdefense.data``, ``regdefense.attacks`` and
``regdefense.host`` are not here: they are packages now whose faces keep the old modules' names
(``regdefense.data.Split``, ``regdefense.host.Host`` still work)."""


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("regdefense.")
        if fullname.startswith("regdefense.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        new = "regdefense." + MOVED[module.__name__.removeprefix("regdefense.")]
        warnings.warn(
            f"{module.__name__} is now {new}: import it from there (the old name still works, with this warning, "
            "until a later release; docs/changelog.md lists every move)",
            DeprecationWarning,
            stacklevel=2,
        )
        # the old name becomes the new module itself (the import system hands out what sys.modules holds after
        # exec_module), so a setattr or a monkeypatch through the old name reaches the module the code uses
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (the package face calls it)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def forward(package: str, module: str) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``package``'s face that hands out ``module``'s names (the names ``package`` had when it
    was that one module), imported on first use; dunders and the package's own modules are not forwarded."""

    def __getattr__(name: str) -> Any:
        if name == "__all__":  # ``from package import *`` gives what the module's star import gave
            return [n for n in vars(importlib.import_module(module)) if not n.startswith("_")]
        if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
            raise AttributeError(name)
        try:
            return getattr(importlib.import_module(module), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
