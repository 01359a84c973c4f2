"""Attacks: the one adapter to torchattacks and ART, our fixes to library attacks, BPDA views, measuring.

``regdefense.attacks`` keeps the names it had as one module (``resolve_attack``, ``pgd``, ``step_size``, ...):
they come from :mod:`regdefense.attacks.adapter`.
"""

from __future__ import annotations

from regdefense._moved import forward

__getattr__ = forward(__name__, "regdefense.attacks.adapter")
