"""Drop-in modules of vlfast."""

from .attention import Attention, CrossAttention, MultiheadAttention
from .contrastive import ClipLoss, ContrastiveLoss, ITCLoss, MoCoQueueLoss, SigLipLoss
from .ema import EMA, MomentumEncoder
from .masking import RandomMasking, UnshuffleTokens

__all__ = ["EMA", "MomentumEncoder", "RandomMasking", "UnshuffleTokens", "Attention", "CrossAttention", "MultiheadAttention",
           "ContrastiveLoss", "ClipLoss", "SigLipLoss", "MoCoQueueLoss", "ITCLoss"]
