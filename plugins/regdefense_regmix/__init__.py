"""RegMix (seed 000, Liu & Ojha 2025): adversarial mutual and generalization regularization.

Only the abstract of the paper could be read; the reconstruction, with every uncertain choice as a config
field, follows ``shared/research/methods-seeds.md`` §3.3.
"""

from regdefense_regmix.regmix import RegMix

__all__ = ["RegMix"]
