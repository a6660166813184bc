"""Drop-in modules of vlfast."""

from .attention import Attention, CrossAttention, MultiheadAttention
from .contrastive import ClipLoss, ITCLoss, MoCoQueueLoss, MoCoV3Loss, NTXentLoss, SigLipLoss
from .ema import EMA, MomentumEncoder
from .masking import RandomMasking, UnshuffleTokens

__all__ = ["EMA", "MomentumEncoder", "RandomMasking", "UnshuffleTokens", "Attention", "CrossAttention",
           "MultiheadAttention", "ClipLoss", "SigLipLoss", "MoCoQueueLoss", "MoCoV3Loss", "ITCLoss",
           "NTXentLoss"]
