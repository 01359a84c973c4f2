"""AToP (seed 003, Lin et al., ICLR 2024): adversarial training on purification."""

from regdefense_atop.atop import AToP

__all__ = ["AToP"]
