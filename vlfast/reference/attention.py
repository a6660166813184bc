"""Eager scaled-dot-product attention with padding masks, bias, causal masking and dropout.

The test oracle and the "eager" baseline of :func:`vlfast.ops.attention`
(Vaswani et al., 2017).  Call it with float64 inputs for a reference.
"""

import math

import torch


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
    r"""``softmax(scale * q k^T + bias, masked) [* dropout_mask / (1 - p)] v``.

    q (B, H, Nq, D), k and v (B, H, Nk, D); key_padding_mask (B, Nk) bool, True =
    padding; attn_bias broadcastable to (B, H, Nq, Nk); dropout_mask (B, H, Nq, Nk)
    bool, True = kept.  A query row with no visible key outputs zeros (and has
    zero gradients).  Computed in the inputs' dtype.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    keep = attention_keep_mask(B, Nq, Nk, key_padding_mask, causal, q.device)
    alive = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~alive, 0.0)
    p = torch.softmax(s, dim=-1) * alive
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    return torch.matmul(p, v)
