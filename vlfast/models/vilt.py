"""ViLT (Kim et al., 2021, arXiv:2102.03334): a single-stream vision-and-language transformer.

Text tokens (BERT embeddings: word + position + token type, LayerNorm) and image patch
tokens (ViT patch embedding + class token + position embedding) each get a
modality-type embedding (text 0, image 1), are concatenated and run through one ViT
encoder (:class:`vlfast.models.layers.Block`, pre-norm, LayerNorm eps 1e-6) with a key
padding mask from the text ``attention_mask``.  A pooler (dense + tanh on the first
token, the text ``[CLS]``) feeds the image-text matching head; the masked language
modelling head predicts vocabulary logits on text positions.

* ``vilt_base_patch32``: ViT-B/32 backbone (width 768, 12 layers, 12 heads, patch 32)
  at ViLT's pretraining resolution 384 (144 patches, position embedding 1 + 144), BERT
  vocabulary 30522, 40 text positions.
* ``vilt_micro``: image 32, patch 8, width 64, 2 layers, ByteTokenizer vocabulary 261,
  16 text positions.

Parameter names follow ViLT's ``ViLTransformerSS``: ``text_embeddings.{word_embeddings,
position_embeddings, token_type_embeddings, LayerNorm}``, ``token_type_embeddings``
(modality), ``transformer.{patch_embed.proj, cls_token, pos_embed, blocks.{i}.*, norm}``
(timm names), ``pooler.dense``, ``itm_score.fc``, ``mlm_score.{transform.dense,
transform.LayerNorm, decoder, bias}`` (the BERT embeddings and MLM head are the shared blocks of
:mod:`vlfast.models.bert`).

Pretraining objectives as ViLT (two encoder passes per step, as ViLT's ``compute_mlm`` and
``compute_itm_wpa`` each call ``infer``):

* MLM: BERT's 15% masking with the 80/10/10 rule (HF ``DataCollatorForLanguageModeling``,
  which ViLT uses) on non-special real text tokens, drawn from torch's global RNG inside
  ``forward``; cross-entropy over the masked positions, with the images unchanged.
* ITM: half of the pairs (``B // 2``) become negatives by pairing the text with another
  image of the batch (ViLT draws a separate "false image" from the dataset); labels and
  the image permutation come from ``torch.randperm`` on the global RNG.  ViLT's word-patch
  alignment (WPA, optimal transport) term is not implemented.

Draw order in ``forward`` (same in eager and fused mode): MLM ``bernoulli(0.15)``,
``bernoulli(0.8)``, ``bernoulli(0.5)``, ``randint(vocab)``; then ITM ``randperm(B)``
(labels) and ``randperm(B)`` (image partners).

``fused`` switches: every attention (:class:`vlfast.nn.Attention`, fused op vs plain math)
and the MLM head (:class:`MLMHead`: fused computes the vocabulary logits only at masked
positions; eager, as ViLT, on every text position and then ignores unmasked labels).
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model
from .bert import BertEmbeddings, BertLMPredictionHead, bert_init
from .clip import check_text, random_captions
from .layers import Block, PatchEmbed, init_weights as vit_init_weights
from .tokenizer import CLS, MASK, PAD, SEP, VOCAB_SIZE as BYTE_VOCAB_SIZE, ByteTokenizer

__all__ = ["ViLT", "MLMHead", "vilt_base_patch32", "vilt_micro", "mask_tokens"]

IGNORE = -100


class ViTEncoder(nn.Module):
    """The timm ViT inside ViLT (``transformer``): patch embedding, class token, position
    embedding, blocks and final norm (no head)."""

    def __init__(self, img_size, patch_size, in_chans, width, depth, heads, mlp_ratio, drop):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, width)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, qkv_bias=True, proj_drop=drop)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(vit_init_weights)

    def visual_embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.pos_drop(x)


class Pooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.activation = nn.Tanh()

    def forward(self, x):
        return self.activation(self.dense(x[:, 0]))


class ITMHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc(x)


class MLMHead(BertLMPredictionHead):
    """BERT's prediction head (ViLT ``heads.MLMHead``): transform, ``decoder`` (no bias), ``bias``.

    ``loss(text_feats, labels)``: cross-entropy of the vocabulary logits against ``labels``
    (``-100`` = not predicted), the mean over predicted positions (0 when there are none).
    ``fused=True`` transforms and decodes only the predicted positions; ``fused=False``
    decodes every text position as ViLT does.
    """

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__(hidden, vocab_size, eps=1e-12)
        #: False decodes every text position (the eager baseline); see ``vlfast.models.set_fused``
        self.fused = True

    def loss(self, text_feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.fused:
            sel = labels != IGNORE
            logits = self(text_feats[sel])
            if logits.shape[0] == 0:
                return logits.sum() * 0.0
            return F.cross_entropy(logits.float(), labels[sel])
        logits = self(text_feats)
        if not bool((labels != IGNORE).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE)


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, vocab_size: int, mask_token_id: int,
                mlm_probability: float = 0.15):
    """BERT's masking (HF ``DataCollatorForLanguageModeling.torch_mask_tokens``) on torch's global RNG.

    ``special`` (B, L) bool marks tokens never masked (special tokens, padding).  Returns
    ``(masked_ids, labels)`` with labels ``-100`` where not masked.  Draw order:
    ``bernoulli(p)``, ``bernoulli(0.8)``, ``bernoulli(0.5)``, ``randint(vocab_size)``.
    """
    labels = input_ids.clone()
    prob = torch.full(input_ids.shape, mlm_probability, device=input_ids.device)
    prob.masked_fill_(special, 0.0)
    masked = torch.bernoulli(prob).bool()
    labels[~masked] = IGNORE
    replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=input_ids.device)).bool() & masked
    ids = input_ids.clone()
    ids[replaced] = mask_token_id
    rand = torch.bernoulli(torch.full(input_ids.shape, 0.5, device=input_ids.device)).bool() & masked & ~replaced
    words = torch.randint(vocab_size, input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    ids[rand] = words[rand]
    return ids, labels


class ViLT(nn.Module):
    """ViLT for pretraining (MLM + ITM).

    ``forward(images, input_ids, attention_mask=None)`` -> ``{"loss": itm + mlm, "itm", "mlm"}``.
    Images (B, C, H, W) of the configured size; input_ids (B, L), L <= ``max_text_len``,
    ids in ``[0, vocab_size)``; attention_mask (B, L), 1 = real token.  Bad shapes, ids
    or batch sizes raise ``ValueError``.  ``infer(images, input_ids, attention_mask)`` returns
    the encoder's ``(text_feats, image_feats, cls_feats)``.
    """

    def __init__(self, img_size: int = 384, patch_size: int = 32, in_chans: int = 3, hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, vocab_size: int = 30522,
                 max_text_len: int = 40, drop_rate: float = 0.1, pad_token_id: int = 0, cls_token_id: int = 101,
                 sep_token_id: int = 102, mask_token_id: int = 103, mlm_probability: float = 0.15):
        super().__init__()
        self.vocab_size, self.max_text_len = vocab_size, max_text_len
        self.pad_token_id, self.cls_token_id, self.sep_token_id = pad_token_id, cls_token_id, sep_token_id
        self.mask_token_id, self.mlm_probability = mask_token_id, mlm_probability
        self.text_embeddings = BertEmbeddings(vocab_size, hidden_size, max_text_len, pad_token_id=pad_token_id,
                                              drop=drop_rate)
        self.text_embeddings.apply(bert_init)
        self.token_type_embeddings = nn.Embedding(2, hidden_size)
        self.token_type_embeddings.apply(bert_init)
        self.transformer = ViTEncoder(img_size, patch_size, in_chans, hidden_size, num_layers, num_heads, mlp_ratio,
                                      drop_rate)
        self.pooler = Pooler(hidden_size)
        self.itm_score = ITMHead(hidden_size)
        self.mlm_score = MLMHead(hidden_size, vocab_size)
        for m in (self.pooler, self.itm_score, self.mlm_score):
            m.apply(bert_init)

    # ------------------------------------------------------------------ encoder
    def _check(self, images, input_ids, attention_mask):
        pe = self.transformer.patch_embed
        pe_ok = isinstance(images, torch.Tensor) and images.dim() == 4
        if not pe_ok:
            raise ValueError(f"images must have shape (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images.shape[1] != pe.in_chans or tuple(images.shape[2:]) != pe.img_size:
            pe(images[:0])  # raises PatchEmbed's ValueError
        return check_text(input_ids, attention_mask, self.vocab_size, self.max_text_len, batch_size=images.shape[0])

    def infer(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        text_mask = self._check(images, input_ids, attention_mask)
        return self._infer(images, input_ids, text_mask)

    def _infer(self, images, input_ids, text_mask):
        text = self.text_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        image = self.transformer.visual_embed(images) + self.token_type_embeddings.weight[1]
        x = torch.cat([text, image], dim=1)
        L, Ni = text.shape[1], image.shape[1]
        kpm = None
        if not bool(text_mask.all()):
            kpm = torch.cat([~text_mask, torch.zeros(images.shape[0], Ni, dtype=torch.bool, device=x.device)], 1)
        for blk in self.transformer.blocks:
            x = blk(x, key_padding_mask=kpm)
        x = self.transformer.norm(x)
        return x[:, :L], x[:, L:], self.pooler(x)

    # ------------------------------------------------------------------ objectives
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        text_mask = self._check(images, input_ids, attention_mask)
        B = images.shape[0]
        # MLM: masked text, true images
        special = ~text_mask | (input_ids == self.pad_token_id) | (input_ids == self.cls_token_id) \
            | (input_ids == self.sep_token_id)
        masked_ids, labels = mask_tokens(input_ids, special, self.vocab_size, self.mask_token_id,
                                         self.mlm_probability)
        text_feats, _, _ = self._infer(images, masked_ids, text_mask)
        mlm = self.mlm_score.loss(text_feats, labels)
        # ITM: B // 2 negatives, their images taken from other pairs of the batch
        n_neg = B // 2
        itm_labels = torch.cat([torch.ones(B - n_neg), torch.zeros(n_neg)]).long()
        itm_labels = itm_labels[torch.randperm(B)].to(images.device)
        partner = torch.randperm(B)
        partner = torch.where(partner == torch.arange(B), (partner + 1) % B, partner).to(images.device)
        idx = torch.where(itm_labels.bool(), torch.arange(B, device=images.device), partner)
        _, _, cls_feats = self._infer(images[idx], input_ids, text_mask)
        itm = F.cross_entropy(self.itm_score(cls_feats).float(), itm_labels)
        return {"loss": itm + mlm, "itm": itm, "mlm": mlm}

    @torch.no_grad()
    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Random images and captions: ByteTokenizer random-word captions when the vocabulary is
        the byte tokenizer's (261), else ``[CLS] random ids [SEP]`` of random lengths, right-padded.
        Drawn on the CPU from ``generator`` (default: the global generator), then moved to ``device``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        pe = self.transformer.patch_embed
        images = torch.randn(batch_size, pe.in_chans, *pe.img_size, generator=generator)
        L = self.max_text_len
        if self.vocab_size == BYTE_VOCAB_SIZE:
            ids, mask = ByteTokenizer()(random_captions(batch_size, generator, max_words=max(1, L // 3)), L)
        else:
            lengths = torch.randint(3, L + 1, (batch_size,), generator=generator)
            low = max(self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id) + 1
            ids = torch.randint(low, self.vocab_size, (batch_size, L), generator=generator)
            pos = torch.arange(L).expand(batch_size, L)
            ids[:, 0] = self.cls_token_id
            ids[pos == (lengths - 1)[:, None]] = self.sep_token_id
            mask = (pos < lengths[:, None]).long()
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_token_id))
        return {"images": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


@register_model("vilt_base_patch32")
def vilt_base_patch32(**overrides) -> ViLT:
    """ViLT-B/32 at 384 x 384 (144 patches), BERT vocabulary 30522, 40 text tokens."""
    cfg = dict(img_size=384, patch_size=32, hidden_size=768, num_layers=12, num_heads=12, vocab_size=30522,
               max_text_len=40, drop_rate=0.1, pad_token_id=0, cls_token_id=101, sep_token_id=102,
               mask_token_id=103)
    cfg.update(overrides)
    return ViLT(**cfg)


@register_model("vilt_micro")
def vilt_micro(**overrides) -> ViLT:
    """A tiny ViLT for tests: image 32, patch 8, width 64, 2 layers, ByteTokenizer text (16 tokens), no dropout."""
    cfg = dict(img_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, vocab_size=BYTE_VOCAB_SIZE,
               max_text_len=16, drop_rate=0.0, pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP,
               mask_token_id=MASK)
    cfg.update(overrides)
    return ViLT(**cfg)
