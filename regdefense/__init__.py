"""regdefense: adversarial-training defenses as composable plugins on one training loop.

Plugins import the hook marker from here::

    from regdefense import hookimpl, option

The Python API: :func:`train`, :class:`Trainer`, :class:`RunConfig`, :class:`Step`,
:func:`activate`, :func:`catalogue`, :func:`create_model`, :func:`resolve_attack`.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: marker for hook implementations in defense classes
hookimpl = pluggy.HookimplMarker("regdefense")

from regdefense.config import RunConfig, option  # noqa: E402  (light: stdlib only)
from regdefense.errors import UserError  # noqa: E402

_LAZY = {
    "Trainer": "regdefense.trainer", "Step": "regdefense.step", "train": "regdefense.run",
    "load_run": "regdefense.run", "activate": "regdefense.plugins", "catalogue": "regdefense.plugins",
    "create_model": "regdefense.models", "resolve_attack": "regdefense.attacks", "pgd": "regdefense.attacks",
}

__all__ = ["__version__", "hookimpl", "option", "RunConfig", "UserError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regdefense' has no attribute {name!r}")
