"""Vision Transformer classifiers (Dosovitskiy et al., 2021, arXiv:2010.11929) with timm's names.

:class:`ViT` is :class:`vlfast.models.layers.VisionTransformer` (a subclass, so the
state dict keys are timm's: ``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
``blocks.0.attn.qkv.weight``, ..., ``norm.weight``, ``head.weight``) with
``forward(images, labels=None) -> logits`` and ``synthetic_batch``.

Registered models (timm's configs; parameter counts with a 1000-class head):

==========================  =====  =====  =====  =====  ============
name                        patch  width  depth  heads  parameters
==========================  =====  =====  =====  =====  ============
``vit_small_patch16_224``   16     384    12     6      22,050,664
``vit_base_patch16_224``    16     768    12     12     86,567,656
``vit_large_patch16_224``   16     1024   24     16     304,326,632
``vit_huge_patch14_224``    14     1280   32     16     632,045,800
``vit_micro``               8      64     2      4      (32x32 images, 10 classes)
==========================  =====  =====  =====  =====  ============
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import register_configs
from .layers import VisionTransformer

__all__ = ["ViT", "synthetic_images"]


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _rand_source(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def synthetic_class_batch(batch_size: int, in_chans: int, img_size, num_classes: int, *, device=None,
                          generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """``{"images": (B, C, H, W) float32, "labels": (B,) int64}`` for a classifier: smooth random
    images plus a fixed low-frequency pattern per class (fixed across calls), so labels are
    learnable.  Without classes (``num_classes == 0``) labels are zeros."""
    src = _rand_source(generator)
    n_cls = max(num_classes, 1)
    labels = torch.randint(0, n_cls, (batch_size,), device=src, generator=generator)
    images = synthetic_images(batch_size, in_chans, img_size, generator=generator)
    size = tuple(images.shape[2:])
    # one fixed 4x4 pattern per class, drawn from its own seed (cheap even with 1000 classes)
    protos = torch.randn(n_cls, in_chans, 4, 4, generator=torch.Generator().manual_seed(1234))
    images = images + F.interpolate(protos[labels.cpu()], size=size, mode="bilinear",
                                    align_corners=False).to(images.device)
    dev = device if device is not None else src
    return {"images": images.to(dev), "labels": labels.to(dev)}


def synthetic_images(batch_size: int, in_chans: int, img_size, *, device=None,
                     generator: Optional[torch.Generator] = None, grid: int = 4,
                     noise: float = 0.1) -> torch.Tensor:
    """Smooth random images (B, C, H, W): bilinear upsampling of a ``grid x grid`` normal field
    plus ``noise`` times white noise, so that masked patches are predictable from their
    neighbours and views of one image resemble each other (a learnable synthetic stream).
    Drawn on ``generator``'s device (CPU without one) and moved to ``device``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    H, W = _pair(img_size)
    src = _rand_source(generator)
    low = torch.randn(batch_size, in_chans, grid, grid, device=src, generator=generator)
    x = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    x = x + noise * torch.randn(batch_size, in_chans, H, W, device=src, generator=generator)
    return x.to(device) if device is not None else x


class ViT(VisionTransformer):
    """timm-compatible ViT classifier (same parameter names and shapes as timm's
    ``VisionTransformer`` with class-token pooling).

    ``forward(images, labels=None)``: images (B, in_chans, img_size, img_size) ->
    logits (B, num_classes) (``labels`` is accepted so that ``model(**batch)`` works and is
    not used; training computes the cross-entropy on the logits).  Wrong image shapes raise
    ``ValueError``.  Attention runs the fused op or plain PyTorch math according to the
    ``fused`` flag of every block's :class:`vlfast.nn.Attention` (see
    :func:`vlfast.models.set_fused`).
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"images": (B, C, H, W) float32, "labels": (B,) int64}``: see :func:`synthetic_class_batch`."""
        return synthetic_class_batch(batch_size, self.patch_embed.in_chans, self.patch_embed.img_size,
                                     self.num_classes, device=device, generator=generator)


_CONFIGS = {
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_micro": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10),
}


register_configs(_CONFIGS, ViT, "ViT")
