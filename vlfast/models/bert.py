"""BERT building blocks (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers
for Language Understanding", arXiv:1810.04805) with Hugging Face ``transformers``' parameter names,
shared by the ALBEF (:mod:`vlfast.models.albef`) and ViLT (:mod:`vlfast.models.vilt`) models.

* :class:`BertEmbeddings`: ``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``,
  ``LayerNorm`` (and a dropout) -- HF ``BertEmbeddings``.
* :class:`BertLayer`: a post-LN encoder layer, ``attention.{self, output}``, optional
  ``crossattention.{self, output}``, ``intermediate.dense``, ``output.{dense, LayerNorm}``.  The
  attention is :class:`vlfast.nn.Attention` / :class:`vlfast.nn.CrossAttention` (fused q/k/v as
  ``qkv`` / ``q`` + ``kv``, HF's ``attention.output.dense`` is their ``proj``), so the ``fused``
  flag of :func:`vlfast.models.set_fused` reaches it.
* :class:`BertLMPredictionHead` (``transform.{dense, LayerNorm}``, ``decoder``, ``bias``) and
  :class:`BertOnlyMLMHead` (``predictions``): the masked-language-model head.
* :func:`bert_init`: HF BERT's ``_init_weights``.

Shapes: token ids (B, L) int64 -> hidden states (B, L, width) in the parameters' dtype;
key padding masks (B, L) bool, True = padding.
"""

from typing import Optional

import torch
from torch import nn

from ..nn.attention import Attention, CrossAttention

__all__ = ["BertEmbeddings", "BertAttention", "BertIntermediate", "BertOutput", "BertLayer", "BertEncoder",
           "BertPredictionHeadTransform", "BertLMPredictionHead", "BertOnlyMLMHead", "bert_init"]


def bert_init(module: nn.Module) -> None:
    """HF BERT's ``_init_weights`` (ALBEF's and ViLT's ``init_weights``): normal(0, 0.02) Linear and
    Embedding weights, zero biases and padding row, unit LayerNorm.  Use with ``module.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertEmbeddings(nn.Module):
    """``dropout(LayerNorm(word(ids) + position(arange(L)) + token_type(0)))`` (HF ``BertEmbeddings``);
    ``type_vocab_size=0`` drops the token-type term and its parameter (BLIP's text embeddings).

    ``forward(input_ids)``: (B, L) int64 with L <= ``max_positions`` -> (B, L, width).
    """

    def __init__(self, vocab_size: int, width: int, max_positions: int, type_vocab_size: int = 2, *,
                 eps: float = 1e-12, drop: float = 0.0, pad_token_id: int = 0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, width)
        # type_vocab_size=0: no token types (BLIP's med.py BertEmbeddings, HF BlipTextEmbeddings)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width) if type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(drop)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _AddNorm(nn.Module):
    """``LayerNorm(dropout(h) + residual)`` (HF ``BertSelfOutput`` without its dense, which is ``proj``)."""

    def __init__(self, width: int, eps: float, drop: float):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(drop)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(h) + residual)


class BertAttention(nn.Module):
    """``self``: self-attention (:class:`vlfast.nn.Attention`), or cross-attention to a
    ``kv_dim``-wide context (:class:`vlfast.nn.CrossAttention`); ``output``: add & LayerNorm."""

    def __init__(self, width: int, heads: int, eps: float, drop: float, attn_drop: float,
                 kv_dim: Optional[int] = None):
        super().__init__()
        if kv_dim is None:
            self.self = Attention(width, num_heads=heads, qkv_bias=True, attn_drop=attn_drop)
        else:
            self.self = CrossAttention(width, num_heads=heads, kv_dim=kv_dim, qkv_bias=True, attn_drop=attn_drop)
        self.output = _AddNorm(width, eps, drop)


class BertIntermediate(nn.Module):
    """``GELU(dense(x))``, width -> intermediate."""

    def __init__(self, width: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(width, inter)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)``, intermediate -> width."""

    def __init__(self, inter: int, width: int, eps: float, drop: float):
        super().__init__()
        self.dense = nn.Linear(inter, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(drop)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    """Post-LN BERT layer: self-attn -> add&LN -> [cross-attn -> add&LN] -> FFN (GELU) -> add&LN.

    ``forward(x, key_padding_mask=None, image_embeds=None)``: x (B, L, width), key_padding_mask
    (B, L) bool (True = padding, for the self-attention), image_embeds (B, Nk, cross_kv_dim)
    (required by cross-attention layers) -> (B, L, width).
    """

    def __init__(self, width: int, heads: int, inter: int, eps: float, drop: float, attn_drop: float,
                 cross_kv_dim: Optional[int] = None):
        super().__init__()
        self.attention = BertAttention(width, heads, eps, drop, attn_drop)
        self.has_cross_attention = cross_kv_dim is not None
        if self.has_cross_attention:
            self.crossattention = BertAttention(width, heads, eps, drop, attn_drop, kv_dim=cross_kv_dim)
        self.intermediate = BertIntermediate(width, inter)
        self.output = BertOutput(inter, width, eps, drop)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, key_padding_mask=key_padding_mask), x)
        if self.has_cross_attention:
            x = self.crossattention.output(self.crossattention.self(x, image_embeds), x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The ``layer`` list of HF ``BertEncoder`` (callers run the layers they need)."""

    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertPredictionHeadTransform(nn.Module):
    """``LayerNorm(GELU(dense(x)))``, width -> width."""

    def __init__(self, width: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """``decoder(transform(x)) + bias``: (..., width) -> (..., vocab_size) logits; ``decoder`` has no
    bias of its own and may be tied to the word embeddings (``BertForMaskedLM``)."""

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.transform = BertPredictionHeadTransform(width, eps)
        self.decoder = nn.Linear(width, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class BertOnlyMLMHead(nn.Module):
    """HF ``BertOnlyMLMHead``: ``predictions`` (:class:`BertLMPredictionHead`)."""

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.predictions = BertLMPredictionHead(width, vocab_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)
