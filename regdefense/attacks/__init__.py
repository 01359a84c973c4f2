"""Attacks: the one adapter to torchattacks and ART, our fixes to library attacks, BPDA views, measuring.

``regdefense.attacks`` keeps the names it had as one module (``resolve_attack``, ``pgd``, ``step_size``, ...):
they come from :mod:`regdefense.attacks.adapter`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # dunders (copy, pickle) and this package's own modules are not forwarded
    module = importlib.import_module("regdefense.attacks.adapter")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'regdefense.attacks' has no attribute {name!r}") from None
