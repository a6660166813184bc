"""Eager PyTorch formulas of every vlfast op: the readable definition and the test oracle."""

from .attention import attention_keep_mask, attention_reference
from .contrastive import (albef_itc_reference, clip_loss_reference, contrastive_loss_reference,
                          moco_loss_reference, moco_v3_loss_reference, ntxent_loss_reference,
                          siglip_loss_reference)
from .ema import ema_update_reference_, model_ema_update_, moco_momentum_update_
from .masking import random_masking_reference, unshuffle_tokens_reference

__all__ = ["albef_itc_reference", "clip_loss_reference", "contrastive_loss_reference", "moco_loss_reference",
           "moco_v3_loss_reference", "ntxent_loss_reference", "siglip_loss_reference", "attention_reference",
           "attention_keep_mask",
           "ema_update_reference_", "model_ema_update_", "moco_momentum_update_", "random_masking_reference",
           "unshuffle_tokens_reference"]
