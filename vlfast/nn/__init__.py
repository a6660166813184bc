"""Drop-in modules of vlfast."""

from .ema import EMA, MomentumEncoder

__all__ = ["EMA", "MomentumEncoder"]
