"""Baseline adversarial-training defenses shipped with regdefense (one module per defense)."""

from regdefense_baselines.pgd_at import PGDAT

__all__ = ["PGDAT"]
