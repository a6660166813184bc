"""Drop-in modules of vlfast."""

from .ema import EMA, MomentumEncoder
from .masking import RandomMasking

__all__ = ["EMA", "MomentumEncoder", "RandomMasking"]
