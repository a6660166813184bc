"""Eager PyTorch formulas of every vlfast op: the readable definition and the test oracle."""

from .ema import ema_update_reference_, moco_momentum_update_

__all__ = ["ema_update_reference_", "moco_momentum_update_"]
