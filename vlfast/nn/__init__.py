"""Drop-in modules of vlfast."""

from .attention import Attention, CrossAttention, MultiheadAttention
from .contrastive import ClipLoss, ITCLoss, MoCoQueueLoss, SigLipLoss
from .ema import EMA, MomentumEncoder
from .masking import RandomMasking

__all__ = ["EMA", "MomentumEncoder", "RandomMasking", "Attention", "CrossAttention", "MultiheadAttention",
           "ClipLoss", "SigLipLoss", "MoCoQueueLoss", "ITCLoss"]
