"""regdefense: adversarial-training defenses as composable plugins on one training loop.

Plugins import the hook marker from here::

    from regdefense import hookimpl, option

The Python API: :func:`train`, :func:`load_model` (the evaluated model of a run, checkpoint, export,
``hf:`` or ``robustbench:`` target), :class:`Trainer`, :class:`RunConfig`, :class:`Step`, :class:`Defense`,
:func:`activate`, :func:`catalogue`, :func:`create_model`, :func:`resolve_attack`.
"""

from __future__ import annotations

from regdefense._version import __version__
from regdefense.config import RunConfig, option  # light: stdlib only
from regdefense.errors import UserError
from regdefense.hookspecs import hookimpl  # light: pluggy only

_LAZY = {
    "Trainer": "regdefense.trainer",
    "Step": "regdefense.step",
    "train": "regdefense.run",
    "load_model": "regdefense.restore",
    "Defense": "regdefense.defense",
    "activate": "regdefense.plugins",
    "catalogue": "regdefense.plugins",
    "create_model": "regdefense.models",
    "resolve_attack": "regdefense.attacks",
    "pgd": "regdefense.attacks",
}

__all__ = ["__version__", "hookimpl", "option", "RunConfig", "UserError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regdefense' has no attribute {name!r}")
