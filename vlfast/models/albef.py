"""ALBEF pre-training model (Li et al., 2021, "Align before Fuse", arXiv:2107.07651).

Follows salesforce/ALBEF ``models/model_pretrain.py``:

* ``visual_encoder``: ViT-B/16 without head (:class:`~vlfast.models.layers.VisionTransformer`,
  ``num_classes=0``), ``vision_proj`` Linear(768 -> 256).
* ``text_encoder``: a BERT whose first ``text_layers`` (6) layers encode the text alone and
  whose last ``fusion_layers`` (6) add cross-attention to the image tokens after
  self-attention (ALBEF's ``mode='text'`` / ``mode='fusion'``), plus BERT's MLM head
  (``text_encoder.cls.predictions``, decoder tied to the word embeddings as in
  ``BertForMaskedLM``), built from the shared blocks of :mod:`vlfast.models.bert`.  Post-LN
  layers with HF BERT names where practical:
  ``text_encoder.embeddings.{word,position,token_type}_embeddings`` / ``LayerNorm``,
  ``text_encoder.encoder.layer.{i}.attention.self.{qkv,proj}`` (a fused
  :class:`vlfast.nn.Attention`; HF splits q/k/v and calls ``proj`` ``attention.output.dense``),
  ``...attention.output.LayerNorm``, ``...crossattention.self.{q,kv,proj}``
  (:class:`vlfast.nn.CrossAttention`), ``...crossattention.output.LayerNorm``,
  ``...intermediate.dense``, ``...output.{dense,LayerNorm}``.  ``text_proj`` Linear(768 -> 256).
* momentum copies ``visual_encoder_m``, ``vision_proj_m``, ``text_encoder_m``, ``text_proj_m``
  (:class:`vlfast.nn.MomentumEncoder`, m = 0.995) updated at every forward before the
  momentum features are computed (ALBEF's ``_momentum_update``).
* ``itc``: the image-text contrastive loss with queues and momentum distillation
  (:class:`vlfast.nn.ITCLoss`; its parameter ``itc.temp`` and buffers ``itc.image_queue``,
  ``itc.text_queue``, ``itc.idx_queue``, ``itc.queue_ptr``); with ``fused=False`` it runs
  :func:`vlfast.reference.albef_itc_reference` on the same queues and enqueues identically.
* ITM with hard negatives (``itm_head`` Linear(768 -> 2)) and MLM with momentum distillation.

``forward(images, input_ids, attention_mask, alpha=0.4, idx=None)`` returns
``{"loss": itc + itm + mlm, "itc", "itm", "mlm"}``.  Random draws (ITM hard negatives, drawn
with the Gumbel-max trick from the same softmax weights as ALBEF's ``torch.multinomial``,
and the MLM mask: 15 %, then 80/10/10) are counter-based: one seed per forward from the
global CPU RNG, and each draw a hash of (seed, stream, row in the global batch, column).
So eager and fused runs agree under the same ``torch.manual_seed`` (with dropout 0:
``albef_micro``; ``albef_base`` keeps BERT's dropout 0.1, whose fused and eager kernels
draw differently), and a sample's draws do not depend on how the batch is split.

Data-parallel training (``global_batch=True``, the default): the ITC's in-batch keys are
gathered from every rank (:class:`vlfast.nn.ITCLoss` ``gather=True``); ITM hard negatives
of the local rows are sampled from the global batch (the negatives' embeddings are gathered
with their gradients, as BLIP's ``all_gather_with_grad``); the per-forward seed is rank 0's
(broadcast); the MLM loss is normalized by the global number of masked tokens.  Without
dropout a step on W ranks then computes what one process computes on the global batch (the
mean of the per-rank losses equals the single-process loss, and averaged gradients equal
its gradients); every forward is collective, so all ranks must call it.  This departs from
ALBEF's per-GPU recipe on purpose (training does not change with the number of GPUs);
``global_batch=False`` keeps ALBEF's per-GPU semantics (local in-batch keys and negatives,
local normalization, no collectives except the queue's gather).

Special token ids default to :class:`~vlfast.models.tokenizer.ByteTokenizer`'s
(PAD 0, CLS 1, SEP 2, MASK 3); for ``bert-base-uncased`` ids pass ``pad_token_id=0,
cls_token_id=101, sep_token_id=102, mask_token_id=103``.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum_no_grad,
                                  broadcast_from_rank0, world_info)
from ..nn.contrastive import ITCLoss
from ..nn.ema import MomentumEncoder
from . import register_model
from .bert import BertEmbeddings, BertEncoder, BertLayer, BertOnlyMLMHead, bert_init
from .layers import VisionTransformer
from .tokenizer import CLS, MASK, NUM_SPECIAL, PAD, SEP

__all__ = ["ALBEF", "AlbefBert", "ItcItmMomentumMixin", "albef_base", "albef_micro", "convert_albef_checkpoint"]


def add_itc_itm_heads(model: nn.Module, vision_width: int, text_width: int, embed_dim: int, *, queue_size: int,
                      temp: float, alpha: float, global_batch: bool, momentum: float) -> None:
    """ALBEF's / BLIP's heads on ``model`` (which has ``visual_encoder`` and ``text_encoder``), in their
    state_dict order: ``vision_proj``, ``text_proj`` (-> ``embed_dim``), ``itm_head`` (-> 2), the ITC
    loss ``itc`` with its queues, and the momentum copies ``visual_encoder_m``, ``vision_proj_m``,
    ``text_encoder_m``, ``text_proj_m``."""
    model.vision_proj = nn.Linear(vision_width, embed_dim)
    model.text_proj = nn.Linear(text_width, embed_dim)
    model.itm_head = nn.Linear(text_width, 2)
    for m in (model.vision_proj, model.text_proj, model.itm_head):
        bert_init(m)
    model.itc = ITCLoss(embed_dim, queue_size=queue_size, temperature=temp, alpha=alpha, gather=global_batch)
    model.visual_encoder_m = MomentumEncoder(model.visual_encoder, momentum)
    model.vision_proj_m = MomentumEncoder(model.vision_proj, momentum)
    model.text_encoder_m = MomentumEncoder(model.text_encoder, momentum)
    model.text_proj_m = MomentumEncoder(model.text_proj, momentum)


class ItcItmMomentumMixin:
    """What ALBEF and BLIP share around :func:`add_itc_itm_heads`: the momentum update of the four
    momentum encoders, the parameter read outside its module's forward, and the image size."""

    def zero3_external_parameters(self):
        """Parameters read outside their module's forward (see
        :func:`vlfast.distributed.zero.register_external_parameters`): the ITM reads ``itc.temp``."""
        return [(self, self.itc.temp)]

    @property
    def image_size(self):
        return self.visual_encoder.patch_embed.img_size

    @torch.no_grad()
    def _momentum_update(self) -> None:
        self.visual_encoder_m.update(self.visual_encoder)
        self.vision_proj_m.update(self.vision_proj)
        self.text_encoder_m.update(self.text_encoder)
        self.text_proj_m.update(self.text_proj)

    def momentum_update(self, *args, **kwargs) -> None:
        """ALBEF's / BLIP's ``_momentum_update`` of the four momentum encoders (the forward's
        arguments are ignored; see :func:`vlfast.distributed.zero.hoist_momentum_updates`)."""
        self._momentum_update()


# ------------------------------------------------------------------------------------------ BERT
class AlbefBert(nn.Module):
    """ALBEF's ``BertForMaskedLM`` with the ``bert`` level flattened: ``embeddings``, ``encoder.layer``, ``cls``.

    * ``encode_text(input_ids, key_padding_mask)``: embeddings + layers ``[0, text_layers)``
      (ALBEF ``mode='text'``) -> (B, L, width).
    * ``fuse(text_embeds, key_padding_mask, image_embeds)``: layers ``[text_layers, end)`` with
      cross-attention to ``image_embeds`` (``mode='fusion'``).
    * ``forward(input_ids, key_padding_mask, image_embeds)``: both, then the MLM head -> logits
      (B, L, vocab_size).
    """

    def __init__(self, vocab_size=30522, width=768, text_layers=6, fusion_layers=6, heads=12, intermediate=3072,
                 max_positions=512, type_vocab_size=2, eps=1e-12, drop=0.1, attn_drop=0.1, encoder_width=768,
                 pad_token_id=PAD, tie_word_embeddings=True):
        super().__init__()
        self.vocab_size, self.width, self.text_layers = vocab_size, width, text_layers
        self.max_positions = max_positions
        self.embeddings = BertEmbeddings(vocab_size, width, max_positions, type_vocab_size, eps=eps, drop=drop,
                                         pad_token_id=pad_token_id)
        layers = [BertLayer(width, heads, intermediate, eps, drop, attn_drop) for _ in range(text_layers)]
        layers += [BertLayer(width, heads, intermediate, eps, drop, attn_drop, cross_kv_dim=encoder_width)
                   for _ in range(fusion_layers)]
        self.encoder = BertEncoder(layers)
        self.cls = BertOnlyMLMHead(width, vocab_size, eps)
        self.apply(bert_init)
        if tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    def encode_text(self, input_ids, key_padding_mask=None):
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer[:self.text_layers]:
            x = layer(x, key_padding_mask)
        return x

    def fuse(self, text_embeds, key_padding_mask, image_embeds):
        x = text_embeds
        for layer in self.encoder.layer[self.text_layers:]:
            x = layer(x, key_padding_mask, image_embeds)
        return x

    def forward(self, input_ids, key_padding_mask, image_embeds):
        return self.cls(self.fuse(self.encode_text(input_ids, key_padding_mask), key_padding_mask, image_embeds))


# ------------------------------------------------------------------------------------------ random draws
# Counter-based draws (MLM masks, ITM hard negatives): the uniform of (seed, stream, global row,
# column) is a hash, so a sample's draws depend on its row in the global batch only.
_S_MLM, _S_MASK80, _S_RAND50, _S_WORDS, _S_NEG_IMAGE, _S_NEG_TEXT = range(1, 7)
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``(x * c) mod 2**32`` for ``x`` in [0, 2**32) (int or int64 tensor) without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    """A 32-bit integer mix (bias-optimized ``lowbias32``) of ``x`` in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _counter_uniform(seed: int, stream: int, rows: torch.Tensor, ncols: int) -> torch.Tensor:
    """(len(rows), ncols) float32 uniforms in (0, 1), a hash of (seed, stream, row, column)."""
    base = _hash32((_hash32(seed & _M32) ^ _hash32((stream * 0x9E3779B9) & _M32)) & _M32)
    r = _hash32((rows.long() ^ base) & _M32)
    c = _hash32((torch.arange(ncols, device=rows.device, dtype=torch.long) + 0x632BE5AB) & _M32)
    h = _hash32(_hash32((r[:, None] ^ c[None, :]) & _M32) ^ (base >> 3))
    return ((h >> 8).float() + 0.5) * (2.0 ** -24)


def _sample_rows(weights: torch.Tensor, seed: int, stream: int, rows: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` (R, C), drawn with probability proportional to the weights
    (Gumbel-max on counter-based uniforms of the global ``rows``)."""
    u = _counter_uniform(seed, stream, rows, weights.shape[1])
    return (weights.log() - (-u.log()).log()).argmax(1)


def _draw_seed(shared: bool = False) -> int:
    """A 31-bit seed from the global CPU RNG; ``shared``: rank 0's, broadcast to every rank."""
    seed = torch.randint(0, 2 ** 31 - 1, (1,))
    if shared:
        seed = broadcast_from_rank0(seed)
    return int(seed)


# ------------------------------------------------------------------------------------------ ALBEF
def _concept_tokens(c: int, length: int) -> list:
    return [NUM_SPECIAL + (c * 37 + j * 11 + (j * j) % 7) % 256 for j in range(length)]


class ALBEF(ItcItmMomentumMixin, nn.Module):
    """ALBEF pre-training (ITC + ITM + MLM); see the module docstring."""

    def __init__(self, *, img_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                 vocab_size=30522, text_width=768, text_layers=6, fusion_layers=6, text_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, hidden_dropout=0.1,
                 attention_dropout=0.1, embed_dim=256, queue_size=65536, temp=0.07, momentum=0.995,
                 alpha=0.4, mlm_probability=0.15, text_len=30, tie_word_embeddings=True,
                 pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP, mask_token_id=MASK, global_batch=True):
        super().__init__()
        if not isinstance(global_batch, bool):
            raise TypeError(f"global_batch must be a bool, got {type(global_batch).__name__}")
        self.global_batch = global_batch
        if not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
        if not 2 <= text_len <= max_position_embeddings:
            raise ValueError(f"text_len must be in [2, {max_position_embeddings}], got {text_len}")
        self.vocab_size = vocab_size
        self.alpha = float(alpha)
        self.mlm_probability = float(mlm_probability)
        self.text_len = text_len
        self.pad_token_id, self.cls_token_id = pad_token_id, cls_token_id
        self.sep_token_id, self.mask_token_id = sep_token_id, mask_token_id
        for name, t in (("pad", pad_token_id), ("cls", cls_token_id), ("sep", sep_token_id),
                        ("mask", mask_token_id)):
            if not 0 <= t < vocab_size:
                raise ValueError(f"{name}_token_id {t} is outside the vocabulary ({vocab_size})")

        self.visual_encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0,
                                                embed_dim=vision_width, depth=vision_depth, num_heads=vision_heads,
                                                qkv_bias=True)
        self.text_encoder = AlbefBert(vocab_size, text_width, text_layers, fusion_layers, text_heads,
                                      intermediate_size, max_position_embeddings, type_vocab_size,
                                      drop=hidden_dropout, attn_drop=attention_dropout, encoder_width=vision_width,
                                      pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings)
        add_itc_itm_heads(self, vision_width, text_width, embed_dim, queue_size=queue_size, temp=temp, alpha=alpha,
                          global_batch=global_batch, momentum=momentum)

    # ------------------------------------------------------------------ helpers
    def _check_inputs(self, images, input_ids, attention_mask):
        pe = self.visual_encoder.patch_embed
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("images must be a floating tensor of shape (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images.shape[1] != pe.in_chans or tuple(images.shape[2:]) != pe.img_size:
            raise ValueError(f"images must have shape (B, {pe.in_chans}, {pe.img_size[0]}, {pe.img_size[1]}), "
                             f"got {tuple(images.shape)}")
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point
                or input_ids.dtype.is_complex or input_ids.dtype == torch.bool):
            raise ValueError("input_ids must be an integer tensor of shape (B, L), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else ''}")
        B, L = input_ids.shape
        if images.shape[0] != B:
            raise ValueError(f"batch sizes differ: images has {images.shape[0]}, input_ids has {B}")
        if B < 2:
            raise ValueError("ALBEF needs a batch of at least 2 (ITM samples negatives from the other pairs)")
        if L < 1 or L > self.text_encoder.max_positions:
            raise ValueError(f"text length must be in [1, {self.text_encoder.max_positions}], got {L}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"input_ids must be in [0, {self.vocab_size}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
            got = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                   else type(attention_mask).__name__)
            raise ValueError(f"attention_mask must have shape (B, L) = ({B}, {L}), got {got}")
        if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token)")
        if input_ids.device != images.device or attention_mask.device != images.device:
            raise ValueError("images, input_ids and attention_mask must be on the same device")
        if self.itc.queue_size % B:
            raise ValueError(f"the batch size ({B}) must divide queue_size ({self.itc.queue_size})")

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, seed: Optional[int] = None,
                    row_offset: int = 0):
        """BERT masking (ALBEF's ``mask``): each real, non-special token is chosen with probability
        ``mlm_probability``; chosen ones become [MASK] (80 %), a random id (10 %) or stay (10 %).
        Returns ``(masked_ids, labels)`` with labels -100 where not chosen.

        The draws are counter-based (:func:`_counter_uniform`): the uniforms of token ``j`` of
        row ``i`` are a hash of ``(seed, stream, row_offset + i, j)``, so a sample's mask depends
        on its row in the global batch, not on how the batch is split across ranks.
        ``seed`` (a 31-bit int) defaults to one draw from the global CPU RNG."""
        if seed is None:
            seed = _draw_seed()
        dev = input_ids.device
        ids = input_ids.clone()
        labels = input_ids.clone()
        rows = torch.arange(row_offset, row_offset + ids.shape[0], device=dev)
        L = ids.shape[1]

        def uniform(stream):
            return _counter_uniform(seed, stream, rows, L)

        masked = uniform(_S_MLM) < self.mlm_probability
        special = ((ids == self.pad_token_id) | (ids == self.cls_token_id) | (ids == self.sep_token_id)
                   | (ids == self.mask_token_id) | (attention_mask == 0))
        masked &= ~special
        labels[~masked] = -100
        replaced = (uniform(_S_MASK80) < 0.8) & masked
        ids[replaced] = self.mask_token_id
        rand = (uniform(_S_RAND50) < 0.5) & masked & ~replaced
        words = (uniform(_S_WORDS) * self.vocab_size).long().clamp_(max=self.vocab_size - 1)
        ids[rand] = words[rand]
        return ids, labels

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: Optional[float] = None, idx: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self._check_inputs(images, input_ids, attention_mask)
        alpha = self.alpha if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
        input_ids = input_ids.long()
        pad = attention_mask == 0
        B = images.shape[0]

        # ---- ITC
        image_embeds = self.visual_encoder.forward_features(images)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = self.text_encoder.encode_text(input_ids, pad)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            if not getattr(self, "_momentum_hoisted", False):  # else done by a pre-forward hook
                self._momentum_update()
            image_embeds_m = self.visual_encoder_m.module.forward_features(images)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_embeds_m = self.text_encoder_m.module.encode_text(input_ids, pad)
            text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0]), dim=-1)
        loss_itc = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha=float(alpha), idx=idx)

        # ---- ITM with hard negatives
        # global batch: local rows against every rank's columns (BLIP); the draws are counter-based
        # on the global row, so they do not depend on the number of ranks
        gb = self.global_batch and world_info()[1] > 1
        rank = world_info()[0] if gb else 0
        seed = _draw_seed(shared=gb)
        row_ids = torch.arange(rank * B, (rank + 1) * B, device=images.device)
        output_pos = self.text_encoder.fuse(text_embeds, pad, image_embeds)
        with torch.no_grad():
            temp = self.itc.temp  # clamped by the ITC
            # ALBEF: softmax(sim_i2t[:, :bs]), sim_i2t = image_feat @ [text_feat_m, queue].T / temp
            img_fm, txt_fm = ((all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)) if gb
                              else (image_feat_m, text_feat_m))
            weights_i2t = F.softmax((image_feat @ txt_fm.t() / temp).float(), dim=1)
            weights_t2i = F.softmax((text_feat @ img_fm.t() / temp).float(), dim=1)
            diag = (torch.arange(B, device=images.device), row_ids)
            weights_i2t[diag] = 0
            weights_t2i[diag] = 0
        neg_image = _sample_rows(weights_t2i, seed, _S_NEG_IMAGE, row_ids)  # a negative image for each text
        neg_text = _sample_rows(weights_i2t, seed, _S_NEG_TEXT, row_ids)    # a negative text for each image
        if gb:  # negatives of other ranks come with their gradients (BLIP's all_gather_with_grad)
            text_embeds_w, image_embeds_w = all_gather_with_grad(text_embeds), all_gather_with_grad(image_embeds)
            pad_w = all_gather_no_grad(pad.to(torch.uint8)).bool()
        else:
            text_embeds_w, image_embeds_w, pad_w = text_embeds, image_embeds, pad
        text_embeds_all = torch.cat([text_embeds, text_embeds_w[neg_text]], 0)
        pad_all = torch.cat([pad, pad_w[neg_text]], 0)
        image_embeds_all = torch.cat([image_embeds_w[neg_image], image_embeds], 0)
        output_neg = self.text_encoder.fuse(text_embeds_all, pad_all, image_embeds_all)
        vl_output = self.itm_head(torch.cat([output_pos[:, 0], output_neg[:, 0]], 0))
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(
            images.device)
        loss_itm = F.cross_entropy(vl_output.float(), itm_labels)

        # ---- MLM with momentum distillation
        masked_ids, labels = self.mask_tokens(input_ids, attention_mask, seed=seed, row_offset=rank * B)
        with torch.no_grad():
            logits_m = self.text_encoder_m.module(masked_ids, pad, image_embeds_m)
        logits = self.text_encoder(masked_ids, pad, image_embeds)
        sel = labels != -100
        # global batch: the token mean over all ranks' masked tokens (each rank's share times W,
        # so that the ranks' mean -- what data-parallel gradient averaging takes -- is that mean)
        if gb:
            n_masked = all_reduce_sum_no_grad(sel.sum()).clamp(min=1) / world_info()[1]
        else:
            n_masked = sel.sum().clamp(min=1)
        logp = F.log_softmax(logits.float(), dim=-1)
        ce = F.nll_loss(logp.view(-1, self.vocab_size), labels.view(-1), ignore_index=-100, reduction="sum")
        soft = -(logp * F.softmax(logits_m.float(), dim=-1)).sum(-1)
        distill = (soft * sel).sum()
        loss_mlm = ((1.0 - alpha) * ce + alpha * distill) / n_masked

        return {"loss": loss_itc + loss_itm + loss_mlm, "itc": loss_itc, "itm": loss_itm, "mlm": loss_mlm}

    # ------------------------------------------------------------------ data
    def synthetic_batch(self, batch_size: int, *, device=None, generator: Optional[torch.Generator] = None):
        """A learnable synthetic batch: each sample draws one of 8 concepts; its image is the
        concept's fixed random pattern plus noise, its text ``[CLS] <concept's byte tokens> [SEP]``
        right-padded to ``text_len`` (ids < 261, valid for every vocabulary here)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n_concepts = 8
        pe = self.visual_encoder.patch_embed
        H, W = pe.img_size
        proto = torch.randn(n_concepts, pe.in_chans, H, W, generator=torch.Generator().manual_seed(1234))
        c = torch.randint(n_concepts, (batch_size,), generator=generator)
        images = proto[c] + 0.5 * torch.randn(batch_size, pe.in_chans, H, W, generator=generator)
        L = self.text_len
        ids = torch.full((batch_size, L), self.pad_token_id, dtype=torch.long)
        for i, ci in enumerate(c.tolist()):
            n = max(1, min(L - 2, 3 + (ci * 5) % max(1, L - 4)))
            seq = [self.cls_token_id] + _concept_tokens(ci, n) + [self.sep_token_id]
            ids[i, :len(seq)] = torch.tensor(seq)
        mask = torch.zeros_like(ids)
        for i in range(batch_size):
            mask[i, :int((ids[i] != self.pad_token_id).sum())] = 1
        if int(ids.max()) >= self.vocab_size:
            ids = ids.clamp(max=self.vocab_size - 1)
        return {"images": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ------------------------------------------------------------------------------------------ checkpoints
_MOMENTUM = ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m")


def convert_albef_checkpoint(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a salesforce/ALBEF pre-training ``state_dict`` (``checkpoint["model"]``) to :class:`ALBEF`'s names.

    * ``text_encoder[_m].bert.*`` -> ``text_encoder[_m].*``; HF's separate ``query`` / ``key`` /
      ``value`` are concatenated into ``attention.self.qkv`` (cross-attention: ``query`` ->
      ``crossattention.self.q``, ``key`` + ``value`` -> ``crossattention.self.kv``);
      ``*.output.dense`` of (cross-)attention -> ``*.self.proj``; ``position_ids`` and
      ``cls.predictions.decoder.bias`` (an alias of ``cls.predictions.bias``) are dropped.
    * momentum networks ``X_m.*`` -> ``X_m.module.*``.
    * ``temp``, ``image_queue``, ``text_queue`` ((256, K) as ALBEF stores them: transposed on load by
      :class:`vlfast.nn.ITCLoss`), ``queue_ptr`` -> ``itc.*``; ``itc.idx_queue`` is added (-100).

    The result loads with ``model.load_state_dict(out)``.
    """
    out: Dict[str, torch.Tensor] = {}
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k in ("temp", "image_queue", "text_queue", "queue_ptr"):
            out["itc." + k] = t
            continue
        head, _, rest = k.partition(".")
        if head in _MOMENTUM:
            head = head + ".module"
        if head.startswith("text_encoder"):
            if rest.startswith("bert."):
                rest = rest[len("bert."):]
            if rest.endswith("position_ids") or rest == "cls.predictions.decoder.bias":
                continue
            for att, q_name in (("attention", "qkv"), ("crossattention", "kv")):
                for part in ("query", "key", "value"):
                    tag = f".{att}.self.{part}."
                    if tag in rest:
                        pre, _, leaf = rest.partition(tag)
                        if att == "crossattention" and part == "query":
                            rest = f"{pre}.{att}.self.q.{leaf}"
                            break
                        slot = f"{head}.{pre}.{att}.self.{q_name}.{leaf}"
                        pending.setdefault(slot, {})[part] = t
                        rest = None
                        break
                if rest is None:
                    break
                rest = rest.replace(f".{att}.output.dense.", f".{att}.self.proj.")
            if rest is None:
                continue
        out[f"{head}.{rest}" if rest else head] = t
    for slot, parts in pending.items():
        order = ("query", "key", "value") if slot.split(".")[-2] == "qkv" else ("key", "value")
        missing = [p for p in order if p not in parts]
        if missing:
            raise ValueError(f"checkpoint lacks the {missing} projection(s) of {slot}")
        out[slot] = torch.cat([parts[p] for p in order], 0)
    if "itc.image_queue" in out and "itc.idx_queue" not in out:
        q = out["itc.image_queue"]
        out["itc.idx_queue"] = torch.full((q.shape[-1],), -100, dtype=torch.long, device=q.device)
    return out


# ------------------------------------------------------------------------------------------ registry
@register_model("albef_base")
def albef_base(**overrides) -> ALBEF:
    """ALBEF pre-training: ViT-B/16 (224) + 6 text and 6 fusion BERT-base layers (vocab 30522), 256-d ITC
    with 65536-entry queues, momentum 0.995, BERT dropout 0.1."""
    return ALBEF(**overrides)


@register_model("albef_micro")
def albef_micro(**overrides) -> ALBEF:
    """A tiny ALBEF for tests and CPU: 32x32 images (patch 8, width 64, 2 blocks), byte vocabulary (261),
    2 text + 2 fusion layers of width 64, 32-d ITC with a 64-entry queue, no dropout."""
    cfg = dict(img_size=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=4, vocab_size=NUM_SPECIAL + 256,
               text_width=64, text_layers=2, fusion_layers=2, text_heads=4, intermediate_size=128,
               max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, embed_dim=32, queue_size=64,
               text_len=16)
    cfg.update(overrides)
    return ALBEF(**cfg)
