"""Where regdefense keeps what it can rebuild (clean surrogates, pseudo-labels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$REGDEFENSE_CACHE``, else ``$XDG_CACHE_HOME/regdefense`` or ``~/.cache/regdefense``."""
    if os.environ.get("REGDEFENSE_CACHE"):
        return Path(os.environ["REGDEFENSE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "regdefense"
