"""Data: the dataset registry, the embedded default and torchvision sets, streamed folders, augmentation.

``regdefense.data`` keeps the names it had as one module (``load_dataset``, ``Split``, ...): they come from
:mod:`regdefense.data.sources`.
"""

from __future__ import annotations

from regdefense._moved import forward

__getattr__ = forward(__name__, "regdefense.data.sources")
