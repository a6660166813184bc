"""Eager scaled-dot-product attention (Vaswani et al., 2017, "Attention Is All You Need",
arXiv:1706.03762) with padding masks, bias, causal masking and dropout.

The one eager formula of attention in vlfast: the test oracle of :func:`vlfast.ops.attention`
(call it with float64 inputs), what :class:`vlfast.nn.Attention`, :class:`vlfast.nn.CrossAttention`
and :class:`vlfast.nn.MultiheadAttention` run with ``fused=False``, and the "eager" provider
of ``bench/attention.py``.  It is timm's ``fused_attn=False`` code (``q = q * scale;
attn = q @ k.transpose(-2, -1)``...) plus the masks.
"""

import math

import torch
import torch.nn.functional as F


def attention_keep_mask(B, Nq, Nk, key_padding_mask=None, causal=False, device=None):
    """Bool (B or 1, 1, Nq, Nk): True where query i may attend key j."""
    keep = torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=device)
    if causal:  # bottom-right aligned: query i sees keys j <= i + Nk - Nq
        keep = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(Nk - Nq)[None, None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    return keep


def attention_reference(q, k, v, key_padding_mask=None, attn_bias=None, causal=False, scale=None,
                        dropout_mask=None, dropout_p=0.0):
    r"""``softmax((scale * q) k^T + bias, masked) [dropout] v``, materializing the (Nq, Nk) scores.

    Args:
        q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv); any floating dtype, computed
            in it (float64 for an oracle).
        key_padding_mask: (B, Nk) bool, True = padding (no query attends it).
        attn_bias: floating, broadcastable to (B, H, Nq, Nk), added to the scaled scores.
        causal: query i sees keys j <= i + Nk - Nq (bottom-right aligned, as the op).
        scale: default ``1 / sqrt(D)``; multiplies q before the product, as timm does.
        dropout_mask: (B, H, Nq, Nk) bool, True = kept: the probabilities become
            ``p * dropout_mask / (1 - dropout_p)`` (to replay the op's dropout).
        dropout_p: without ``dropout_mask``, a probability in [0, 1) of
            :func:`torch.nn.functional.dropout` on the probabilities (torch's RNG; what timm's
            ``attn_drop`` module does in training mode).

    Returns (B, H, Nq, Dv) in q's dtype.  A query row with no visible key (all padding, or
    causal with Nq > Nk) outputs zeros and has zero gradients.
    """
    Nq, D = q.shape[-2:]
    Nk = k.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q * scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    if key_padding_mask is not None or causal:
        keep = attention_keep_mask(q.shape[0], Nq, Nk, key_padding_mask, causal, q.device)
        alive = keep.any(-1, keepdim=True)
        s = s.masked_fill(~keep, float("-inf")).masked_fill(~alive, 0.0)
        p = torch.softmax(s, dim=-1) * alive
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ v
