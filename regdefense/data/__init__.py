"""Data: the dataset registry, the embedded default and torchvision sets, streamed folders, augmentation.

``regdefense.data`` keeps the names it had as one module (``load_dataset``, ``Split``, ...): they come from
:mod:`regdefense.data.sources`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # dunders (copy, pickle) and this package's own modules are not forwarded
    module = importlib.import_module("regdefense.data.sources")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'regdefense.data' has no attribute {name!r}") from None
