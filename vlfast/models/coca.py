"""CoCa (Yu et al., 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models",
arXiv:2205.01917) with open_clip's parameter names.

``coca_vit_b32`` is open_clip 3.3.0's ``coca_ViT-B-32`` (``open_clip/model_configs/coca_ViT-B-32.json``,
built by ``open_clip/coca_model.py: CoCa``): embed dim 512; vision ViT-B/32 (width 768, 12 layers,
12 heads, image 224, 50 tokens) with an attentional pooler of 256 queries (8 heads); a causal text
tower (context 76, vocabulary 49408, width 512, 8 heads, 12 layers) with a learned ``[CLS]``
embedding appended after the text; a multimodal decoder of 12 (causal self-attention,
cross-attention) block pairs (width 512, 8 heads) predicting the next token over the 49408 words.
253,560,065 parameters, like ``open_clip.create_model("coca_ViT-B-32")``.
``coca_micro`` is a tiny configuration for tests and CPU runs (image 32, patch 8, widths 64,
2 layers, 9 pooler queries, ByteTokenizer text of context 16, embed dim 64).

The computation (open_clip's, shapes for a batch of B images and B texts of L tokens):

.. code-block:: text

    visual:  x = ViT(images)                                   (B, 1 + N, Wv)   class token + patches
             q = attn_pool(x) = MHA(ln_q(query), ln_k(x))       (B, Nq, E)       Nq learned queries, Nq != 1 + N
             q = ln_post(q); image_latent = q[:, 0] @ proj      (B, E)
                             image_embs   = q[:, 1:]            (B, Nq - 1, E)
    text:    t = [tok_emb(ids), cls_emb] + pos[:L + 1]          (B, L + 1, Wt)
             t = causal transformer(t, key padding mask)        (B, L + 1, Wt)
             text_latent = ln_final(t[:, -1]) @ text_projection (B, E)
             token_embs  = t[:, :L]                             (B, L, Wt)       no final norm (open_clip)
    decoder: y = token_embs[:, :-1]                             (B, L - 1, Wt)
             per layer: y = causal self-attention block(y); y = cross-attention block(y, image_embs)
             logits = ln_final(y) @ text_projection             (B, L - 1, V)
    loss:    contrastive = clip_loss_weight * CLIP(normalize(image_latent), normalize(text_latent), exp(logit_scale))
             caption = caption_loss_weight * CE(logits, ids[:, 1:], ignore_index=pad_id)
             loss = contrastive + caption

Defaults ``caption_loss_weight=2.0, clip_loss_weight=1.0`` are open_clip_train's
(``--coca-caption-loss-weight``, ``--coca-contrastive-loss-weight``); ``open_clip/loss.py: CoCaLoss``.
The text tower's key padding mask is open_clip's: a token is padding when its id is ``pad_id``, and
the ``[CLS]`` column is inserted at the *front* of the padding mask (``correct_cls_mask=False``, the
legacy mask that open_clip's ``CoCa`` builds and its CoCa weights were trained with: key ``j >= 1`` is
masked when token ``j - 1`` is padding); ``correct_cls_mask=True`` aligns it (key ``j`` masked when
token ``j`` is padding, ``[CLS]`` always attended).  The decoder's self-attention is causal without a
padding mask and its cross-attention sees every image token, as in open_clip.

Parameter names follow open_clip (``text.{token_embedding, cls_emb, positional_embedding,
transformer.resblocks.*, ln_final, text_projection}``, ``visual.{conv1, class_embedding,
positional_embedding, ln_pre, transformer.resblocks.*, attn_pool.{query, attn.{q,k,v}_proj_weight,
attn.in_proj_bias, attn.out_proj, ln_q, ln_k}, ln_post, proj}``, ``text_decoder.{resblocks.*,
cross_attn.{i}.{ln_1, attn, ln_1_kv, ln_2, mlp}, ln_final, text_projection}``, ``logit_scale``), so an
open_clip ``CoCa`` state dict of the same configuration loads with ``load_state_dict(strict=True)``
(its non-persistent ``attn_mask`` buffers are not stored: causal masking is the attention op's
causal mode).  One difference: open_clip leaves ``text_decoder.text_projection`` uninitialized
(``torch.empty``; its ``MultimodalTransformer.init_parameters`` is never called); here it is drawn
from ``N(0, width ** -0.5)``, the init that method intends.

``fused`` switches (see :func:`vlfast.models.set_fused`): every attention module (vision and text
self-attention, the attentional pooler's cross-attention with Nq != Nk, the decoder's causal
self-attention and its cross-attention to the image tokens: :class:`vlfast.nn.MultiheadAttention`,
the fused op :func:`vlfast.ops.attention` with ``causal=True`` where causal, vs
:func:`vlfast.reference.attention_reference`) and the contrastive loss ``loss_fn``
(:class:`vlfast.nn.ClipLoss`: :func:`vlfast.ops.contrastive_loss` tile-wise, vs
:func:`vlfast.reference.clip_loss_reference`).  The caption cross-entropy is
:func:`torch.nn.functional.cross_entropy` in both.
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as check
from ..nn.attention import MultiheadAttention
from ..nn.contrastive import ClipLoss
from . import register_model
from .clip import CLIPAttention, Transformer, VisionTransformer, _MLP, check_text, random_captions
from .tokenizer import PAD as BYTE_PAD, VOCAB_SIZE as BYTE_VOCAB_SIZE, ByteTokenizer

__all__ = ["CoCa", "AttentionalPooler", "CoCaVisionTransformer", "CoCaTextTransformer", "CrossAttentionBlock",
           "MultimodalTransformer", "coca_vit_b32", "coca_micro"]


class AttentionalPooler(nn.Module):
    """open_clip's ``AttentionalPooler``: ``n_queries`` learned queries cross-attending all image tokens.

    ``forward(x)``: x (B, Nk, context_dim) -> (B, n_queries, d_model) =
    ``attn(ln_q(query).expand(B), ln_k(x), ln_k(x))`` with ``attn`` a batch-first
    :class:`vlfast.nn.MultiheadAttention` of ``kdim = vdim = context_dim`` (parameters
    ``attn.q_proj_weight`` (d_model, d_model), ``attn.k_proj_weight`` / ``attn.v_proj_weight``
    (d_model, context_dim), ``attn.in_proj_bias``, ``attn.out_proj``): the fused op with
    Nq = n_queries queries against Nk keys.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 256):
        super().__init__()
        d_model, context_dim = check.positive_int("d_model", d_model), check.positive_int("context_dim", context_dim)
        n_queries = check.positive_int("n_queries", n_queries)
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).to(x.dtype)
        return self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]


class CoCaVisionTransformer(VisionTransformer):
    """open_clip's ``VisionTransformer(attentional_pool=True, output_tokens=True)`` (pool type ``tok``).

    ``forward(images)`` -> ``(image_latent (B, output_dim), image_embs (B, n_queries - 1, output_dim))``:
    the ViT tokens go through :class:`AttentionalPooler` (``attn_pool``), then ``ln_post``
    (over ``output_dim``); the first pooled query, times ``proj`` (output_dim, output_dim), is the
    contrastive embedding, the other queries are the decoder's image tokens (not projected).
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 attn_pooler_queries: int = 256, attn_pooler_heads: int = 8, in_chans: int = 3,
                 mlp_ratio: float = 4.0):
        super().__init__(image_size, patch_size, width, layers, heads, output_dim, in_chans=in_chans,
                         mlp_ratio=mlp_ratio)
        if check.positive_int("attn_pooler_queries", attn_pooler_queries) < 2:
            raise ValueError(f"attn_pooler_queries must be >= 2 (one contrastive query + image tokens for the "
                             f"decoder), got {attn_pooler_queries}")
        del self.ln_post  # re-registered after attn_pool: open_clip's module order
        self.attn_pool = AttentionalPooler(output_dim, width, n_head=attn_pooler_heads,
                                           n_queries=attn_pooler_queries)
        self.ln_post = nn.LayerNorm(output_dim)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(output_dim, output_dim))

    def check(self, x) -> None:
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            raise TypeError(f"images must be a floating tensor, got {x.dtype}")
        super().check(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.ln_post(self.attn_pool(self.forward_tokens(x)))
        return x[:, 0] @ self.proj, x[:, 1:]


class CoCaTextTransformer(nn.Module):
    """open_clip's ``TextTransformer(embed_cls=True, output_tokens=True)``: the causal text tower.

    ``forward(input_ids)``: ids (B, L), L <= ``context_length`` ->
    ``(text_latent (B, output_dim), token_embs (B, L, width))``.  A learned ``cls_emb`` is appended
    after the L tokens (position L of ``positional_embedding``, which has ``context_length + 1``
    rows); the transformer runs causally with the key padding mask of the module docstring
    (:mod:`vlfast.models.coca`); ``text_latent = ln_final(x[:, -1]) @ text_projection`` and
    ``token_embs`` are the L text positions of the transformer's output (without ``ln_final``).
    """

    def __init__(self, context_length: int, vocab_size: int, width: int, heads: int, layers: int, output_dim: int,
                 mlp_ratio: float = 4.0, pad_id: int = 0, correct_cls_mask: bool = False):
        super().__init__()
        self.context_length = check.positive_int("context_length", context_length)
        self.vocab_size = check.positive_int("vocab_size", vocab_size)
        self.pad_id = check.integer("pad_id", pad_id, 0, vocab_size - 1)
        self.correct_cls_mask = check.flag("correct_cls_mask", correct_cls_mask)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.cls_emb = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(context_length + 1, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's ``TextTransformer.init_parameters``."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.cls_emb, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def key_padding_mask(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, L + 1) bool, True = key excluded (open_clip's ``_build_additive_mask``), or None when nothing is."""
        pad = input_ids == self.pad_id
        cls_col = torch.zeros_like(pad[:, :1])
        kpm = torch.cat([pad, cls_col] if self.correct_cls_mask else [cls_col, pad], dim=1)
        return kpm if bool(kpm.any()) else None

    def forward(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, L = input_ids.shape
        x = self.token_embedding(input_ids)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(B, 1, -1)], dim=1) + self.positional_embedding[:L + 1]
        x = self.transformer(x, key_padding_mask=self.key_padding_mask(input_ids), causal=True)
        pooled = self.ln_final(x[:, -1]) @ self.text_projection
        return pooled, x[:, :-1]


class CrossAttentionBlock(nn.Module):
    """open_clip's ``ResidualAttentionBlock(is_cross_attention=True)``:
    ``x + attn(ln_1(x), ln_1_kv(kv), ln_1_kv(kv))``, then ``x + mlp(ln_2(x))``.

    ``forward(x, kv)``: x (B, Nq, width) text tokens, kv (B, Nk, width) image tokens -> (B, Nq, width);
    the attention is the fused op with Nq queries against Nk keys, no mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CLIPAttention(width, heads)
        self.ln_1_kv = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.ln_1_kv(kv)
        x = x + self.attn(self.ln_1(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MultimodalTransformer(Transformer):
    """open_clip's ``MultimodalTransformer``: the captioning decoder.

    ``forward(image_embs, text_embs)``: image_embs (B, Nk, width), text_embs (B, T, width) ->
    logits (B, T, output_dim): per layer a causal self-attention block (``resblocks[i]``) and a
    cross-attention block to the image tokens (``cross_attn[i]``), then ``ln_final`` and
    ``@ text_projection`` (width, output_dim = vocabulary size)."""

    def __init__(self, width: int, layers: int, heads: int, output_dim: int, mlp_ratio: float = 4.0):
        super().__init__(width, layers, heads, mlp_ratio)
        self.cross_attn = nn.ModuleList([CrossAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
        x = text_embs
        for resblock, cross in zip(self.resblocks, self.cross_attn):
            x = resblock(x, causal=True)
            x = cross(x, image_embs)
        return self.ln_final(x) @ self.text_projection


class CoCa(nn.Module):
    """open_clip's ``CoCa`` with its training loss (``CoCaLoss``); see :mod:`vlfast.models.coca`.

    ``forward(images, input_ids, attention_mask=None)`` -> ``{"loss", "contrastive", "caption"}``
    (0-dim; the parts already weighted, ``loss`` their sum).  images (B, C, H, W) floating, of the
    configured size; input_ids (B, L) integer, 2 <= L <= ``context_length``, ids in
    ``[0, vocab_size)``, padded with ``pad_id`` (0: the ByteTokenizer's ``[PAD]``; a sequence is e.g.
    ``[CLS] bytes [SEP] [PAD]...``, the captioning targets are ``input_ids[:, 1:]``);
    attention_mask (B, L), optional, 1 = real token: it must mark exactly the non-``pad_id`` tokens
    (padding is read from the ids, as open_clip does).  Wrong types raise ``TypeError``, wrong
    shapes / values ``ValueError``, naming the argument.

    ``forward_features(images, input_ids)`` returns open_clip's ``CoCa.forward`` dict
    (``image_features``, ``text_features`` normalized, ``logits`` (B, L - 1, V), ``labels``,
    ``logit_scale`` exponentiated); ``encode_image`` / ``encode_text`` its contrastive embeddings;
    ``generate`` greedy captions.
    """

    def __init__(self, embed_dim: int = 512, image_size: int = 224, patch_size: int = 32, vision_width: int = 768,
                 vision_layers: int = 12, vision_heads: int = 12, attn_pooler_queries: int = 256,
                 attn_pooler_heads: int = 8, context_length: int = 76, vocab_size: int = 49408,
                 text_width: int = 512, text_heads: int = 8, text_layers: int = 12, multimodal_width: int = 512,
                 multimodal_heads: int = 8, multimodal_layers: int = 12, mlp_ratio: float = 4.0, pad_id: int = 0,
                 caption_loss_weight: float = 2.0, clip_loss_weight: float = 1.0,
                 init_logit_scale: float = math.log(1 / 0.07), correct_cls_mask: bool = False):
        super().__init__()
        embed_dim, text_width = check.positive_int("embed_dim", embed_dim), check.positive_int("text_width", text_width)
        multimodal_width = check.positive_int("multimodal_width", multimodal_width)
        if not multimodal_width == text_width == embed_dim:
            raise ValueError("open_clip's CoCa feeds the text tokens (text_width) and the pooled image tokens "
                             "(embed_dim) to the decoder unprojected: multimodal_width, text_width and embed_dim "
                             f"must be equal, got {multimodal_width}, {text_width}, {embed_dim}")
        self.embed_dim, self.context_length, self.vocab_size = embed_dim, context_length, vocab_size
        self.pad_id = pad_id
        self.caption_loss_weight = check.real("caption_loss_weight", caption_loss_weight)
        self.clip_loss_weight = check.real("clip_loss_weight", clip_loss_weight)
        self.text = CoCaTextTransformer(context_length, vocab_size, text_width, text_heads, text_layers, embed_dim,
                                        mlp_ratio=mlp_ratio, pad_id=pad_id, correct_cls_mask=correct_cls_mask)
        self.visual = CoCaVisionTransformer(image_size, patch_size, vision_width, vision_layers, vision_heads,
                                            embed_dim, attn_pooler_queries=attn_pooler_queries,
                                            attn_pooler_heads=attn_pooler_heads, mlp_ratio=mlp_ratio)
        self.text_decoder = MultimodalTransformer(multimodal_width, multimodal_layers, multimodal_heads, vocab_size,
                                                  mlp_ratio=mlp_ratio)
        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True)  # vlfast's data-parallel form

    # ------------------------------------------------------------------ validation
    def _check(self, images, input_ids, attention_mask=None, min_len: int = 2) -> None:
        self.visual.check(images)
        check_text(input_ids, attention_mask, self.vocab_size, self.context_length, batch_size=images.shape[0])
        if input_ids.device != images.device:
            raise ValueError(f"input_ids is on {input_ids.device} but images is on {images.device}")
        if input_ids.shape[1] < min_len:
            raise ValueError(f"input_ids length must be >= {min_len} (the caption targets are input_ids[:, 1:]), "
                             f"got {input_ids.shape[1]}")
        if attention_mask is not None and not torch.equal(attention_mask.bool(), input_ids != self.pad_id):
            raise ValueError(f"attention_mask must be 1 exactly where input_ids != pad_id ({self.pad_id}): CoCa "
                             "reads its padding from the ids, as open_clip does")

    # ------------------------------------------------------------------ towers
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (B, C, H, W) -> contrastive embeddings (B, embed_dim)."""
        self.visual.check(images)
        x, _ = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """input_ids (B, L) -> contrastive embeddings (B, embed_dim) (the ``[CLS]`` position)."""
        check_text(input_ids, None, self.vocab_size, self.context_length)
        x, _ = self.text(input_ids)
        return F.normalize(x, dim=-1) if normalize else x

    def forward_features(self, images: torch.Tensor, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """open_clip's ``CoCa.forward(images, text)`` (``output_labels=True``)."""
        self._check(images, input_ids)
        return self._features(images, input_ids)

    def _features(self, images, input_ids):
        image_latent, image_embs = self.visual(images)
        text_latent, token_embs = self.text(input_ids)
        logits = self.text_decoder(image_embs, token_embs[:, :-1])
        return {"image_features": F.normalize(image_latent, dim=-1), "text_features": F.normalize(text_latent, dim=-1),
                "logits": logits, "labels": input_ids[:, 1:], "logit_scale": self.logit_scale.exp()}

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self._check(images, input_ids, attention_mask)
        if not bool((input_ids[:, 1:] != self.pad_id).any()):
            raise ValueError(f"input_ids has no caption target: every token after the first is pad_id ({self.pad_id})")
        f = self._features(images, input_ids)
        if self.clip_loss_weight:
            contrastive = self.clip_loss_weight * self.loss_fn(f["image_features"], f["text_features"],
                                                               f["logit_scale"])
        else:
            contrastive = f["logits"].new_zeros(())
        caption = F.cross_entropy(f["logits"].permute(0, 2, 1), f["labels"], ignore_index=self.pad_id)
        caption = self.caption_loss_weight * caption
        return {"loss": contrastive + caption, "contrastive": contrastive, "caption": caption}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_length: int = 16, sot_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy captions: (B, C, H, W) -> ids (B, T), T <= ``max_length`` <= ``context_length``.

        Starts from ``sot_token_id`` (default: the ByteTokenizer's ``[CLS]`` for its vocabulary, else
        open_clip's SOT ``vocab_size - 2``), appends the decoder's argmax until every row has emitted
        ``eos_token_id`` (default ``[SEP]`` / open_clip's EOT ``vocab_size - 1``) or ``max_length``
        tokens; positions after a row's end hold ``pad_id``.  (open_clip's ``generate`` defaults to
        beam search / sampling; this is its ``top_k=1`` greedy limit without the min-length and
        repetition processors.)"""
        self.visual.check(images)
        max_length = check.integer("max_length", max_length, 2, self.context_length)
        byte = self.vocab_size == BYTE_VOCAB_SIZE
        sot = (ByteTokenizer.cls_token_id if byte else self.vocab_size - 2) if sot_token_id is None else sot_token_id
        eos = (ByteTokenizer.sep_token_id if byte else self.vocab_size - 1) if eos_token_id is None else eos_token_id
        sot = check.integer("sot_token_id", sot, 0, self.vocab_size - 1)
        eos = check.integer("eos_token_id", eos, 0, self.vocab_size - 1)
        _, image_embs = self.visual(images)
        B = images.shape[0]
        out = torch.full((B, 1), sot, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        while out.shape[1] < max_length and not bool(done.all()):
            # the text tower appends [CLS] after the ids; the decoder reads the L text positions
            _, token_embs = self.text(out)
            nxt = self.text_decoder(image_embs, token_embs)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done = done | (nxt == eos)
        return out

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Random images and captions: ByteTokenizer-encoded random-word captions when the vocabulary
        is the byte tokenizer's (261, ``pad_id`` its ``[PAD]`` 0), else random ids of random lengths
        (between open_clip's SOT ``vocab - 2`` and EOT ``vocab - 1``) right-padded with ``pad_id``.
        Each image is noise plus a pattern of its caption's first token after the start, so
        images and captions share structure the contrastive loss can learn.  Drawn on the CPU from
        ``generator`` (default: torch's global generator), then moved to ``device``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        v, L = self.visual, self.context_length
        if self.vocab_size == BYTE_VOCAB_SIZE and self.pad_id == BYTE_PAD:
            ids, mask = ByteTokenizer()(random_captions(batch_size, generator, max_words=max(1, L // 3)), L)
        else:
            lengths = torch.randint(3, L + 1, (batch_size,), generator=generator) if L >= 3 else torch.full(
                (batch_size,), L)
            ids = torch.randint(0, self.vocab_size - 2, (batch_size, L), generator=generator)
            ids = torch.where(ids == self.pad_id, (ids + 1) % (self.vocab_size - 2), ids)
            pos = torch.arange(L).expand(batch_size, L)
            ids[:, 0] = self.vocab_size - 2
            ids[pos == (lengths - 1)[:, None]] = self.vocab_size - 1
            mask = (pos < lengths[:, None]).long()
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_id))
        patterns = torch.randn(64, v.in_chans, v.image_size, v.image_size, generator=generator)
        images = torch.randn(batch_size, v.in_chans, v.image_size, v.image_size, generator=generator)
        images = 0.5 * images + patterns[ids[:, 1] % 64]
        return {"images": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


@register_model("coca_vit_b32")
def coca_vit_b32(**overrides) -> CoCa:
    """open_clip ``coca_ViT-B-32`` (253,560,065 parameters)."""
    cfg = dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
               attn_pooler_queries=256, attn_pooler_heads=8, context_length=76, vocab_size=49408, text_width=512,
               text_heads=8, text_layers=12, multimodal_width=512, multimodal_heads=8, multimodal_layers=12)
    cfg.update(overrides)
    return CoCa(**cfg)


@register_model("coca_micro")
def coca_micro(**overrides) -> CoCa:
    """A tiny CoCa for tests: image 32, patch 8, widths 64, 2 layers, 9 pooler queries, ByteTokenizer text
    (context 16)."""
    cfg = dict(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
               attn_pooler_queries=9, attn_pooler_heads=4, context_length=16, vocab_size=BYTE_VOCAB_SIZE,
               text_width=64, text_heads=4, text_layers=2, multimodal_width=64, multimodal_heads=4,
               multimodal_layers=2)
    cfg.update(overrides)
    return CoCa(**cfg)
