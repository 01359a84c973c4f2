"""The plugin host: the hooks, the typed host interface, the data contract, the ``Defense`` base, discovery.

Plugin authors import from here (``regdefense.host.defense.Defense``, ``regdefense.host.hookspecs``) or from the
package face (``from regdefense import Defense, hookimpl, option``). ``regdefense.host`` keeps the names it had as one
module (``Host``, ``TrainingHost``): they come from :mod:`regdefense.host.interface`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # dunders (copy, pickle) and this package's own modules are not forwarded
    module = importlib.import_module("regdefense.host.interface")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'regdefense.host' has no attribute {name!r}") from None
