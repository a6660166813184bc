"""MoCo v3 with ViT backbones (Chen, Xie and He, 2021, "An Empirical Study of Training
Self-Supervised Vision Transformers", arXiv:2104.02057), as facebookresearch/moco-v3
(``moco/builder.py`` ``MoCo_ViT``, ``vits.py``) builds it.

* ``base_encoder``: ViT (fixed 2-D sin-cos position embedding, MoCo v3's init, optional
  frozen patch projection ``stop_grad_conv1``) whose ``head`` is the 3-layer projection MLP
  (hidden 4096, out 256, BatchNorm; the last BN without affine).
* ``predictor``: 2-layer MLP (hidden 4096, out 256, last BN without affine).
* ``momentum_encoder``: :class:`vlfast.nn.MomentumEncoder` of ``base_encoder`` (fused
  :func:`vlfast.ops.ema_update_` or MoCo's per-parameter loop).
* ``criterion``: :class:`vlfast.nn.MoCoV3Loss` (fused :func:`vlfast.ops.contrastive_loss` or
  moco-v3's eager cross-entropy on the logits), ``2 T`` times InfoNCE at temperature ``T`` (0.2).

State dict keys are moco-v3's (``base_encoder.*``, ``momentum_encoder.*``, ``predictor.*``):
the ``module.`` level of the :class:`~vlfast.nn.MomentumEncoder` wrapper is dropped on save
and accepted with or without it on load.

==========================  =====  =====  =====  ====================  =======================
name                        width  depth  heads  trainable parameters  all (incl. momentum)
==========================  =====  =====  =====  ====================  =======================
``moco_v3_vit_small``       384    12     12     43,110,400            84,266,752
``moco_v3_vit_base``        768    12     12     108,740,608           215,678,464
``moco_v3_micro``           64     2      4      (32x32 images, patch 8, MLP 128 -> 32)
==========================  =====  =====  =====  ====================  =======================

MoCo v3's ViT-S has 12 heads (head dim 32), unlike timm's ``vit_small`` (6).
"""

import math
from typing import Dict, Optional

import torch
from torch import nn

from . import register_configs
from ..nn.contrastive import MoCoV3Loss
from ..nn.ema import MomentumEncoder
from .layers import flatten_momentum_keys
from .vit import ViT, synthetic_images

__all__ = ["MoCoV3", "VisionTransformerMoCo", "build_mlp"]


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear (no bias) -> BN -> ReLU per hidden layer; the last
    Linear is followed by a BatchNorm1d without affine parameters when ``last_bn``."""
    layers = []
    for i in range(num_layers):
        d1 = input_dim if i == 0 else mlp_dim
        d2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers.append(nn.BatchNorm1d(d2))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


def _2d_sincos_moco(grid_size, embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """moco-v3's ``build_2d_sincos_position_embedding`` (1, 1 + h*w, D), zero class-token row."""
    h, w = grid_size
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")  # moco-v3's (old default) indexing
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature ** omega)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, embed_dim), pos], dim=1)


class VisionTransformerMoCo(ViT):
    """moco-v3's ``VisionTransformerMoCo``: fixed (frozen) 2-D sin-cos position embedding,
    Q/K/V-separate uniform init of ``qkv``, xavier elsewhere, and ``stop_grad_conv1``."""

    def __init__(self, stop_grad_conv1: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.pos_embed.requires_grad_(False)
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(_2d_sincos_moco(self.patch_embed.grid_size, self.embed_dim))
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:
                    val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        p = self.patch_embed.patch_size
        val = math.sqrt(6.0 / float(3 * p[0] * p[1] + self.embed_dim))
        nn.init.uniform_(self.patch_embed.proj.weight, -val, val)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if stop_grad_conv1:
            self.patch_embed.proj.weight.requires_grad_(False)
            self.patch_embed.proj.bias.requires_grad_(False)


class MoCoV3(nn.Module):
    """MoCo v3 (``MoCo_ViT``).

    ``forward(x1, x2, m=None)`` -> ``{"loss"}``: ``q1 = predictor(base_encoder(x1))``,
    ``q2 = predictor(base_encoder(x2))``; then (moco-v3's order) the momentum encoder is
    updated with momentum ``m`` (``self.momentum`` when None; the update runs in training mode
    or whenever ``m`` is given, so evaluation passes leave it unchanged) and the keys
    ``k1, k2`` computed from it; ``loss = criterion(q1, k2) + criterion(q2, k1)``.
    Use :func:`vlfast.schedules.cosine_momentum` for the paper's momentum schedule.
    x1 and x2 must have one shape (``ValueError`` otherwise).
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, dim: int = 256,
                 mlp_dim: int = 4096, temperature: float = 0.2, momentum: float = 0.99,
                 stop_grad_conv1: bool = False):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, dim=dim, mlp_dim=mlp_dim,
                           temperature=temperature, momentum=momentum, stop_grad_conv1=stop_grad_conv1)
        self.momentum = float(momentum)
        self.T = float(temperature)
        self.base_encoder = VisionTransformerMoCo(
            stop_grad_conv1=stop_grad_conv1, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            num_classes=0, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        # projector replaces the classification head (MoCo_ViT._build_projector_and_predictor_mlps)
        self.base_encoder.head = build_mlp(3, embed_dim, mlp_dim, dim)
        self.momentum_encoder = MomentumEncoder(self.base_encoder, momentum)
        self.predictor = build_mlp(2, dim, mlp_dim, dim)
        self.criterion = MoCoV3Loss(temperature)
        flatten_momentum_keys(self, "momentum_encoder")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: Optional[float] = None) -> Dict[str, torch.Tensor]:
        for name, x in (("x1", x1), ("x2", x2)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must be two views of one batch with the same shape, got "
                             f"{tuple(x1.shape)} and {tuple(x2.shape)}")
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        if not getattr(self, "_momentum_hoisted", False):  # else done by a pre-forward hook
            self.momentum_update(x1, x2, m)
        k1 = self.momentum_encoder(x1)
        k2 = self.momentum_encoder(x2)
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        return {"loss": loss}

    def momentum_update(self, x1=None, x2=None, m: Optional[float] = None) -> None:
        """The forward's momentum update (in training mode, or when ``m`` is given), taking the
        forward's arguments (see :func:`vlfast.distributed.zero.hoist_momentum_updates`)."""
        if self.training or m is not None:
            self.momentum_encoder.update(self.base_encoder, self.momentum if m is None else m)

    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"x1", "x2"}`` (B, C, H, W): two views of smooth random images, x1 = image + noise,
        x2 = horizontally flipped image + noise."""
        pe = self.base_encoder.patch_embed
        img = synthetic_images(batch_size, pe.in_chans, pe.img_size, generator=generator, noise=0.0)
        src = img.device
        x1 = img + 0.1 * torch.randn(img.shape, device=src, generator=generator)
        x2 = img.flip(-1) + 0.1 * torch.randn(img.shape, device=src, generator=generator)
        dev = device if device is not None else src
        return {"x1": x1.to(dev), "x2": x2.to(dev)}




_CONFIGS = {
    "moco_v3_vit_small": dict(embed_dim=384, depth=12, num_heads=12),
    "moco_v3_vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "moco_v3_micro": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, dim=32, mlp_dim=128),
}


register_configs(_CONFIGS, MoCoV3, "MoCo v3")
