"""CLIP (Radford et al., 2021, arXiv:2103.00020) with open_clip's parameter names.

``clip_vit_b16`` is open_clip's ``ViT-B-16`` (embed dim 512; vision: width 768, 12
layers, 12 heads, patch 16, image 224; text: context 77, vocabulary 49408, width 512,
8 heads, 12 layers, causal mask), 149,620,737 parameters like open_clip's model;
``clip_micro`` is a tiny configuration for tests (image 32, patch 8, widths 64, 2
layers, text context 16 on :class:`~vlfast.models.tokenizer.ByteTokenizer` ids,
embed dim 32).

Parameter names follow open_clip (``visual.conv1``, ``visual.class_embedding``,
``visual.positional_embedding``, ``visual.ln_pre``,
``visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``visual.ln_post``, ``visual.proj``,
``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``,
``ln_final``, ``text_projection``, ``logit_scale``), so open_clip state dicts of the same
configuration load with ``load_state_dict`` (open_clip's ``attn_mask`` buffer is not
stored here: the causal mask is built on the fly).

Differences from open_clip, on purpose:

* the text features are pooled at the last real token (``attention_mask``'s last 1:
  the ``[SEP]`` of the byte tokenizer) instead of ``argmax(text)`` (open_clip's EOT
  token has the largest id in its BPE vocabulary, which is not true of other
  tokenizers); with open_clip's tokenizer and right padding these are the same position;
* padded text positions are also excluded as keys (a key padding mask from
  ``attention_mask``); with the causal mask and right padding this changes no real
  token's output.

``fused`` switches (set by :func:`vlfast.models.set_fused`): each attention module
(:class:`CLIPAttention`, a :class:`vlfast.nn.MultiheadAttention`: the fused op vs
:func:`vlfast.reference.attention_reference`) and the loss ``loss_fn``
(:class:`vlfast.nn.ClipLoss`: :func:`vlfast.ops.clip_loss`, never forming the N x N logits,
vs :func:`vlfast.reference.clip_loss_reference`).
"""

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import MultiheadAttention
from ..nn.contrastive import ClipLoss
from . import register_model
from .tokenizer import VOCAB_SIZE as BYTE_VOCAB_SIZE, ByteTokenizer

__all__ = ["CLIP", "CLIPAttention", "ResidualAttentionBlock", "clip_vit_b16", "clip_micro"]


class CLIPAttention(MultiheadAttention):
    """open_clip's ``nn.MultiheadAttention`` (batch first) as :class:`vlfast.nn.MultiheadAttention`.

    ``attend(x, key_padding_mask=None, causal=False)``: x (B, N, D) -> (B, N, D) self-attention;
    key_padding_mask (B, N) bool, True = padding; ``causal``: token i attends tokens j <= i.
    Calls the module (its hooks run: ZeRO-3 gathers its weights) as
    ``self(x, x, x, need_weights=False, is_causal=causal)``: with ``fused`` (see
    :func:`vlfast.models.set_fused`) the fused op, else the eager formula
    :func:`vlfast.reference.attention_reference` on the same projections.  ``forward`` keeps
    torch's API.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(embed_dim, num_heads, dropout=dropout, batch_first=True)

    def attend(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
               causal: bool = False) -> torch.Tensor:
        return self(x, x, x, key_padding_mask=key_padding_mask, need_weights=False, is_causal=causal)[0]


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-norm block: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width, int(width * mlp_ratio))

    def forward(self, x, key_padding_mask=None, causal: bool = False):
        x = x + self.attn.attend(self.ln_1(x), key_padding_mask=key_padding_mask, causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x, key_padding_mask=None, causal: bool = False):
        for blk in self.resblocks:
            x = blk(x, key_padding_mask=key_padding_mask, causal=causal)
        return x


class VisionTransformer(nn.Module):
    """open_clip's ``VisionTransformer`` (class-token pooling, ``ln_post`` before pooling)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 in_chans: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.grid_size = image_size // patch_size
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"images must have {self.in_chans} channels, got {x.shape[1]}")
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {x.shape[2]}x{x.shape[3]}")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the transformer's output (B, 1 + N, width), class token first, before
        ``ln_post`` (CoCa's attentional pooler reads these)."""
        self.check(x)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_post(self.forward_tokens(x))
        return x[:, 0] @ self.proj


_WORDS = ("a", "the", "photo", "of", "dog", "cat", "red", "blue", "car", "on", "grass", "small", "big",
          "bird", "in", "sky", "two", "people", "street", "tree", "house", "near", "water", "boat")


def random_captions(batch_size: int, generator: Optional[torch.Generator] = None, min_words: int = 1,
                    max_words: int = 8):
    """Captions of random words (drawn from ``generator`` on the CPU) for synthetic batches."""
    n = torch.randint(min_words, max_words + 1, (batch_size,), generator=generator).tolist()
    out = []
    for k in n:
        idx = torch.randint(len(_WORDS), (k,), generator=generator).tolist()
        out.append(" ".join(_WORDS[i] for i in idx))
    return out


def check_text(input_ids, attention_mask, vocab_size: int, max_len: int, batch_size: Optional[int] = None):
    """Validate (input_ids, attention_mask); returns attention_mask as a bool tensor (True = real token)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be an integer tensor of shape (B, L), got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    B, L = input_ids.shape
    if batch_size is not None and B != batch_size:
        raise ValueError(f"batch sizes differ: images have {batch_size}, input_ids have {B}")
    if not 1 <= L <= max_len:
        raise ValueError(f"input_ids length must be in [1, {max_len}], got {L}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must be in [0, {vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor of shape {(B, L)}, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, L):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
    mask = attention_mask.bool()
    if not bool(mask.any(1).all()):
        raise ValueError("every sequence needs at least one real token (attention_mask all 0 in a row)")
    return mask


class CLIP(nn.Module):
    """open_clip's ``CLIP``: ``encode_image``, ``encode_text``, and a training ``forward``.

    ``forward(images, input_ids, attention_mask=None)`` -> ``{"loss", "image_features",
    "text_features", "logit_scale"}`` with L2-normalized features, ``logit_scale`` the
    exponentiated temperature and ``loss`` CLIP's contrastive loss.  Images (B, C, H, W)
    of the configured size; input_ids (B, L) with L <= ``context_length``, ids in
    ``[0, vocab_size)``; attention_mask (B, L), 1 = real token.  Bad shapes, ids or
    batch sizes raise ``ValueError``.
    """

    def __init__(self, embed_dim: int = 512, image_size: int = 224, patch_size: int = 16, vision_width: int = 768,
                 vision_layers: int = 12, vision_heads: int = 12, context_length: int = 77,
                 vocab_size: int = 49408, text_width: int = 512, text_heads: int = 8, text_layers: int = 12,
                 mlp_ratio: float = 4.0, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.embed_dim, self.context_length, self.vocab_size = embed_dim, context_length, vocab_size
        self.image_size = image_size
        self.visual = VisionTransformer(image_size, patch_size, vision_width, vision_layers, vision_heads, embed_dim,
                                        mlp_ratio=mlp_ratio)
        self.transformer = Transformer(text_width, text_layers, text_heads, mlp_ratio)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True)  # vlfast's data-parallel form
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's ``CLIP.init_parameters`` (text tower; the visual tower keeps its own init)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    normalize: bool = False) -> torch.Tensor:
        mask = check_text(input_ids, attention_mask, self.vocab_size, self.context_length)
        B, L = input_ids.shape
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]
        kpm = None if bool(mask.all()) else ~mask
        x = self.transformer(x, key_padding_mask=kpm, causal=True)
        x = self.ln_final(x)
        # pool at the last real token (the [SEP] / EOT position)
        last = (torch.arange(L, device=input_ids.device) * mask).argmax(-1)
        x = x[torch.arange(B, device=x.device), last] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self.visual.check(images)
        check_text(input_ids, attention_mask, self.vocab_size, self.context_length, batch_size=images.shape[0])
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(input_ids, attention_mask, normalize=True)
        logit_scale = self.logit_scale.exp()
        loss = self.loss_fn(image_features, text_features, logit_scale)
        return {"loss": loss, "image_features": image_features, "text_features": text_features,
                "logit_scale": logit_scale}

    def accum_features(self, images: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Gradient accumulation (open_clip's ``--accum-freq``): the per-sample features of a
        micro-batch, (b, embed_dim) each, L2-normalized; :meth:`accum_loss` of the features of all
        micro-batches concatenated is :meth:`forward`'s loss on the whole batch."""
        self.visual.check(images)
        check_text(input_ids, attention_mask, self.vocab_size, self.context_length, batch_size=images.shape[0])
        return {"image_features": self.encode_image(images, normalize=True),
                "text_features": self.encode_text(input_ids, attention_mask, normalize=True)}

    def accum_loss(self, features: Dict[str, torch.Tensor], *, with_globals: bool = True) -> torch.Tensor:
        """The CLIP loss of concatenated :meth:`accum_features`; ``with_globals=False`` detaches
        ``logit_scale`` (its gradient must be taken once per optimizer step, not once per micro-batch)."""
        scale = self.logit_scale.exp()
        return self.loss_fn(features["image_features"], features["text_features"],
                            scale if with_globals else scale.detach())

    @torch.no_grad()
    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Random images and captions: ByteTokenizer-encoded random-word captions when the
        vocabulary is the byte tokenizer's (261), else random ids of random lengths
        (``[1, vocab - 3]`` between a start id ``vocab - 2`` and an end id ``vocab - 1``,
        like open_clip's SOT / EOT) right-padded with 0.  Drawn on the CPU from
        ``generator`` (default: torch's global generator), then moved to ``device``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        v = self.visual
        images = torch.randn(batch_size, v.in_chans, v.image_size, v.image_size, generator=generator)
        L = self.context_length
        if self.vocab_size == BYTE_VOCAB_SIZE:
            ids, mask = ByteTokenizer()(random_captions(batch_size, generator, max_words=max(1, L // 3)), L)
        else:
            lengths = torch.randint(2, L + 1, (batch_size,), generator=generator)
            ids = torch.randint(1, self.vocab_size - 2, (batch_size, L), generator=generator)
            pos = torch.arange(L).expand(batch_size, L)
            ids[:, 0] = self.vocab_size - 2
            ids[pos == (lengths - 1)[:, None]] = self.vocab_size - 1
            mask = (pos < lengths[:, None]).long()
            ids = ids * mask
        return {"images": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


@register_model("clip_vit_b16")
def clip_vit_b16(**overrides) -> CLIP:
    """open_clip ``ViT-B-16`` (149,620,737 parameters)."""
    cfg = dict(embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
               context_length=77, vocab_size=49408, text_width=512, text_heads=8, text_layers=12)
    cfg.update(overrides)
    return CLIP(**cfg)


@register_model("clip_micro")
def clip_micro(**overrides) -> CLIP:
    """A tiny CLIP for tests: image 32, patch 8, widths 64, 2 layers, ByteTokenizer text (context 16)."""
    cfg = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
               context_length=16, vocab_size=BYTE_VOCAB_SIZE, text_width=64, text_heads=4, text_layers=2)
    cfg.update(overrides)
    return CLIP(**cfg)
