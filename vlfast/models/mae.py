"""Masked Autoencoders (He et al., 2021, "Masked Autoencoders Are Scalable Vision Learners",
arXiv:2111.06377), with the parameter names of the reference code (facebookresearch/mae,
``models_mae.py``): ``patch_embed.proj``, ``cls_token``, ``pos_embed`` (fixed 2-D sin-cos,
frozen), ``blocks.*``, ``norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``
(fixed, frozen), ``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``.

The encoder's masking is :class:`vlfast.nn.RandomMasking` with the positional add fused
into it; the decoder's unshuffle is :class:`vlfast.nn.UnshuffleTokens` (fused
:func:`vlfast.ops.unshuffle_tokens` or MAE's cat + gather).  With ``fused=False`` (see
:func:`vlfast.models.set_fused`) the model computes what ``models_mae.py`` computes (the formulas
of :mod:`vlfast.reference.masking`), with the same noise draw.

==========================  =====================  =====================  ============
name                        encoder (w/depth/h)    decoder (w/depth/h)    parameters
==========================  =====================  =====================  ============
``mae_vit_base_patch16``    768 / 12 / 12, p16     512 / 8 / 16           111,907,840
``mae_vit_large_patch16``   1024 / 24 / 16, p16    512 / 8 / 16           329,541,888
``mae_vit_huge_patch14``    1280 / 32 / 16, p14    512 / 8 / 16           657,074,508
``mae_micro``               64 / 2 / 4, p8, 32px   32 / 2 / 4
==========================  =====================  =====================  ============

(parameter counts include the two frozen position embeddings, as MAE's printout does.)
"""

from typing import Dict, Optional

import torch
from torch import nn

from .. import _validation as check
from ..nn.masking import RandomMasking, UnshuffleTokens
from . import register_configs
from .layers import Block, PatchEmbed
from .vit import synthetic_images

__all__ = ["MaskedAutoencoderViT", "get_2d_sincos_pos_embed"]


def _1d_sincos(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` (float64, as its numpy code): (gh * gw [+ 1], D).

    As in MAE, the first half of the channels is built from ``grid[0]`` of
    ``meshgrid(grid_w, grid_h)`` (the column index), the second half from the row index;
    ``cls_token`` prepends a zero row."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    grid_h = torch.arange(gh, dtype=torch.float64)
    grid_w = torch.arange(gw, dtype=torch.float64)
    # numpy meshgrid(grid_w, grid_h) (xy indexing): both (gh, gw); grid[0] = w index, grid[1] = h index
    g0, g1 = torch.meshgrid(grid_w, grid_h, indexing="xy")
    emb = torch.cat([_1d_sincos(embed_dim // 2, g0), _1d_sincos(embed_dim // 2, g1)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and a light ViT decoder (``models_mae.MaskedAutoencoderViT``).

    ``forward(images, mask_ratio=None)`` -> ``{"loss", "pred", "mask"}``: loss () the mean
    squared error on removed patches (per-patch normalized targets when ``norm_pix_loss``),
    pred (B, N, patch**2 * in_chans), mask (B, N) (1 = removed).  ``mask_ratio=None`` uses
    the configured ratio (0.75).  Wrong image shapes raise ``ValueError``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 mask_ratio: float = 0.75):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                           decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                           norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)
        norm_layer = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.masking = RandomMasking(mask_ratio)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.unshuffle = UnshuffleTokens()
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    # ------------------------------------------------------------------ init (as models_mae.py)
    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, True)[None])
                self.decoder_pos_embed.copy_(
                    get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, True)[None])
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ patchify
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), MAE's channel-last patch order."""
        p = self.patch_embed.patch_size[0]
        h, w = self.patch_embed.grid_size
        c = imgs.shape[1]
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        p = self.patch_embed.patch_size[0]
        h, w = self.patch_embed.grid_size
        c = self.patch_embed.in_chans
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None):
        x = self.patch_embed(imgs)
        masking = self.masking
        old = masking.mask_ratio
        if mask_ratio is not None:
            masking.mask_ratio = check.mask_ratio(mask_ratio)
        try:
            # MAE: x = x + pos_embed[:, 1:]; random_masking(x) -- the add is fused into the masking
            x, mask, ids_restore = masking(x, self.pos_embed[:, 1:, :])
        finally:
            masking.mask_ratio = old
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        x_ = self.unshuffle(x[:, 1:, :], ids_restore, self.mask_token)
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: Optional[float] = None) -> Dict[str, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask)
        return {"loss": loss, "pred": pred, "mask": mask}

    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"images": (B, C, H, W) float32}``: smooth random images (see
        :func:`vlfast.models.vit.synthetic_images`)."""
        pe = self.patch_embed
        return {"images": synthetic_images(batch_size, pe.in_chans, pe.img_size, device=device,
                                           generator=generator)}


_DEC = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_CONFIGS = {
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEC),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEC),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DEC),
    "mae_micro": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                      decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
}


register_configs(_CONFIGS, MaskedAutoencoderViT, "MAE")
