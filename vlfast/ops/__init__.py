"""Public functional ops of vlfast.

Every op takes ``backend=None | "auto" | "triton" | "native" | "torch"``; see
:mod:`vlfast._backend` for the selection rules.
"""

from .attention import attention
from .contrastive import contrastive_loss, siglip_rows
from .contrastive_losses import clip_loss, siglip_loss
from .ema import ema_update_
from .mask_generators import block_masking, tube_masking
from .masking import random_masking, unshuffle_tokens

__all__ = ["attention", "contrastive_loss", "siglip_rows", "clip_loss", "siglip_loss", "ema_update_", "random_masking",
           "unshuffle_tokens", "block_masking", "tube_masking"]
