"""Public functional ops of vlfast.

Every op takes ``backend=None | "auto" | "triton" | "native" | "torch"``; see
:mod:`vlfast._backend` for the selection rules.
"""

from .ema import ema_update_

__all__ = ["ema_update_"]
