"""Building blocks shared by the reference models, with timm's parameter names.

``PatchEmbed``, ``Mlp``, ``Block`` and ``VisionTransformer`` reproduce timm's
``vision_transformer`` modules (Dosovitskiy et al., 2021) closely enough that
timm state dicts load with ``load_state_dict`` (same names and shapes; ViT-B/16
with a 1000-class head has 86,567,656 parameters).  Attention is
:class:`vlfast.nn.Attention`, whose ``fused`` flag (set by
:func:`vlfast.models.set_fused`) selects the fused op or plain PyTorch math.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import Attention


def _pair(x) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def resample_abs_pos_embed(posemb: torch.Tensor, new_size: Sequence[int], old_size: Optional[Sequence[int]] = None,
                           num_prefix_tokens: int = 1, interpolation: str = "bicubic",
                           antialias: bool = True) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed`` (timm 1.0.31, ``timm/layers/pos_embed.py``): the position
    embedding ``posemb`` (1, num_prefix_tokens + h*w, D) of an ``old_size`` = (h, w) patch grid
    (square when None) resampled to ``new_size`` (H', W') by ``F.interpolate`` (bicubic, antialiased
    when shrinking) in float32; the prefix (class token) rows are kept.  Returned unchanged when
    the grid is the same.  Differentiable (the position embedding learns through it)."""
    num_new = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new == posemb.shape[1]:
        if old_size is not None and tuple(old_size) == tuple(new_size):
            return posemb
        if old_size is None and new_size[0] == new_size[1]:
            return posemb
    if old_size is None:
        hw = int(math.sqrt(posemb.shape[1] - num_prefix_tokens))
        old_size = (hw, hw)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim, dtype = grid.shape[-1], grid.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


class PatchEmbed(nn.Module):
    """Image to patch tokens: ``proj`` = Conv2d(in_chans, embed_dim, patch, stride=patch).

    ``forward(x)``: x (B, C, H, W) with C = ``in_chans`` and (H, W) = ``img_size`` ->
    (B, num_patches, embed_dim).  Other shapes raise ``ValueError``; with
    ``strict_img_size=False`` (timm's name) any H, W divisible by the patch size is taken.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, strict_img_size=True):
        super().__init__()
        self.strict_img_size = strict_img_size
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if any(i % p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"images must have {self.in_chans} channels, got {x.shape[1]}")
        if self.strict_img_size and tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"images must be {self.img_size[0]}x{self.img_size[1]}, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} must be divisible by the patch size "
                             f"{self.patch_size[0]}x{self.patch_size[1]}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """timm's Mlp: ``fc1`` -> GELU -> dropout -> ``fc2`` -> dropout."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (timm names): ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, norm_layer=None, act_layer=nn.GELU):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """timm's ViT init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """timm-compatible ViT (class token, learned position embedding, token pooling).

    Parameters: ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + N, D), ``patch_embed.proj``,
    ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``,
    ``head`` (Identity when ``num_classes == 0``).

    ``forward_features(images)`` -> (B, 1 + N, D) normalized tokens; ``forward(images)``
    -> (B, num_classes) logits of the class token.  With ``dynamic_img_size=True`` (timm's
    name and meaning) images of any size divisible by the patch size are taken and the
    position embedding is resampled to their patch grid by :func:`resample_abs_pos_embed`
    (DINO's multi-crop: 96x96 local crops through a 224 model).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, dynamic_img_size: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        pos = self.pos_embed
        if self.dynamic_img_size:
            grid = tuple(s // p for s, p in zip(images.shape[2:], self.patch_embed.patch_size))
            pos = resample_abs_pos_embed(pos, grid, self.patch_embed.grid_size, num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def flatten_momentum_keys(model: nn.Module, attr: str) -> None:
    """Save ``model``'s :class:`~vlfast.nn.MomentumEncoder` ``attr`` under the reference repo's keys
    ``{attr}.*`` (without the wrapper's ``module.`` level, in the same order), and load both those and
    the wrapped ``{attr}.module.*`` keys (moco-v3's ``momentum_encoder.*``, DINO's ``teacher.*``)."""
    wrapped, plain = f"{attr}.module.", f"{attr}."

    def save_hook(module, state_dict, prefix, local_metadata):
        items = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
        for k, v in items:
            if k.startswith(prefix + wrapped):
                k = prefix + plain + k[len(prefix + wrapped):]
            state_dict[k] = v

    def load_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for k in [k for k in state_dict if k.startswith(prefix + plain) and not k.startswith(prefix + wrapped)]:
            state_dict[prefix + wrapped + k[len(prefix + plain):]] = state_dict.pop(k)

    model._register_state_dict_hook(save_hook)
    model._register_load_state_dict_pre_hook(load_hook)
