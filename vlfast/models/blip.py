"""BLIP pre-training model (Li et al., 2022, "BLIP: Bootstrapping Language-Image Pre-training for
Unified Vision-Language Understanding and Generation", arXiv:2201.12086).

Follows LAVIS ``lavis/models/blip_models/blip_pretrain.py`` (``BlipPretrain``, the same recipe as
salesforce/BLIP ``models/blip_pretrain.py``), with the module names of those repositories:

* ``visual_encoder``: ViT-B/16 without head (:class:`~vlfast.models.layers.VisionTransformer`,
  ``num_classes=0``, timm names, LayerNorm eps 1e-6 as BLIP's ``models/vit.py``);
  ``vision_proj`` Linear(768 -> 256).
* ``text_encoder`` (:class:`BlipTextModel`, BLIP's ``med.BertModel`` without pooler): word and
  position embeddings (no token types), 12 post-LN BERT layers, each with self-attention and a
  cross-attention to the image tokens.  ``mode='text'`` (ITC) skips the cross-attention;
  ``mode='multimodal'`` (ITM) runs it.  Layer names as :mod:`vlfast.models.bert`
  (``attention.self.qkv`` / ``proj`` fused, ``crossattention.self.q`` / ``kv`` / ``proj``, HF's
  ``query``/``key``/``value`` and ``output.dense`` converted by :func:`convert_hf_blip_checkpoint`).
  ``text_proj`` Linear(768 -> 256), ``itm_head`` Linear(768 -> 2).
* ``text_decoder`` (:class:`BlipTextLMHeadModel`, ``med.BertLMHeadModel``): ``bert`` + ``cls``
  (BERT's LM head).  As in BLIP's ``tie_encoder_decoder_weights(..., skip_key='/attention')``, the
  decoder shares every parameter with the text encoder except its self-attention blocks
  (``text_decoder.bert.encoder.layer.{i}.attention.*``, causal) and the LM head: ``bert.embeddings``
  and each layer's ``crossattention`` / ``intermediate`` / ``output`` are the encoder's modules
  (the state_dict lists them under both prefixes, as BLIP's checkpoints do).  The LM head's
  ``decoder.weight`` is tied to the word embeddings (LAVIS's tying direction, and HF's).
* momentum copies ``visual_encoder_m``, ``vision_proj_m``, ``text_encoder_m``, ``text_proj_m``
  (:class:`vlfast.nn.MomentumEncoder`, m = 0.995), updated at every forward first.
* ``itc``: image-text contrastive loss with queues and momentum distillation
  (:class:`vlfast.nn.ITCLoss`: ``itc.temp``, ``itc.image_queue``, ``itc.text_queue``,
  ``itc.idx_queue``, ``itc.queue_ptr``), the same as ALBEF's.

Losses of ``forward(images, input_ids, attention_mask, alpha=0.4, idx=None)`` ->
``{"loss": itc + itm + lm, "itc", "itm", "lm"}`` (0-dim fp32):

* ITC on ``[CLS]`` of the unimodal text encoder and of the image.
* ITM: the text with ``[ENC]`` in place of ``[CLS]`` through the whole encoder with
  cross-attention; for each image a hard negative text and for each text a hard negative image,
  drawn with weights ``softmax(sim[:, :B]) + 1e-4`` (diagonal 0; ``sim`` against the momentum
  features, as BLIP), by the counter-based Gumbel-max draws of :mod:`vlfast.models.albef`
  (``torch.manual_seed`` makes eager and fused runs draw the same); cross-entropy over (B
  positives, 2B negatives).
* LM: the decoder reads the text with ``[DEC]`` (``bos_token_id``) in place of ``[CLS]`` under a
  causal mask plus key padding, cross-attends to the image tokens, and predicts token t+1 from
  tokens <= t: ``CE(logits[:, :-1], targets[:, 1:], label_smoothing=0.1)`` averaged over the
  targets that are not -100 (padding and the first ``prompt_length`` tokens, as BLIP).

Data-parallel training follows ALBEF's ``global_batch`` semantics (see :mod:`vlfast.models.albef`):
``global_batch=True`` gathers the ITC's in-batch keys, samples ITM negatives from the global batch
(other ranks' image embeddings with their gradients, their texts as token ids), broadcasts rank 0's
seed and normalizes the LM loss by the global number of targets; ``global_batch=False`` is BLIP's
per-GPU recipe.

``generate(images, max_length=30, min_length=1, num_beams=1, input_ids=None)``: greedy captioning
-> int64 (B, <= max_length) token ids starting with ``[DEC]`` and ending at ``[SEP]`` (shorter
captions padded with ``pad_token_id``).

Special token ids default to :class:`~vlfast.models.tokenizer.ByteTokenizer`'s (PAD 0, CLS 1,
SEP 2) with ``[DEC]`` = ``vocab_size - 2`` and ``[ENC]`` = ``vocab_size - 1`` (BLIP's tokenizer
adds exactly these two to bert-base-uncased: 30522 and 30523 of 30524); for bert-base-uncased ids
pass ``cls_token_id=101, sep_token_id=102``.

Parameter count of ``blip_base`` (224x224 images): 252,441,919 trainable = 85,798,656 (ViT) +
137,258,496 (text encoder) + 28,989,500 (decoder: 12 self-attention blocks x 2,363,904 + LM head
622,652 without its tied matrix) + 393,728 (projections) + 1,538 (ITM head) + 1 (temp); momentum
copies 223,450,880 (frozen).  The HF counts from their default configs (384x384 images: 291,840 more
position-embedding parameters): ``BlipForImageTextRetrieval`` 223,744,258 (vision + text encoder +
heads, no decoder); ``BlipForConditionalGeneration`` 223,971,644 (vision + decoder with its own copy
of everything the decoder shares here).  So ours = retrieval - 291,840 + 28,366,848 + 622,652 + 1.
salesforce/BLIP's own ``blip_pretrain.py`` ties in the other direction, which leaves its LM head's
``decoder.weight`` untied (+23,442,432); ``tie_word_embeddings=False`` builds that variant.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum_no_grad, world_info)
from . import register_configs
from .albef import (_S_NEG_IMAGE, _S_NEG_TEXT, ItcItmMomentumMixin, _concept_tokens, _draw_seed, _sample_rows,
                    add_itc_itm_heads)
from .bert import BertAttention, BertEmbeddings, BertEncoder, BertLayer, BertOnlyMLMHead, bert_init
from .layers import VisionTransformer
from .tokenizer import CLS, NUM_SPECIAL, PAD, SEP

__all__ = ["BLIP", "BlipTextModel", "BlipTextLMHeadModel", "BlipDecoderLayer", "convert_hf_blip_checkpoint"]


# ------------------------------------------------------------------------------------------ text
def _self_block(attention: BertAttention, x, pad, causal: bool):
    return attention.output(attention.self(x, is_causal=causal, key_padding_mask=pad), x)


class BlipTextModel(nn.Module):
    """BLIP's text encoder (``med.BertModel``, ``add_pooling_layer=False``): ``embeddings`` (word +
    position, no token types) and ``encoder.layer`` (every layer with cross-attention).

    ``forward(input_ids, key_padding_mask=None, image_embeds=None)``: input_ids (B, L) int64,
    key_padding_mask (B, L) bool (True = padding), image_embeds (B, Nk, encoder_width) or None
    (``mode='text'``: the cross-attention is skipped) -> (B, L, width).
    """

    def __init__(self, vocab_size=30524, width=768, layers=12, heads=12, intermediate=3072, max_positions=512,
                 eps=1e-12, drop=0.1, attn_drop=0.1, encoder_width=768, pad_token_id=PAD):
        super().__init__()
        self.vocab_size, self.width, self.max_positions = vocab_size, width, max_positions
        self.embeddings = BertEmbeddings(vocab_size, width, max_positions, 0, eps=eps, drop=drop,
                                         pad_token_id=pad_token_id)
        self.encoder = BertEncoder([BertLayer(width, heads, intermediate, eps, drop, attn_drop,
                                              cross_kv_dim=encoder_width) for _ in range(layers)])
        self.apply(bert_init)

    def forward(self, input_ids, key_padding_mask=None, image_embeds=None):
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = _self_block(layer.attention, x, key_padding_mask, False)
            if image_embeds is not None:
                x = layer.crossattention.output(layer.crossattention.self(x, image_embeds), x)
            x = layer.output(layer.intermediate(x), x)
        return x


class BlipDecoderLayer(nn.Module):
    """A decoder layer: its own causal self-attention ``attention``; ``crossattention``,
    ``intermediate`` and ``output`` are the given encoder layer's modules (shared parameters)."""

    def __init__(self, encoder_layer: BertLayer, width: int, heads: int, eps: float, drop: float, attn_drop: float):
        super().__init__()
        self.attention = BertAttention(width, heads, eps, drop, attn_drop)
        self.crossattention = encoder_layer.crossattention
        self.intermediate = encoder_layer.intermediate
        self.output = encoder_layer.output

    def forward(self, x, key_padding_mask, image_embeds):
        x = _self_block(self.attention, x, key_padding_mask, True)
        x = self.crossattention.output(self.crossattention.self(x, image_embeds), x)
        return self.output(self.intermediate(x), x)


class _DecoderBert(nn.Module):
    def __init__(self, embeddings: nn.Module, layers):
        super().__init__()
        self.embeddings = embeddings
        self.encoder = BertEncoder(layers)


class BlipTextLMHeadModel(nn.Module):
    """BLIP's text decoder (``med.BertLMHeadModel``) sharing ``encoder``'s parameters except the
    self-attention blocks: ``bert.embeddings`` (the encoder's), ``bert.encoder.layer``
    (:class:`BlipDecoderLayer`), ``cls`` (LM head, ``decoder.weight`` tied to the word embeddings
    when ``tie_word_embeddings``).

    ``forward(input_ids, key_padding_mask, image_embeds)`` -> logits (B, L, vocab_size): causal
    self-attention with key padding, cross-attention to ``image_embeds`` (B, Nk, encoder_width).
    """

    def __init__(self, encoder: BlipTextModel, heads=12, eps=1e-12, drop=0.1, attn_drop=0.1,
                 tie_word_embeddings=True):
        super().__init__()
        layers = [BlipDecoderLayer(layer, encoder.width, heads, eps, drop, attn_drop)
                  for layer in encoder.encoder.layer]
        for layer in layers:
            layer.attention.apply(bert_init)
        self.bert = _DecoderBert(encoder.embeddings, layers)
        self.cls = BertOnlyMLMHead(encoder.width, encoder.vocab_size, eps)
        self.cls.apply(bert_init)
        if tie_word_embeddings:
            self.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight

    def hidden_states(self, input_ids, key_padding_mask, image_embeds):
        x = self.bert.embeddings(input_ids)
        for layer in self.bert.encoder.layer:
            x = layer(x, key_padding_mask, image_embeds)
        return x

    def forward(self, input_ids, key_padding_mask, image_embeds):
        return self.cls(self.hidden_states(input_ids, key_padding_mask, image_embeds))


# ------------------------------------------------------------------------------------------ BLIP
def _int_ids(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


class BLIP(ItcItmMomentumMixin, nn.Module):
    """BLIP pre-training (ITC + ITM + LM); see the module docstring."""

    def __init__(self, *, img_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                 vocab_size=30524, text_width=768, text_layers=12, text_heads=12, intermediate_size=3072,
                 max_position_embeddings=512, hidden_dropout=0.1, attention_dropout=0.1, embed_dim=256,
                 queue_size=57600, temp=0.07, momentum=0.995, alpha=0.4, label_smoothing=0.1, text_len=30,
                 prompt_length=0, tie_word_embeddings=True, pad_token_id=PAD, cls_token_id=CLS,
                 sep_token_id=SEP, bos_token_id=None, enc_token_id=None, global_batch=True):
        super().__init__()
        if not isinstance(global_batch, bool):
            raise TypeError(f"global_batch must be a bool, got {type(global_batch).__name__}")
        self.global_batch = global_batch
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 2 <= text_len <= max_position_embeddings:
            raise ValueError(f"text_len must be in [2, {max_position_embeddings}], got {text_len}")
        if not 0 <= prompt_length < text_len:
            raise ValueError(f"prompt_length must be in [0, text_len={text_len}), got {prompt_length}")
        self.vocab_size = vocab_size
        self.alpha = float(alpha)
        self.label_smoothing = float(label_smoothing)
        self.text_len, self.prompt_length = text_len, prompt_length
        bos_token_id = vocab_size - 2 if bos_token_id is None else bos_token_id
        enc_token_id = vocab_size - 1 if enc_token_id is None else enc_token_id
        self.pad_token_id, self.cls_token_id, self.sep_token_id = pad_token_id, cls_token_id, sep_token_id
        self.bos_token_id, self.enc_token_id = bos_token_id, enc_token_id
        for name, t in (("pad", pad_token_id), ("cls", cls_token_id), ("sep", sep_token_id),
                        ("bos", bos_token_id), ("enc", enc_token_id)):
            if not 0 <= t < vocab_size:
                raise ValueError(f"{name}_token_id {t} is outside the vocabulary ({vocab_size})")

        self.visual_encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0,
                                                embed_dim=vision_width, depth=vision_depth, num_heads=vision_heads,
                                                qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0)
        self.text_encoder = BlipTextModel(vocab_size, text_width, text_layers, text_heads, intermediate_size,
                                          max_position_embeddings, drop=hidden_dropout, attn_drop=attention_dropout,
                                          encoder_width=vision_width, pad_token_id=pad_token_id)
        add_itc_itm_heads(self, vision_width, text_width, embed_dim, queue_size=queue_size, temp=temp, alpha=alpha,
                          global_batch=global_batch, momentum=momentum)

        self.text_decoder = BlipTextLMHeadModel(self.text_encoder, text_heads, drop=hidden_dropout,
                                                attn_drop=attention_dropout, tie_word_embeddings=tie_word_embeddings)

    # ------------------------------------------------------------------ helpers
    def _check_images(self, images):
        pe = self.visual_encoder.patch_embed
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating tensor, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != pe.in_chans or tuple(images.shape[2:]) != pe.img_size:
            raise ValueError(f"images must have shape (B, {pe.in_chans}, {pe.img_size[0]}, {pe.img_size[1]}), "
                             f"got {tuple(images.shape)}")
        if images.shape[0] < 1:
            raise ValueError("images must hold at least one image")

    def _check_text(self, input_ids, attention_mask, B, device):
        _int_ids("input_ids", input_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] != B:
            raise ValueError(f"input_ids must have shape (B, L) with B = {B}, got {tuple(input_ids.shape)}")
        L = input_ids.shape[1]
        if L < 2 or L > self.text_encoder.max_positions:
            raise ValueError(f"input_ids' length must be in [2, {self.text_encoder.max_positions}], got {L}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"input_ids must be in [0, {self.vocab_size}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must have shape (B, L) = ({B}, {L}), got {tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token)")
        if input_ids.device != device or attention_mask.device != device:
            raise ValueError("images, input_ids and attention_mask must be on the same device")

    def itm_logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) of the pairs (image i, text i): ``[ENC]`` replaces the first token
        (BLIP's ``encoder_input_ids[:, 0] = enc_token_id``)."""
        self._check_images(images)
        self._check_text(input_ids, attention_mask, images.shape[0], images.device)
        ids = input_ids.long().clone()
        ids[:, 0] = self.enc_token_id
        out = self.text_encoder(ids, attention_mask == 0, self.visual_encoder.forward_features(images))
        return self.itm_head(out[:, 0])

    def lm_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """``(decoder_input_ids, targets)``: ``[DEC]`` replaces the first token; targets are the
        decoder ids with -100 on padding and on the first ``prompt_length`` tokens (BLIP)."""
        ids = input_ids.long().clone()
        ids[:, 0] = self.bos_token_id
        targets = ids.masked_fill(attention_mask == 0, -100)
        targets[:, :self.prompt_length] = -100
        return ids, targets

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: Optional[float] = None, idx: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self._check_images(images)
        B = images.shape[0]
        self._check_text(input_ids, attention_mask, B, images.device)
        if B < 2:
            raise ValueError("BLIP needs a batch of at least 2 (ITM samples negatives from the other pairs)")
        if self.itc.queue_size % B:
            raise ValueError(f"the batch size ({B}) must divide queue_size ({self.itc.queue_size})")
        alpha = self.alpha if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
        input_ids = input_ids.long()
        pad = attention_mask == 0
        dev = images.device

        # ---- ITC (unimodal encoders; [CLS])
        image_embeds = self.visual_encoder.forward_features(images)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(self.text_encoder(input_ids, pad)[:, 0]), dim=-1)
        with torch.no_grad():
            if not getattr(self, "_momentum_hoisted", False):  # else done by a pre-forward hook
                self._momentum_update()
            image_embeds_m = self.visual_encoder_m.module.forward_features(images)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m.module(input_ids, pad)[:, 0]), dim=-1)
        loss_itc = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha=float(alpha), idx=idx)

        # ---- ITM with hard negatives ([ENC], the encoder with cross-attention)
        gb = self.global_batch and world_info()[1] > 1
        rank = world_info()[0] if gb else 0
        seed = _draw_seed(shared=gb)
        row_ids = torch.arange(rank * B, (rank + 1) * B, device=dev)
        enc_ids = input_ids.clone()
        enc_ids[:, 0] = self.enc_token_id
        output_pos = self.text_encoder(enc_ids, pad, image_embeds)
        with torch.no_grad():
            temp = self.itc.temp  # clamped by the ITC
            img_fm, txt_fm = ((all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)) if gb
                              else (image_feat_m, text_feat_m))
            # BLIP: softmax(sim_i2t[:, :bs]) + 1e-4, diagonal 0; sim_i2t = image_feat @ text_feat_m.T / temp
            weights_i2t = F.softmax((image_feat @ txt_fm.t() / temp).float(), dim=1) + 1e-4
            weights_t2i = F.softmax((text_feat @ img_fm.t() / temp).float(), dim=1) + 1e-4
            diag = (torch.arange(B, device=dev), row_ids)
            weights_i2t[diag] = 0
            weights_t2i[diag] = 0
        neg_image = _sample_rows(weights_t2i, seed, _S_NEG_IMAGE, row_ids)  # a negative image for each text
        neg_text = _sample_rows(weights_i2t, seed, _S_NEG_TEXT, row_ids)    # a negative text for each image
        if gb:  # other ranks' images come with their gradients (BLIP's all_gather_with_grad), texts as ids
            image_embeds_w = all_gather_with_grad(image_embeds)
            ids_w, pad_w = all_gather_no_grad(enc_ids), all_gather_no_grad(pad.to(torch.uint8)).bool()
        else:
            image_embeds_w, ids_w, pad_w = image_embeds, enc_ids, pad
        ids_all = torch.cat([enc_ids, ids_w[neg_text]], 0)
        pad_all = torch.cat([pad, pad_w[neg_text]], 0)
        image_embeds_all = torch.cat([image_embeds_w[neg_image], image_embeds], 0)
        output_neg = self.text_encoder(ids_all, pad_all, image_embeds_all)
        vl_output = self.itm_head(torch.cat([output_pos[:, 0], output_neg[:, 0]], 0))
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(dev)
        loss_itm = F.cross_entropy(vl_output.float(), itm_labels)

        # ---- LM: causal decoder, next-token cross-entropy with label smoothing
        dec_ids, targets = self.lm_targets(input_ids, attention_mask)
        logits = self.text_decoder(dec_ids, pad, image_embeds)
        shifted, labels = logits[:, :-1].float(), targets[:, 1:]
        n_targets = (labels != -100).sum()
        if gb:  # the token mean over every rank's targets (see ALBEF's MLM normalization)
            n_targets = all_reduce_sum_no_grad(n_targets) / world_info()[1]
        ce = F.cross_entropy(shifted.reshape(-1, self.vocab_size), labels.reshape(-1), ignore_index=-100,
                             reduction="sum", label_smoothing=self.label_smoothing)
        loss_lm = ce / n_targets.clamp(min=1)

        return {"loss": loss_itc + loss_itm + loss_lm, "itc": loss_itc, "itm": loss_itm, "lm": loss_lm}

    # ------------------------------------------------------------------ captioning
    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_length: int = 30, min_length: int = 1, num_beams: int = 1,
                 input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Greedy captioning (HF ``BlipForConditionalGeneration.generate`` with ``num_beams=1``).

        images (B, C, H, W) floating; ``input_ids`` an optional prompt (B, P) int (its first token
        is replaced by ``[DEC]``; default: ``[DEC]`` alone).  At each step the decoder reads the
        sequence so far and the argmax of the last position's logits is appended; ``[SEP]``
        (``sep_token_id``) is forbidden while the length is below ``min_length`` and ends a
        sequence (later positions get ``pad_token_id``); decoding stops when every sequence has
        ended or the length reaches ``max_length``.  Returns int64 (B, T) with T <= max_length,
        the prompt included.  No key/value cache (each step recomputes the prefix); dropout
        follows the module's mode (call ``eval()`` first).  Beam search is not implemented.
        """
        self._check_images(images)
        if isinstance(num_beams, bool) or not isinstance(num_beams, int):
            raise TypeError(f"num_beams must be an int, got {type(num_beams).__name__}")
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: only greedy decoding (num_beams=1) is implemented")
        for name, v in (("max_length", max_length), ("min_length", min_length)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        B, dev = images.shape[0], images.device
        if input_ids is None:
            seq = torch.full((B, 1), self.bos_token_id, dtype=torch.long, device=dev)
        else:
            _int_ids("input_ids", input_ids)
            if input_ids.dim() != 2 or input_ids.shape[0] != B or input_ids.shape[1] < 1:
                raise ValueError(f"input_ids (the prompt) must have shape (B, P) with B = {B}, P >= 1, "
                                 f"got {tuple(input_ids.shape)}")
            if input_ids.device != dev:
                raise ValueError("images and input_ids must be on the same device")
            if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size:
                raise ValueError(f"input_ids must be in [0, {self.vocab_size})")
            seq = input_ids.long().clone()
            seq[:, 0] = self.bos_token_id
        if not seq.shape[1] < max_length <= self.text_encoder.max_positions:
            raise ValueError(f"max_length must be in ({seq.shape[1]}, {self.text_encoder.max_positions}] "
                             f"(more than the prompt's length), got {max_length}")
        if not 0 <= min_length <= max_length:
            raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")
        image_embeds = self.visual_encoder.forward_features(images)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        while seq.shape[1] < max_length:
            logits = self.text_decoder(seq, None, image_embeds)[:, -1].float()
            if seq.shape[1] < min_length:
                logits[:, self.sep_token_id] = float("-inf")
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == self.sep_token_id
            if bool(done.all()):
                break
        return seq

    # ------------------------------------------------------------------ data
    def synthetic_batch(self, batch_size: int, *, device=None, generator: Optional[torch.Generator] = None):
        """A learnable synthetic batch (ALBEF's): one of 8 concepts per sample; the image is the
        concept's fixed random pattern plus noise, the text ``[CLS] <concept's tokens> [SEP]``
        right-padded to ``text_len`` (varying lengths, so the decoder sees padding)."""
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
        mask = torch.zeros_like(ids)
        for i, ci in enumerate(c.tolist()):
            n = max(1, min(L - 2, 3 + (ci * 5) % max(1, L - 4)))
            seq = [self.cls_token_id] + [min(t, self.vocab_size - 3) for t in _concept_tokens(ci, n)] \
                + [self.sep_token_id]
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        return {"images": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}

    # ------------------------------------------------------------------ checkpoints
    def load_hf_state_dicts(self, caption: Optional[Dict[str, torch.Tensor]] = None,
                            retrieval: Optional[Dict[str, torch.Tensor]] = None, *, shared_from: Optional[str] = None,
                            strict: bool = True):
        """Load HF ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` state_dicts
        (:func:`convert_hf_blip_checkpoint`); ``itc.*`` (temperature, queues: not in HF's models)
        keep this model's values.  Returns ``load_state_dict``'s result."""
        out = convert_hf_blip_checkpoint(caption, retrieval, shared_from=shared_from)
        out.update({k: v for k, v in self.state_dict().items() if k.startswith("itc.")})
        return self.load_state_dict(out, strict=strict)


# ------------------------------------------------------------------------------------------ checkpoints
_VISION = (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
           ("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm."))
_VISION_LAYER = (("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj."),
                 ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."), ("mlp.fc1.", "mlp.fc1."),
                 ("mlp.fc2.", "mlp.fc2."))
_MOMENTUM = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")


def _convert_vision(sd, prefix):
    out = {}
    for k, t in sd.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        for a, b in _VISION:
            if rest.startswith(a):
                out[b + rest[len(a):]] = t
                break
        else:
            if not rest.startswith("encoder.layers."):
                raise ValueError(f"unexpected vision key {k!r}")
            i, leaf = rest[len("encoder.layers."):].split(".", 1)
            for a, b in _VISION_LAYER:
                if leaf.startswith(a):
                    out[f"blocks.{i}.{b}{leaf[len(a):]}"] = t
                    break
            else:
                raise ValueError(f"unexpected vision key {k!r}")
    return out


def _convert_bert(sd, prefix):
    """HF ``BlipTextModel`` keys under ``prefix`` -> ours (embeddings, encoder.layer.{i}.*), q/k/v fused."""
    out, parts = {}, {}
    for k, t in sd.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if rest.endswith("position_ids"):
            continue
        for att, fused in (("attention", "qkv"), ("crossattention", "kv")):
            tag = f".{att}.self."
            if tag in rest:
                pre, leaf = rest.split(tag)
                part, p = leaf.split(".")
                if att == "crossattention" and part == "query":
                    out[f"{pre}.{att}.self.q.{p}"] = t
                else:
                    parts.setdefault(f"{pre}.{att}.self.{fused}.{p}", {})[part] = t
                break
        else:
            out[rest.replace(".attention.output.dense.", ".attention.self.proj.")
                    .replace(".crossattention.output.dense.", ".crossattention.self.proj.")] = t
    for slot, got in parts.items():
        order = ("query", "key", "value") if ".qkv." in slot else ("key", "value")
        missing = [p for p in order if p not in got]
        if missing:
            raise ValueError(f"checkpoint lacks the {missing} projection(s) of {slot}")
        out[slot] = torch.cat([got[p] for p in order], 0)
    return out


def convert_hf_blip_checkpoint(caption: Optional[Dict[str, torch.Tensor]] = None,
                               retrieval: Optional[Dict[str, torch.Tensor]] = None, *,
                               shared_from: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Map HF ``BlipForConditionalGeneration`` (``caption``) and ``BlipForImageTextRetrieval``
    (``retrieval``) state_dicts to :class:`BLIP`'s names.

    * ``vision_model.*`` -> ``visual_encoder.*`` (``embeddings.class_embedding`` -> ``cls_token``,
      ``position_embedding`` -> ``pos_embed``, ``patch_embedding`` -> ``patch_embed.proj``,
      ``encoder.layers.{i}.self_attn.{qkv,projection}`` -> ``blocks.{i}.attn.{qkv,proj}``,
      ``layer_norm{1,2}`` -> ``norm{1,2}``, ``post_layernorm`` -> ``norm``).
    * text: HF's ``query`` / ``key`` / ``value`` are concatenated into ``attention.self.qkv``
      (cross-attention: ``query`` -> ``crossattention.self.q``, ``key`` + ``value`` -> ``kv``);
      ``*.output.dense`` of (cross-)attention -> ``*.self.proj``; ``position_ids`` dropped.
      ``retrieval``'s ``text_encoder.*`` -> ``text_encoder.*``; ``caption``'s
      ``text_decoder.bert.encoder.layer.{i}.attention.*`` -> ``text_decoder.bert...attention.*``
      (the decoder's own causal self-attention), ``text_decoder.cls.*`` -> ``text_decoder.cls.*``
      (``decoder.bias``, an alias of ``bias``, dropped; ``decoder.weight``, tied by HF, is the shared
      word embedding matrix).
    * shared parameters (embeddings, cross-attention, feed-forward; and the vision encoder): BLIP
      ties them, HF's two fine-tuned models each have a copy.  ``shared_from`` ("retrieval", the
      default when it is given, or "caption") picks the copy; it is written under both the
      encoder's and the decoder's names (and the momentum copies, ``*_m.module.*``, start equal to
      the online weights, as BLIP's ``copy_params``).
    * ``vision_proj``, ``text_proj``, ``itm_head`` from ``retrieval``.

    ``itc.*`` (temperature, queues) are not in HF's models: take them from a fresh model
    (:meth:`BLIP.load_hf_state_dicts` does), then ``load_state_dict`` is strict.
    """
    if caption is None and retrieval is None:
        raise ValueError("give the caption and/or the retrieval state_dict")
    if shared_from is None:
        shared_from = "retrieval" if retrieval is not None else "caption"
    if shared_from not in ("retrieval", "caption"):
        raise ValueError(f"shared_from must be 'retrieval' or 'caption', got {shared_from!r}")
    if (caption if shared_from == "caption" else retrieval) is None:
        raise ValueError(f"shared_from={shared_from!r} but no {shared_from} state_dict was given")
    out: Dict[str, torch.Tensor] = {}
    src = caption if shared_from == "caption" else retrieval
    for k, t in _convert_vision(src, "vision_model.").items():
        out["visual_encoder." + k] = t
    shared = _convert_bert(src, "text_decoder.bert." if shared_from == "caption" else "text_encoder.")
    dec_own = _convert_bert(caption, "text_decoder.bert.") if caption is not None else {}
    enc_own = _convert_bert(retrieval, "text_encoder.") if retrieval is not None else {}
    for k, t in shared.items():
        if ".attention." in k and ".crossattention." not in k:
            continue
        out["text_encoder." + k] = t
        out["text_decoder.bert." + k] = t
    for k, t in enc_own.items():
        if ".attention." in k and ".crossattention." not in k:
            out["text_encoder." + k] = t
    for k, t in dec_own.items():
        if ".attention." in k and ".crossattention." not in k:
            out["text_decoder.bert." + k] = t
    if caption is not None:
        for k, t in caption.items():
            if k.startswith("text_decoder.cls.") and not k.endswith(("decoder.bias", "decoder.weight")):
                out[k] = t
        # HF ties the LM head's matrix to the word embeddings (tie_word_embeddings=True): the shared copy
        out["text_decoder.cls.predictions.decoder.weight"] = out["text_encoder.embeddings.word_embeddings.weight"]
    if retrieval is not None:
        for k, t in retrieval.items():
            if k.startswith(("vision_proj.", "text_proj.", "itm_head.")):
                out[k] = t
    for name in _MOMENTUM:
        for k in [k for k in out if k.startswith(name + ".")]:
            out[f"{name}_m.module.{k[len(name) + 1:]}"] = out[k].clone()
    return out


# ------------------------------------------------------------------------------------------ registry
_MICRO_VOCAB = NUM_SPECIAL + 256 + 2  # ByteTokenizer's 261 ids + [DEC] + [ENC]

register_configs({
    "blip_base": dict(),
    "blip_micro": dict(img_size=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=4,
                       vocab_size=_MICRO_VOCAB, text_width=64, text_layers=2, text_heads=4, intermediate_size=128,
                       max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, embed_dim=32,
                       queue_size=64, text_len=15),
}, BLIP, "BLIP pre-training (ITC + ITM + captioning LM)")
