"""The regularised adversarial-training defenses of seed 001 (Pham, Ho & Doan 2025): ATWR, ATGR, EATR."""

from regdefense_regularized.atgr import ATGR
from regdefense_regularized.atwr import ATWR
from regdefense_regularized.eatr import EATR

__all__ = ["ATGR", "ATWR", "EATR"]
