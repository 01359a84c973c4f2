"""DYNAT (seed 002, Liu et al. 2024): dynamic-label adversarial training with a guide network."""

from regdefense_dynat.dynat import DYNAT

__all__ = ["DYNAT"]
