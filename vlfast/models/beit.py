"""BEiT (Bao et al., 2021, "BEiT: BERT Pre-Training of Image Transformers", arXiv:2106.08254).

Two models share one encoder (patch embedding, class token, optional absolute position
embedding, relative position bias shared by all layers or one table per layer, pre-norm
blocks with layer scale):

* :class:`Beit`: the classifier with timm's names, config and math (``timm/models/beit.py``,
  timm 1.0.31: ``Beit``, ``Attention``, ``Block``, ``RelativePositionBias``): timm's state dict
  loads strictly and gives timm's logits.
* :class:`BeitForMaskedImageModeling`: masked image modelling pre-training with the names of
  the paper's code (microsoft/unilm, ``beit/modeling_pretrain.py``,
  ``VisionTransformerForMaskedImageModeling``): ``mask_token`` replaces the masked patch
  embeddings, ``lm_head`` predicts the visual token of each masked patch, and the loss is
  the cross-entropy on the masked positions only (``engine_for_pretraining.py``).

Attention is :class:`BeitAttention`: timm's layout (``qkv`` without bias, separate ``q_bias``
and ``v_bias`` parameters, a zero non-persistent ``k_bias`` buffer, which
:class:`vlfast.nn.Attention`'s single ``qkv.bias`` cannot express) on
:func:`vlfast.ops.attention` when ``fused`` and on the eager formula
:func:`vlfast.reference.attention_reference` otherwise.  The relative position bias
``(1, H, N, N)`` (per layer) plus the shared ``(H, N, N)`` one is the op's ``attn_bias``, and
its gradient reaches ``relative_position_bias_table`` on both paths.

**Visual tokens.**  BEiT's targets are the 8192-way codes of a DALL-E dVAE tokenizer run on a
second, smaller view of the image.  No tokenizer is downloaded here: the batch carries them
as ``visual_tokens`` ``(B, num_patches)`` int64 in ``[0, vocab_size)`` (tokenize offline, e.g.
with unilm's ``utils.create_d_vae``).  :meth:`BeitForMaskedImageModeling.synthetic_batch`
derives them from the patch content (:func:`synthetic_visual_tokens`, a fixed random
hyperplane hash), so masked tokens are predictable from their smooth neighbourhood and the
loss falls.  Real image data (``csv:`` / ``wds:``) has no visual tokens; forward then raises
``ValueError`` saying so.

**Masks.**  ``bool_masked_pos`` ``(B, num_patches)`` bool (True = masked, unilm's name and
convention), blockwise from :func:`vlfast.ops.block_masking`: BEiT masks 40% of the 14 x 14
patches with blocks of at least 16 patches (unilm's run script: 75 of 196 patches, aspect
0.3 to 1/0.3).  The micro model scales the minimum block to its grid.

Registered models (parameter counts at 224 x 224):

===============================  =====================================================  ============
name                             config                                                 parameters
===============================  =====================================================  ============
``beit_base_patch16_224``        timm's: 768 / 12 / 12, p16, per-layer rel-pos bias,     86,530,984
                                 layer scale 0.1, no abs. pos., avg pool + fc_norm,
                                 1000 classes
``beit_base_patch16_224_pt``     unilm's ``beit_base_patch16_224_8k_vocab`` as run by    91,965,776
                                 ``run_beit_pretraining.py``: shared rel-pos bias,
                                 layer scale 0.1, no abs. pos., vocab 8192, 40% masked
``beit_micro``                   pre-training, 64 / 2 / 4, p4, 32 x 32 images (8 x 8
                                 patches), shared rel-pos bias, vocab 512, 40% masked,
                                 min block 5 patches
===============================  =====================================================  ============

unilm checkpoints store ``relative_position_index`` buffers, which timm (and this module)
keep non-persistent: :func:`convert_unilm_state_dict` drops them.
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as check
from ..ops.attention import attention
from ..ops.mask_generators import block_masking
from ..reference.attention import attention_reference
from . import register_configs
from .layers import Mlp, PatchEmbed
from .vit import _rand_source, synthetic_class_batch, synthetic_images

__all__ = ["Beit", "BeitForMaskedImageModeling", "BeitAttention", "BeitBlock", "RelativePositionBias",
           "gen_relative_position_index", "synthetic_visual_tokens", "convert_unilm_state_dict"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _pair(x) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # timm's LayerNorm default / unilm's partial(nn.LayerNorm, eps=1e-6)


def gen_relative_position_index(window_size: Tuple[int, int]) -> torch.Tensor:
    """timm's / unilm's index (N + 1, N + 1) int64 into the relative position bias table, N = Wh * Ww.

    Patch pair (i, j) gets ``(dy + Wh - 1) * (2 Ww - 1) + (dx + Ww - 1)`` with (dy, dx) the
    offset of i from j; the three last rows of the table are class-to-patch, patch-to-class
    and class-to-class.  The table has ``(2 Wh - 1)(2 Ww - 1) + 3`` rows."""
    wh, ww = window_size
    num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    rel = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
    n = wh * ww
    index = torch.zeros(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = rel
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index


class RelativePositionBias(nn.Module):
    """The relative position bias shared by all layers (unilm's ``use_shared_rel_pos_bias``,
    timm's ``Beit.rel_pos_bias``): ``relative_position_bias_table`` ((2 Wh - 1)(2 Ww - 1) + 3, H),
    zero-initialised, gathered by the non-persistent ``relative_position_index`` buffer.

    ``forward()`` -> (H, N + 1, N + 1): ``table[index].permute(2, 0, 1)``."""

    def __init__(self, window_size, num_heads: int):
        super().__init__()
        self.window_size = _pair(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        num_relative_distance = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance, num_heads))
        self.register_buffer("relative_position_index", torch.empty(self.window_area + 1, self.window_area + 1,
                                                                    dtype=torch.long), persistent=False)
        self._init_buffers()

    def _init_buffers(self) -> None:
        if self.relative_position_index.device.type != "meta":
            self.relative_position_index.copy_(gen_relative_position_index(self.window_size))

    def forward(self) -> torch.Tensor:
        n = self.window_area + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class BeitAttention(nn.Module):
    r"""BEiT self-attention with timm's names (``timm.models.beit.Attention``).

    Parameters: ``qkv.weight`` (3 A, C) without bias; ``q_bias`` / ``v_bias`` (A,) when
    ``qkv_bias`` (the key bias is the zero non-persistent buffer ``k_bias``);
    ``relative_position_bias_table`` ((2 Wh - 1)(2 Ww - 1) + 3, H) and the non-persistent
    ``relative_position_index`` (N, N) when ``window_size`` is given (per-layer bias); ``proj``.
    A = H * head_dim.

    ``forward(x, shared_rel_pos_bias=None)``: x (B, N, C) float -> (B, N, C)::

        qkv = x @ qkv.weight^T + cat(q_bias, 0, v_bias)
        bias = table[index] (1, H, N, N)  [+ shared_rel_pos_bias (H, N, N)]
        out = softmax(scale * q k^T + bias) [dropout] v       # vlfast.ops.attention(attn_bias=bias)
        out = proj_drop(proj(out))

    ``fused`` (toggled by :func:`vlfast.models.set_fused`): True runs :func:`vlfast.ops.attention`
    (``backend`` chooses its backend), False the eager formula
    :func:`vlfast.reference.attention_reference` (timm's ``fused_attn=False`` math).  The bias
    gets its gradient on both paths.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, window_size=None, attn_head_dim: Optional[int] = None, *,
                 backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        dim = check.positive_int("dim", dim)
        self.num_heads = check.positive_int("num_heads", num_heads)
        head_dim = dim // num_heads if attn_head_dim is None else check.positive_int("attn_head_dim", attn_head_dim)
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        all_head_dim = head_dim * num_heads
        self.dim = dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.backend = backend
        #: False runs the eager formula of vlfast.reference (the baseline); see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if check.flag("qkv_bias", qkv_bias):
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.register_buffer("k_bias", torch.zeros(all_head_dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if window_size:
            self.window_size = _pair(window_size)
            self.num_relative_distance = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) + 3
            n = self.window_size[0] * self.window_size[1] + 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
            self.register_buffer("relative_position_index", torch.empty(n, n, dtype=torch.long), persistent=False)
            if self.relative_position_index.device.type != "meta":
                self.relative_position_index.copy_(gen_relative_position_index(self.window_size))
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _get_rel_pos_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)  # 1, H, N, N

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        check.tensor("x", x, ndim=3, dtypes=check.FLOATING, shape_doc=f"(B, N, {self.dim})")
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.relative_position_bias_table is not None:
            if N != self.relative_position_index.shape[0]:
                raise ValueError(f"x has {N} tokens but the relative position bias covers "
                                 f"{self.relative_position_index.shape[0]} (window {self.window_size} + class token)")
            bias = self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.fused:
            out = attention(q, k, v, attn_bias=bias, dropout_p=dropout_p, scale=self.scale, backend=self.backend)
        else:
            out = attention_reference(q, k, v, None, bias, False, self.scale, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"backend={self.backend!r}, fused={self.fused}")


class DropPath(nn.Module):
    """Stochastic depth (per sample), as timm's ``DropPath``: identity in eval or with ``drop_prob == 0``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = check.unit_interval("drop_path", drop_prob, hi_open=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class BeitBlock(nn.Module):
    """timm's / unilm's BEiT block: ``x + gamma_1 * attn(norm1(x), bias)``, ``x + gamma_2 * mlp(norm2(x))``
    (``gamma_1`` / ``gamma_2`` (C,) layer scale initialised to ``init_values``; plain residuals
    without it)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, mlp_ratio: float = 4.0,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: Optional[float] = None, window_size=None, attn_head_dim: Optional[int] = None, *,
                 backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self.norm1 = _norm(dim)
        self.attn = BeitAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                                  window_size=window_size, attn_head_dim=attn_head_dim, backend=backend, fused=fused)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.init_values = init_values
        if init_values:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path1(self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.gamma_1 * self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        return x + self.drop_path2(self.gamma_2 * self.mlp(self.norm2(x)))


def _trunc_normal_(t: torch.Tensor, std: float, bound: Optional[float] = None) -> None:
    # timm: absolute bounds (-2, 2); unilm's trunc_normal_: bounds (-std, std)
    b = 2.0 if bound is None else bound
    nn.init.trunc_normal_(t, std=std, a=-b, b=b)


class _BeitEncoder(nn.Module):
    """The shared BEiT encoder: ``patch_embed``, ``cls_token``, [``mask_token``], [``pos_embed``],
    [``rel_pos_bias``], ``blocks``; the subclasses add their norms and heads."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, qkv_bias, mlp_ratio,
                 pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, init_values, use_abs_pos_emb,
                 use_rel_pos_bias, use_shared_rel_pos_bias, backend, with_mask_token: bool):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if with_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if use_shared_rel_pos_bias else None
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            BeitBlock(embed_dim, num_heads, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate,
                      attn_drop=attn_drop_rate, drop_path=dpr[i], init_values=init_values,
                      window_size=grid if use_rel_pos_bias else None, backend=backend)
            for i in range(depth)])

    def _fix_init_weight(self) -> None:
        with torch.no_grad():
            for layer_id, layer in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (layer_id + 1))
                layer.attn.proj.weight.div_(scale)
                layer.mlp.fc2.weight.div_(scale)

    def _check_images(self, images) -> torch.Tensor:
        return check.tensor("images", images, dtypes=check.FLOATING)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch embeddings (already masked) -> (B, 1 + N, D) block outputs (before the final norm)."""
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return x

    def no_weight_decay(self) -> set:
        """timm's / unilm's parameters without weight decay."""
        nwd = {"pos_embed", "cls_token"}
        return nwd | {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


class Beit(_BeitEncoder):
    """timm's BEiT classifier (``timm.models.beit.Beit``; same constructor arguments, parameter
    names and shapes, so ``load_state_dict(timm_model.state_dict())`` is strict).

    Parameters: ``patch_embed.proj``, ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + N, D) when
    ``use_abs_pos_emb``, ``rel_pos_bias.relative_position_bias_table`` when
    ``use_shared_rel_pos_bias``, ``blocks.{i}.{norm1, attn.qkv, attn.q_bias, attn.v_bias,
    attn.relative_position_bias_table, attn.proj, norm2, mlp.fc1, mlp.fc2, gamma_1, gamma_2}``,
    ``norm`` (token pooling) or ``fc_norm`` (average pooling), ``head``.

    ``forward(images, labels=None)``: images (B, in_chans, H, W) float -> logits (B, num_classes)
    (like :class:`vlfast.models.vit.ViT`: ``labels`` is accepted so ``model(**batch)`` works and is
    not used; training applies the cross-entropy).  ``forward_features`` -> (B, 1 + N, D).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 qkv_bias: bool = True, mlp_ratio: float = 4.0, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init_values: Optional[float] = None, use_abs_pos_emb: bool = True, use_rel_pos_bias: bool = False,
                 use_shared_rel_pos_bias: bool = False, head_init_scale: float = 0.001,
                 use_fc_norm: Optional[bool] = None, backend: Optional[str] = None):
        global_pool = check.choice("global_pool", global_pool, ("", "avg", "token"))
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, qkv_bias, mlp_ratio,
                         pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, init_values, use_abs_pos_emb,
                         use_rel_pos_bias, use_shared_rel_pos_bias, backend, with_mask_token=False)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                           global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
                           proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
                           drop_path_rate=drop_path_rate, init_values=init_values, use_abs_pos_emb=use_abs_pos_emb,
                           use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=use_shared_rel_pos_bias,
                           head_init_scale=head_init_scale, use_fc_norm=use_fc_norm)
        self.num_classes = num_classes
        self.global_pool = global_pool
        use_fc_norm = global_pool == "avg" if use_fc_norm is None else use_fc_norm
        self.norm = nn.Identity() if use_fc_norm else _norm(embed_dim)
        self.fc_norm = _norm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # timm's init_weights: trunc-normal Linear weights, zero biases, depth-rescaled projections, small head
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.pos_embed is not None:
            _trunc_normal_(self.pos_embed, 0.02)
        _trunc_normal_(self.cls_token, 0.02)
        self._fix_init_weight()
        if head_init_scale and isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self._check_images(images))
        return self.norm(self._encode(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"images": (B, C, H, W) float32, "labels": (B,) int64}``: as ViT's
        (:func:`vlfast.models.vit.synthetic_class_batch`)."""
        return synthetic_class_batch(batch_size, self.patch_embed.in_chans, self.patch_embed.img_size,
                                     self.num_classes, device=device, generator=generator)


def synthetic_visual_tokens(images: torch.Tensor, patch_size: int, vocab_size: int) -> torch.Tensor:
    """Stand-in visual tokens (B, N) int64 in ``[0, vocab_size)``, a deterministic function of each patch:
    the signs of ``ceil(log2(vocab_size))`` fixed random projections (seed 8192) of the patch's
    pixels (channel-last order, patches row-major like the patch embedding) read as a binary
    number, modulo ``vocab_size``.  Smooth images give neighbouring patches related codes, so a
    masked patch's token is predictable from its context (not a dVAE; for synthetic training only)."""
    check.tensor("images", images, ndim=4, dtypes=check.FLOATING, shape_doc="(B, C, H, W)")
    p = check.positive_int("patch_size", patch_size)
    vocab_size = check.integer("vocab_size", vocab_size, 2)
    B, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"images of {H}x{W} are not divisible into {p}x{p} patches")
    patches = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
    bits = max(1, math.ceil(math.log2(vocab_size)))
    proj = torch.randn(p * p * C, bits, generator=torch.Generator().manual_seed(8192)).to(images.device)
    code = ((patches.float() @ proj) > 0).long()
    weights = 2 ** torch.arange(bits, device=images.device)
    return (code * weights).sum(-1) % vocab_size


class BeitForMaskedImageModeling(_BeitEncoder):
    """BEiT masked image modelling (unilm ``VisionTransformerForMaskedImageModeling``; its names).

    Parameters: ``patch_embed.proj``, ``cls_token``, ``mask_token`` (1, 1, D), ``pos_embed`` when
    ``use_abs_pos_emb``, ``rel_pos_bias.relative_position_bias_table`` (shared, unilm's default
    pre-training) and/or ``blocks.{i}.attn.relative_position_bias_table`` (per layer, timm's
    names), ``blocks.*`` (as :class:`Beit`), ``norm``, ``lm_head`` (D -> vocab_size).

    ``forward(images, visual_tokens=None, bool_masked_pos=None)`` -> dict:

    * images: (B, C, H, W) float.
    * visual_tokens: (B, N) integer in ``[0, vocab_size)``, the tokenizer's code of every patch
      (N = number of patches, row-major); required (``ValueError`` without: real image data
      carries no visual tokens).
    * bool_masked_pos: (B, N) bool, True = masked; ``None`` draws BEiT's block masks with
      :func:`vlfast.ops.block_masking` (``mask_ratio``, ``min_num_patches``, ``max_num_patches``,
      ``min_aspect``) from torch's global RNG.  Each sample must mask at least one patch.

    Masked patch embeddings become ``mask_token`` (unilm: ``x * (1 - w) + mask_token * w``), the
    encoder runs, and ``lm_head(norm(x)[masked])`` gives ``"logits"`` (M, vocab_size) for the M masked
    patches; ``"loss"`` is ``cross_entropy(logits, visual_tokens[masked])`` (mean over the masked
    patches), ``"mlm_acc"`` its top-1 accuracy (no gradient), ``"bool_masked_pos"`` the mask used.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, vocab_size: int = 8192,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, qkv_bias: bool = True,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, init_values: Optional[float] = 0.1, use_abs_pos_emb: bool = False,
                 use_rel_pos_bias: bool = False, use_shared_rel_pos_bias: bool = True, init_std: float = 0.02,
                 mask_ratio: float = 0.4, min_num_patches: int = 16, max_num_patches: Optional[int] = None,
                 min_aspect: float = 0.3, backend: Optional[str] = None):
        vocab_size = check.integer("vocab_size", vocab_size, 2)
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, qkv_bias, mlp_ratio,
                         drop_rate, drop_rate, attn_drop_rate, drop_path_rate, init_values, use_abs_pos_emb,
                         use_rel_pos_bias, use_shared_rel_pos_bias, backend, with_mask_token=True)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, vocab_size=vocab_size,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, qkv_bias=qkv_bias,
                           mlp_ratio=mlp_ratio, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                           drop_path_rate=drop_path_rate, init_values=init_values, use_abs_pos_emb=use_abs_pos_emb,
                           use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=use_shared_rel_pos_bias,
                           init_std=init_std, mask_ratio=mask_ratio, min_num_patches=min_num_patches,
                           max_num_patches=max_num_patches, min_aspect=min_aspect)
        self.vocab_size = vocab_size
        self.mask_ratio = check.mask_ratio(mask_ratio)
        self.min_num_patches = check.integer("min_num_patches", min_num_patches, 1)
        self.max_num_patches = max_num_patches
        self.min_aspect = min_aspect
        self.norm = _norm(embed_dim)
        self.init_std = init_std
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        # unilm's init: trunc-normal (bounds +-std) tokens, Linear and Conv2d weights, zero biases, rescaled projections
        if self.pos_embed is not None:
            _trunc_normal_(self.pos_embed, init_std, init_std)
        for t in (self.cls_token, self.mask_token):
            _trunc_normal_(t, init_std, init_std)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _trunc_normal_(m.weight, init_std, init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._fix_init_weight()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def block_masks(self, batch_size: int, *, generator: Optional[torch.Generator] = None, device=None
                    ) -> torch.Tensor:
        """BEiT's block masks (batch_size, N) bool from :func:`vlfast.ops.block_masking` with this model's
        ``mask_ratio`` / ``min_num_patches`` / ``max_num_patches`` / ``min_aspect`` (CPU generator)."""
        return block_masking(batch_size, self.patch_embed.grid_size, self.mask_ratio,
                             min_num_patches=self.min_num_patches, max_num_patches=self.max_num_patches,
                             min_aspect=self.min_aspect, generator=generator, device=device)

    def _check_inputs(self, images, visual_tokens, bool_masked_pos):
        images = self._check_images(images)
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        B, N = images.shape[0], self.num_patches
        if visual_tokens is None:
            raise ValueError("visual_tokens is required: BEiT pre-training predicts the (B, num_patches) visual "
                             "tokens of a dVAE tokenizer, which real image data (csv:/wds:) does not carry; "
                             "tokenize the images offline and pass them as visual_tokens")
        check.tensor("visual_tokens", visual_tokens, dtypes=_INT_DTYPES)
        if tuple(visual_tokens.shape) != (B, N):
            raise ValueError(f"visual_tokens must have shape (B, num_patches) = {(B, N)}, "
                             f"got {tuple(visual_tokens.shape)}")
        check.same_device("visual_tokens", visual_tokens, images.device, "images")
        if bool_masked_pos is None:
            bool_masked_pos = self.block_masks(B, device=images.device)
        else:
            check.bool_mask("bool_masked_pos", bool_masked_pos, (B, N), images.device, "True = masked")
        lo_hi = torch.stack([visual_tokens.min(), visual_tokens.max()]).tolist()
        if lo_hi[0] < 0 or lo_hi[1] >= self.vocab_size:
            raise ValueError(f"visual_tokens must lie in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{lo_hi[0]}, {lo_hi[1]}]")
        if not bool(bool_masked_pos.any(1).all()):
            raise ValueError("bool_masked_pos must mask at least one patch of every sample")
        return images, visual_tokens.long(), bool_masked_pos

    def forward_features(self, images: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None
                         ) -> torch.Tensor:
        """(B, 1 + N, D) normalized tokens with the masked patches replaced by ``mask_token``."""
        x = self.patch_embed(self._check_images(images))
        if bool_masked_pos is not None:
            B, N, _ = x.shape
            check.bool_mask("bool_masked_pos", bool_masked_pos, (B, N), x.device, "True = masked")
            w = bool_masked_pos.unsqueeze(-1).type_as(x)
            x = x * (1 - w) + self.mask_token.expand(B, N, -1) * w
        return self.norm(self._encode(x))

    def forward(self, images: torch.Tensor, visual_tokens: Optional[torch.Tensor] = None,
                bool_masked_pos: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        images, visual_tokens, bool_masked_pos = self._check_inputs(images, visual_tokens, bool_masked_pos)
        x = self.forward_features(images, bool_masked_pos)[:, 1:]
        logits = self.lm_head(x[bool_masked_pos])
        targets = visual_tokens[bool_masked_pos]
        loss = F.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            mlm_acc = (logits.argmax(-1) == targets).float().mean()
        return {"loss": loss, "mlm_acc": mlm_acc, "logits": logits, "bool_masked_pos": bool_masked_pos}

    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"images": (B, C, H, W) float32, "visual_tokens": (B, N) int64, "bool_masked_pos": (B, N) bool}``:
        smooth random images (:func:`vlfast.models.vit.synthetic_images`), their
        :func:`synthetic_visual_tokens`, and BEiT block masks (:meth:`block_masks`; drawn from a CPU
        generator seeded from ``generator`` when that one is not on the CPU)."""
        pe = self.patch_embed
        src = _rand_source(generator)
        images = synthetic_images(batch_size, pe.in_chans, pe.img_size, generator=generator)
        mask_gen = generator
        if generator is not None and generator.device.type != "cpu":
            seed = int(torch.randint(0, 2 ** 62, (1,), device=src, generator=generator).item())
            mask_gen = torch.Generator().manual_seed(seed)
        mask = self.block_masks(batch_size, generator=mask_gen)
        tokens = synthetic_visual_tokens(images, pe.patch_size[0], self.vocab_size)
        dev = device if device is not None else src
        return {"images": images.to(dev), "visual_tokens": tokens.to(dev), "bool_masked_pos": mask.to(dev)}


def convert_unilm_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A unilm BEiT checkpoint (``{"model": ...}`` or ``{"module": ...}`` or the bare dict) as this
    module's / timm's state dict: unwraps it and drops the ``relative_position_index`` buffers
    (persistent in unilm, recomputed here), as timm's ``checkpoint_filter_fn`` does."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("module", state_dict)
    return {k: v for k, v in state_dict.items() if "relative_position_index" not in k}


_BEIT_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
_CLS_CONFIGS = {
    # timm's beit_base_patch16_224
    "beit_base_patch16_224": dict(**_BEIT_BASE, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1),
}
_PT_CONFIGS = {
    # unilm's beit_base_patch16_224_8k_vocab with run_beit_pretraining.py's defaults
    "beit_base_patch16_224_pt": dict(**_BEIT_BASE, vocab_size=8192, use_abs_pos_emb=False,
                                     use_shared_rel_pos_bias=True, init_values=0.1, mask_ratio=0.4,
                                     min_num_patches=16),
    # 8 x 8 patches: min block 16 * 64 / 196 -> 5 patches
    "beit_micro": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, vocab_size=512,
                       use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values=0.1, mask_ratio=0.4,
                       min_num_patches=5),
}

register_configs(_CLS_CONFIGS, Beit, "BEiT classifier (timm)")
register_configs(_PT_CONFIGS, BeitForMaskedImageModeling, "BEiT masked image modelling (unilm)")
