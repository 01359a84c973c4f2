"""regdefense: adversarial-training defenses as composable plugins on one training loop.

Plugins import the hook marker from here::

    from regdefense import hookimpl, option

The Python API: :func:`train`, :func:`load_model` (the evaluated model of a run, checkpoint, export,
``hf:`` or ``robustbench:`` target), :class:`Trainer`, :class:`RunConfig`, :class:`Step`, :class:`Defense`,
:func:`activate`, :func:`catalogue`, :func:`create_model`, :func:`resolve_attack`.
"""

from __future__ import annotations

from regdefense import _moved
from regdefense._version import __version__
from regdefense.base.config import RunConfig  # light: stdlib only
from regdefense.base.errors import UserError
from regdefense.base.fields import option
from regdefense.host.hookspecs import hookimpl  # light: pluggy only

_moved.install()  # old module names (before the subpackages) import with a DeprecationWarning

_LAZY = {
    "Trainer": "regdefense.training.loop",
    "Step": "regdefense.host.step",
    "train": "regdefense.training.run",
    "load_model": "regdefense.training.restore",
    "Defense": "regdefense.host.defense",
    "activate": "regdefense.host.discovery",
    "catalogue": "regdefense.host.discovery",
    "create_model": "regdefense.models",
    "resolve_attack": "regdefense.attacks.adapter",
    "pgd": "regdefense.attacks.adapter",
}

__all__ = ["__version__", "hookimpl", "option", "RunConfig", "UserError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regdefense' has no attribute {name!r}")
