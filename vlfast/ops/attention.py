"""Fused scaled-dot-product attention for vision and text encoders: ``vlfast.ops.attention``.

FlashAttention (Dao et al., 2022, arXiv:2205.14135; FlashAttention-2, Dao, 2023,
arXiv:2307.08691) computes softmax attention tile by tile with an online
log-sum-exp and recomputes the tiles in the backward pass, so the (Nq, Nk)
matrix is never stored.  vlfast's Triton kernel adds what ViT / BERT / ViLT /
ALBEF training needs: any head dim up to 256 (80, 72, 96...), odd sequence
lengths (197, 257, 577), key padding masks with fully padded rows, cross
attention (Nq != Nk), additive bias with a gradient (relative position bias),
bottom-right causal masking and dropout whose mask the backward regenerates.
"""

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _backend
from .. import _validation as check
from ..reference.attention import attention_keep_mask

OP = _backend.register_op("attention", {"cuda": ("triton", "xformers", "torch"), "cpu": ("torch",)},
                          native_devices=())

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------ validation
def _validate(q, k, v, key_padding_mask, attn_bias, causal, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape (B, H, Nk, D) = ({B}, {H}, Nk, {D}) to match q, got {tuple(k.shape)}")
    Nk = k.shape[2]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    if Nq < 1 or Nk < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={Nq}, Nk={Nk}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding key), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if key_padding_mask.shape != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = ({B}, {Nk}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
            raise TypeError("attn_bias must be a floating tensor broadcastable to (B, H, Nq, Nk)")
        if attn_bias.device != q.device:
            raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
        full = (B, H, Nq, Nk)
        if attn_bias.dim() > 4 or any(s not in (1, f) for s, f in zip(attn_bias.shape[::-1], full[::-1])):
            raise ValueError(f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                             f"(B, H, Nq, Nk) = {full}")
    check.flag("causal", causal)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a positive finite number or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return B, H, Nq, Nk, D


# ------------------------------------------------------------------ torch backend
@OP.implement("torch")
def _attention_torch(q, k, v, key_padding_mask, bias, causal, dropout_p, scale, seed=0, deterministic=False):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if key_padding_mask is None and bias is None and (not causal or Nq == Nk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    keep = attention_keep_mask(B, Nq, Nk, key_padding_mask, causal, q.device)
    alive = keep.any(-1, keepdim=True)
    # rows with no visible key attend to everything, then are zeroed: no NaN, zero gradients
    keep = keep | ~alive
    if bias is None:
        mask = keep
    else:
        mask = bias.to(q.dtype).masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if torch.compiler.is_compiling() or not bool(alive.all()):
        out = out * alive.to(out.dtype)
    return out


# ------------------------------------------------------------------ xformers backend (optional)
@OP.implement("xformers")
def _attention_xformers(q, k, v, key_padding_mask, bias, causal, dropout_p, scale, seed=0, deterministic=False):
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias as xbias

    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    alive = None
    if key_padding_mask is None and bias is None:
        xb = xbias.LowerTriangularFromBottomRightMask() if causal else None
    else:
        keep = attention_keep_mask(B, Nq, Nk, key_padding_mask, causal, q.device)
        alive = keep.any(-1, keepdim=True)
        keep = keep | ~alive
        dense = torch.zeros(B, H, Nq, Nk, dtype=q.dtype, device=q.device)
        if bias is not None:
            dense = dense + bias.to(q.dtype)
        xb = dense.masked_fill(~keep, float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=xb, p=dropout_p, scale=scale).transpose(1, 2)
    if alive is not None and (torch.compiler.is_compiling() or not bool(alive.all())):
        out = out * alive.to(out.dtype)
    return out


# ------------------------------------------------------------------ triton backend (torch.library ops)
_attention_forward_kernel = _backend.triton_launcher("attention", "attention_forward")
_attention_backward_kernel = _backend.triton_launcher("attention", "attention_backward")


@torch.library.custom_op("vlfast::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], causal: bool, scale: float, dropout_p: float, seed: int,
               deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    B, H, Nq, D = q.shape
    full_bias = None if bias is None else bias.expand(B, H, Nq, k.shape[2])
    return _attention_forward_kernel(q, k, v, key_padding_mask=key_padding_mask, bias=full_bias,
                                     causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, bias, causal, scale, dropout_p, seed, deterministic):
    B, H, Nq, D = q.shape
    return q.new_empty(B, H, Nq, D), q.new_empty(B, H, Nq, dtype=torch.float32)


@torch.library.custom_op("vlfast::attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               causal: bool, scale: float, dropout_p: float, seed: int, bias_grad: bool,
               deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Nq, D = q.shape
    full_bias = None if bias is None else bias.expand(B, H, Nq, k.shape[2])
    grad_shape = tuple(bias.shape) if (bias is not None and bias_grad) else None
    dq, dk, dv, dbias = _attention_backward_kernel(
        do, q, k, v, out, lse, key_padding_mask=key_padding_mask, bias=full_bias, causal=causal, scale=scale,
        dropout_p=dropout_p, seed=seed, bias_grad_shape=grad_shape, deterministic=deterministic)
    if dbias is None:
        dbias = q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dbias


@_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, bias, causal, scale, dropout_p, seed, bias_grad, deterministic):
    dbias = (bias.new_empty(bias.shape, dtype=torch.float32) if (bias is not None and bias_grad)
             else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _attention_setup(ctx, inputs, output):
    q, k, v, key_padding_mask, bias, causal, scale, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, bias)
    ctx.args = (causal, scale, dropout_p, seed, deterministic)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _attention_autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, bias = ctx.saved_tensors
    causal, scale, dropout_p, seed, deterministic = ctx.args
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = torch.ops.vlfast.attention_backward(
        dout.contiguous(), q, k, v, out, lse, key_padding_mask, bias, causal, scale, dropout_p, seed,
        bias_grad, deterministic)
    return dq, dk, dv, None, (dbias.to(ctx.bias_dtype) if bias_grad else None), None, None, None, None, None


torch.library.register_autograd("vlfast::attention", _attention_autograd_backward, setup_context=_attention_setup)


@OP.implement("triton")
def _attention_triton(q, k, v, key_padding_mask, bias, causal, dropout_p, scale, seed, deterministic):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if bias is not None and bias.dim() < 4:
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return torch.ops.vlfast.attention(q, k, v, key_padding_mask, bias, causal, scale, dropout_p, seed,
                                            deterministic)[0]


# ------------------------------------------------------------------ public op
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: Optional[torch.Tensor] = None,
              attn_bias: Optional[torch.Tensor] = None, causal: bool = False, dropout_p: float = 0.0,
              scale: Optional[float] = None, deterministic: bool = False, dropout_seed: Optional[int] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    r"""Scaled-dot-product attention, fused (FlashAttention-2 style) for vision and text encoders.

    .. math:: \mathrm{out} = \mathrm{softmax}\big(\mathrm{scale}\cdot q k^\top + \mathrm{bias},\ \mathrm{masked}\big)\,
              [\odot\ \mathrm{dropout}]\ v

    Args:
        q: (B, H, Nq, D); ``k``, ``v``: (B, H, Nk, D) (the SDPA layout, any strides);
            float32, float16 or bfloat16, one dtype.  D up to 256, any value (32, 40, 64,
            72, 80, 96, 128, 256...); any Nq, Nk >= 1, Nq != Nk for cross-attention.
        key_padding_mask: (B, Nk) bool, True marks a padding key no query attends to (the
            ``torch.nn.MultiheadAttention`` convention).  A query row whose keys are all
            excluded outputs zeros and gets zero gradients, never NaN.
        attn_bias: floating tensor broadcastable to (B, H, Nq, Nk), added to the scaled
            scores (e.g. relative position bias); it receives a gradient when it requires
            one, reduced over its broadcast dimensions.
        causal: query i sees keys j <= i + Nk - Nq (bottom-right aligned).
        dropout_p: probability of dropping an attention probability (in [0, 1)); pass 0
            in evaluation.  The Triton kernel draws a counter-based (Philox) mask from
            ``dropout_seed`` and regenerates it in the backward pass.
        scale: defaults to 1/sqrt(D).
        deterministic: the Triton backward is deterministic for dq, dk, dv; a broadcast
            ``attn_bias`` gradient is summed with atomics unless ``deterministic=True`` (or
            ``torch.use_deterministic_algorithms(True)``), which costs a (B, H, Nq, Nk) fp32
            buffer.
        dropout_seed: seed of the dropout mask (Triton backend); by default drawn from
            torch's CPU generator, so ``torch.manual_seed`` reproduces it.
        backend: ``None``/``"auto"``, ``"triton"`` (CUDA; CPU under TRITON_INTERPRET=1),
            ``"torch"`` (SDPA, with explicit masks where needed) or ``"xformers"`` (optional).

    Returns:
        (B, H, Nq, D) in q's dtype.
    """
    B, H, Nq, Nk, D = _validate(q, k, v, key_padding_mask, attn_bias, causal, dropout_p, scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    name = OP.select(q.device, backend)
    if name == "triton" and dropout_p > 0 and dropout_seed is None:  # the other backends draw from torch's RNG
        dropout_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return OP.impl(name)(q, k, v, key_padding_mask, attn_bias, causal, dropout_p, scale,
                         int(dropout_seed or 0), deterministic)
