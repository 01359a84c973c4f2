"""Baseline adversarial-training defenses shipped with regdefense (one module per defense)."""

from regdefense_baselines.awp import AWP
from regdefense_baselines.ema import EMA
from regdefense_baselines.fast_at import FastAT
from regdefense_baselines.fgsm_pgk import FGSMPGK
from regdefense_baselines.gairat import GAIRAT
from regdefense_baselines.lbgat import LBGAT
from regdefense_baselines.mail import MAIL
from regdefense_baselines.mart import MART
from regdefense_baselines.pgd_at import PGDAT
from regdefense_baselines.trades import TRADES

__all__ = ["AWP", "EMA", "FGSMPGK", "FastAT", "GAIRAT", "LBGAT", "MAIL", "MART", "PGDAT", "TRADES"]
