"""Attention modules on the fused op :func:`vlfast.ops.attention`.

* :class:`Attention`: ViT self-attention with the constructor, call and parameters of timm's
  ``timm.layers.Attention`` (Dosovitskiy et al., 2021, arXiv:2010.11929).
* :class:`CrossAttention`: text queries attending image tokens, as in the fusion layers
  of ALBEF (Li et al., 2021, arXiv:2107.07651) and BLIP (Li et al., 2022, arXiv:2201.12086).
* :class:`MultiheadAttention`: a drop-in subclass of :class:`torch.nn.MultiheadAttention`
  that runs the fused op when attention weights are not requested
  (see also :func:`vlfast.patch`, which swaps it into an existing model).

Each has a ``fused`` flag (constructor keyword and attribute, toggled by
:func:`vlfast.models.set_fused`): False replaces the op by the one eager formula
:func:`vlfast.reference.attention_reference` (Vaswani et al., 2017), the baseline that the
benchmarks time as "eager".
"""

import logging
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as check
from ..ops.attention import MAX_HEAD_DIM, attention
from ..reference.attention import attention_reference

__all__ = ["Attention", "CrossAttention", "MultiheadAttention", "is_causal_mask", "sdpa_mask_to_attention_args"]

log = logging.getLogger("vlfast")
_deferrals_logged: set = set()

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _attend(fused: bool, q, k, v, *, key_padding_mask=None, attn_bias=None, causal=False, dropout_p=0.0,
            scale=None, backend=None):
    """Every module's attention core: :func:`vlfast.ops.attention` (``fused``) or the eager formula
    :func:`vlfast.reference.attention_reference` (torch's dropout RNG), same arguments."""
    if fused:
        return attention(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias, causal=causal,
                         dropout_p=dropout_p, scale=scale, backend=backend)
    return attention_reference(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p=dropout_p)


def _check_heads(dim: int, num_heads: int, name: str = "dim") -> int:
    dim = check.positive_int(name, dim)
    num_heads = check.positive_int("num_heads", num_heads)
    if dim % num_heads != 0:
        raise ValueError(f"{name}={dim} must be divisible by num_heads={num_heads}")
    head_dim = dim // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {name} // num_heads = {head_dim} exceeds the fused kernel's maximum "
                         f"{MAX_HEAD_DIM}; use more heads")
    return head_dim


def _check_tokens(owner: str, name: str, t, width: int, shape: str) -> None:
    """``t`` must be a (B, N, width) tensor (TypeError when not a tensor, ValueError for the shape)."""
    check.tensor(name, t)
    if t.dim() != 3 or t.shape[-1] != width:
        raise ValueError(f"{owner} expects {name} of shape {shape}, got {tuple(t.shape)}")


# ---------------------------------------------------------------------------------- masks in SDPA / torch form
_NEG_INF = float("-inf")
# causal-mask recognition: (data_ptr, L, strides, dtype, device, convention) -> (weakref to the mask's base
# tensor, its version counter when checked, verdict).  The entry is dropped when the base tensor dies.
_causal_masks: Dict[tuple, tuple] = {}


def _forget_mask(key, ref) -> None:
    entry = _causal_masks.get(key)
    if entry is not None and entry[0] is ref:
        del _causal_masks[key]


def _scan_causal(mask: torch.Tensor, true_allows: bool) -> bool:
    L = mask.shape[0]
    upper = torch.ones(L, L, dtype=torch.bool, device=mask.device).triu_(1)
    if mask.dtype == torch.bool:
        return torch.equal(mask, ~upper if true_allows else upper)
    return torch.equal(mask, torch.zeros(L, L, dtype=mask.dtype, device=mask.device).masked_fill_(upper, _NEG_INF))


def is_causal_mask(mask: torch.Tensor, *, true_allows: bool) -> bool:
    r"""Whether ``mask`` is exactly the (L, L) causal mask, so the kernel's causal mode can replace it.

    Recognised: a float mask with ``0`` on and below the diagonal and ``-inf`` above it (open_clip's
    text mask, torch's ``generate_square_subsequent_mask``), or a bool mask that allows exactly
    ``j <= i`` (``true_allows=True``: SDPA / timm's convention, True = attend; ``False``: torch
    ``MultiheadAttention``'s, True = masked).

    The check looks at the values once per mask: the verdict is cached per tensor (its base
    tensor, held by weak reference, its data pointer, shape, strides, dtype, device) and its
    version counter, so a buffer sliced on every call (``self.attn_mask[:L, :L]``) is scanned once,
    and an in-place change of the mask is seen.  Masks that require a gradient, tensor
    subclasses, inference tensors (no version counter: scanned each call) and anything under
    ``torch.compile`` (never recognised: the mask stays a dense bias) are handled conservatively.
    """
    if (type(mask) is not torch.Tensor or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.requires_grad
            or mask.is_meta or torch.compiler.is_compiling()):
        return False
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return False
    if mask.is_inference():
        return _scan_causal(mask, true_allows)
    base = mask._base if mask._base is not None else mask
    key = (mask.data_ptr(), mask.shape[0], mask.stride(), mask.dtype, mask.device, true_allows)
    entry = _causal_masks.get(key)
    version = mask._version
    if entry is not None and entry[0]() is base and entry[1] == version:
        return entry[2]
    verdict = _scan_causal(mask, true_allows)
    ref = weakref.ref(base, lambda r, key=key: _forget_mask(key, r))
    _causal_masks[key] = (ref, version, verdict)
    return verdict


def _top_left_causal_bias(q_len: int, k_len: int, dtype, device) -> torch.Tensor:
    upper = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill_(upper, _NEG_INF)


def sdpa_mask_to_attention_args(attn_mask: Optional[torch.Tensor], is_causal: bool, *, batch: int, heads: int,
                                q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
                                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool]:
    r"""``attn_mask`` / ``is_causal`` of :func:`torch.nn.functional.scaled_dot_product_attention` (what timm's
    attention modules take) as ``(key_padding_mask, attn_bias, causal)`` of :func:`vlfast.ops.attention`.

    * ``attn_mask``: broadcastable to ``(batch, heads, q_len, k_len)`` (SDPA's broadcasting: a 2-D
      mask is (q_len, k_len)); bool with True = take part in attention, or floating, added to the
      scores.  A bool mask with one row per batch element (shape ``(B or 1, 1, 1, k_len or 1)``, or
      fewer leading dims) becomes the kernel's key padding mask; the exact causal mask (bool or
      ``0`` / ``-inf``, square) becomes ``causal=True`` (recognised once per mask, see
      :func:`is_causal_mask`); any other mask an additive ``attn_bias`` (bool: ``-inf`` where
      False) in ``dtype``.
    * ``is_causal``: causal masking, top-left aligned as in SDPA (query i sees keys j <= i; the
      kernel's bottom-right mode when ``q_len == k_len``, else an explicit bias).  Given together
      with ``attn_mask`` it raises ``ValueError``, as SDPA does.

    One difference from SDPA: a query whose keys are all excluded by a key padding mask outputs
    zeros (SDPA gives NaN).
    """
    check.flag("is_causal", is_causal)
    if attn_mask is None:
        if is_causal and q_len != k_len:
            return None, _top_left_causal_bias(q_len, k_len, dtype, device), False
        return None, None, is_causal
    if is_causal:
        raise ValueError("attn_mask and is_causal=True were both given; pass one of them "
                         "(as torch.nn.functional.scaled_dot_product_attention requires)")
    if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        raise TypeError("attn_mask must be a bool (True = attend) or floating (added to the scores) tensor, got "
                        f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
    check.same_device("attn_mask", attn_mask, device)
    full = (batch, heads, q_len, k_len)
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to (B, H, Nq, Nk) = {full}")
    if q_len == k_len and len(shape) == 2 and is_causal_mask(attn_mask, true_allows=True):
        return None, None, True
    if attn_mask.dtype == torch.bool:
        b, h, r, n = (1,) * (4 - len(shape)) + shape
        if h == 1 and r == 1:  # the same keys excluded for every query: a key padding mask
            kpm = (~attn_mask).reshape(b, n)
            if (b, n) != (batch, k_len):
                kpm = kpm.expand(batch, k_len).contiguous()
            return kpm, None, False
        return None, torch.zeros(shape, dtype=dtype, device=device).masked_fill_(~attn_mask, _NEG_INF), False
    return None, attn_mask.to(dtype), False


def _merge_masks(kpm, bias, key_padding_mask, attn_bias):
    if key_padding_mask is not None:
        kpm = key_padding_mask if kpm is None else (kpm | key_padding_mask)
    if attn_bias is not None:
        bias = attn_bias if bias is None else bias + attn_bias
    return kpm, bias


def _optional_positive_int(name: str, value) -> Optional[int]:
    return None if value is None else check.positive_int(name, value)


# ---------------------------------------------------------------------------------- Attention
class Attention(nn.Module):
    r"""ViT multi-head self-attention on the fused kernel, a drop-in for timm's ``Attention``.

    Constructor, call, parameters and ``state_dict`` keys are those of ``timm.layers.Attention``
    (timm 1.0; ``timm.models.vision_transformer.Attention`` is the same class): ``qkv.weight``,
    ``qkv.bias`` when ``qkv_bias``, ``q_norm.*`` / ``k_norm.*`` when ``qk_norm``, ``norm.*`` when
    ``scale_norm``, ``gate.*`` when ``gated``, ``proj.weight``, ``proj.bias`` when ``proj_bias``; so
    timm / DeiT / MAE / CLIP-ViT checkpoints load unchanged and
    ``timm.create_model(name, attn_layer=vlfast.nn.Attention)`` builds a model with it.  The math is timm's:

    .. code-block:: python

        gate = self.gate(x).sigmoid()                                    # gated only
        qkv = self.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = softmax(q * scale @ k^T [+ masks]) [dropout] @ v             # fused, never stores (N, N)
        x = self.norm(x.transpose(1, 2).reshape(B, N, H * hd)) [* gate]
        x = self.proj_drop(self.proj(x))

    Args:
        dim: embedding dim C of the input.
        num_heads: number of heads H.
        attn_head_dim: head dim hd (default ``dim // num_heads``; then ``dim`` must be divisible by
            ``num_heads``, ``ValueError`` otherwise); at most 256.
        dim_out: output dim (default ``dim``).
        qkv_bias: bias of the ``qkv`` projection (and of ``gate``), as timm (ViT: True; default False).
        qk_norm: normalize q and k per head with ``norm_layer(hd)`` (ViT-22B style).
        scale_norm: normalize the attention output with ``norm_layer(H * hd)`` before ``proj``.
        proj_bias: bias of the output projection.
        gated: multiply the attention output by ``sigmoid(gate(x))`` (a Linear ``dim -> H * hd``).
        attn_drop: dropout probability on the attention probabilities, applied in training
            mode only (kept as the ``nn.Dropout`` module ``attn_drop`` like timm; its ``p``
            is read at each call and passed to the fused kernel).
        proj_drop: dropout after the output projection.
        norm_layer: normalization for ``qk_norm`` / ``scale_norm``; timm requires it for those,
            here ``None`` means ``nn.LayerNorm``.  Called with ``device`` / ``dtype`` when given.
        device, dtype: of the parameters (``device="meta"``: nothing allocated).
        backend: backend of :func:`vlfast.ops.attention` (``None`` = automatic); keyword only.
        fused: True: :func:`vlfast.ops.attention`; False: the eager formula
            :func:`vlfast.reference.attention_reference` (timm's ``fused_attn=False`` math, the
            (N, N) scores materialized, dropout drawn by ``torch.nn.functional.dropout``);
            keyword only, toggled by :func:`vlfast.models.set_fused`.  ``fused_attn`` (timm's
            attribute name) reads and sets the same flag.

    Positional arguments follow timm's order (``dim, num_heads, attn_head_dim, dim_out, qkv_bias,
    ...``); vlfast 0.1 took ``qkv_bias`` third: a bool there now raises ``TypeError`` naming
    ``attn_head_dim``.

    ``forward(x, attn_mask=None, is_causal=False, *, key_padding_mask=None, attn_bias=None)``:

    * x: (B, N, C) -> (B, N, dim_out).
    * attn_mask, is_causal: timm's (SDPA's) arguments: ``attn_mask`` bool (True = attend) or
      floating (added), broadcastable to (B, H, N, N); ``is_causal`` runs the kernel's causal mode
      (not together with ``attn_mask``).  A per-batch bool mask (``(B, 1, 1, N)``) runs as the
      kernel's key padding mask, the exact causal mask as its causal mode, other masks as an
      additive bias (see :func:`sdpa_mask_to_attention_args`).
    * key_padding_mask: (B, N) bool, True marks a padding token no query attends to; a
      query whose keys are all padding outputs zeros before ``proj``.
    * attn_bias: floating, broadcastable to (B, H, N, N), added to the scaled scores
      (relative position bias, e.g. BEiT / Swin-style); receives a gradient.

    All four may be combined (masks are or-ed, biases summed).
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, device=None, dtype=None, *,
                 backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        dim = check.positive_int("dim", dim)
        attn_head_dim = _optional_positive_int("attn_head_dim", attn_head_dim)
        dim_out = dim if dim_out is None else check.positive_int("dim_out", dim_out)
        for name, value in (("qkv_bias", qkv_bias), ("qk_norm", qk_norm), ("scale_norm", scale_norm),
                            ("proj_bias", proj_bias), ("gated", gated)):
            check.flag(name, value)
        if attn_head_dim is None:
            self.head_dim = _check_heads(dim, num_heads)
        else:
            num_heads = check.positive_int("num_heads", num_heads)
            if attn_head_dim > MAX_HEAD_DIM:
                raise ValueError(f"attn_head_dim={attn_head_dim} exceeds the fused kernel's maximum {MAX_HEAD_DIM}")
            self.head_dim = attn_head_dim
        dd = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        norm_layer = nn.LayerNorm if norm_layer is None else norm_layer
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        #: False runs the eager formula of vlfast.reference (the baseline); see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def fused_attn(self) -> bool:
        """timm's name of :attr:`fused`."""
        return self.fused

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self.fused = check.flag("fused_attn", value)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, *,
                key_padding_mask: Optional[torch.Tensor] = None,
                attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_tokens("Attention", "x", x, self.dim, f"(B, N, {self.dim})")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        kpm, bias, causal = sdpa_mask_to_attention_args(attn_mask, is_causal, batch=B, heads=self.num_heads,
                                                        q_len=N, k_len=N, dtype=q.dtype, device=q.device)
        kpm, bias = _merge_masks(kpm, bias, key_padding_mask, attn_bias)
        x = _attend(self.fused, q, k, v, key_padding_mask=kpm, attn_bias=bias, causal=causal,
                    dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale, backend=self.backend)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        extra = "" if self.head_dim * self.num_heads == self.dim else f", attn_head_dim={self.head_dim}"
        extra += "" if self.dim_out == self.dim else f", dim_out={self.dim_out}"
        return f"dim={self.dim}, num_heads={self.num_heads}{extra}, backend={self.backend!r}, fused={self.fused}"


# ---------------------------------------------------------------------------------- CrossAttention
class CrossAttention(nn.Module):
    r"""Multi-head cross-attention: queries from ``x`` attend keys/values from ``context``.

    The fusion-layer attention of ALBEF / BLIP (text tokens attend image patch tokens) and
    of encoder-decoder models.  Parameters: ``q`` (Linear ``dim -> dim``), ``kv`` (Linear
    ``kv_dim -> 2 * dim``, keys then values), optional ``q_norm`` / ``k_norm`` (per-head
    ``norm_layer(head_dim)``), ``attn_drop`` (``nn.Dropout``, its ``p`` used in training
    only), ``proj`` (Linear ``dim -> dim``), ``proj_drop``.

    .. code-block:: python

        q = self.q(x).reshape(B, Nq, H, hd).transpose(1, 2)
        k, v = self.kv(context).reshape(B, Nk, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = softmax(q k^T / sqrt(hd), context padding masked) @ v      # fused
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Nq, dim)))

    Args:
        dim: query / output dim; divisible by ``num_heads``.
        num_heads: number of heads.
        kv_dim: last dim of ``context`` (default ``dim``), e.g. the image encoder's width.
        qkv_bias: biases of ``q`` and ``kv`` (BERT-style fusion layers use True).
        qk_norm: per-head normalization of q and k.
        attn_drop, proj_drop: dropout probabilities (training mode only).
        backend: backend of :func:`vlfast.ops.attention`.
        norm_layer: normalization for ``qk_norm`` (keyword only).
        fused: True: :func:`vlfast.ops.attention`; False: the eager formula
            :func:`vlfast.reference.attention_reference` (keyword only, see
            :func:`vlfast.models.set_fused`).

    ``forward(x, context, context_padding_mask=None)``: x (B, Nq, dim), context
    (B, Nk, kv_dim), context_padding_mask (B, Nk) bool with True = padding (a query with
    every context token padded outputs zeros before ``proj``); returns (B, Nq, dim).
    Shapes that do not fit raise ``ValueError``; a non-tensor input or a mask that is not
    bool raises ``TypeError`` (as :func:`vlfast.ops.attention`).
    """

    def __init__(self, dim: int, num_heads: int = 8, kv_dim: Optional[int] = None, qkv_bias: bool = False,
                 qk_norm: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: Optional[str] = None, *, norm_layer=nn.LayerNorm, fused: bool = True):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        kv_dim = dim if kv_dim is None else check.positive_int("kv_dim", kv_dim)
        self.dim = dim
        self.kv_dim = kv_dim
        self.num_heads = num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        #: False runs the eager formula of vlfast.reference (the baseline); see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim, dim * 2, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_tokens("CrossAttention", "x", x, self.dim, f"(B, Nq, {self.dim})")
        _check_tokens("CrossAttention", "context", context, self.kv_dim, f"(B, Nk, {self.kv_dim})")
        B, Nq, C = x.shape
        Nk = context.shape[1]
        if context.shape[0] != B:
            raise ValueError(f"batch sizes differ: x has {B}, context has {context.shape[0]}")
        if context_padding_mask is not None:
            check.bool_mask("context_padding_mask", context_padding_mask, (B, Nk), context.device)
        q = self.q(x).reshape(B, Nq, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, Nk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = _attend(self.fused, q, k, v, key_padding_mask=context_padding_mask,
                      dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(B, Nq, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kv_dim={self.kv_dim}, num_heads={self.num_heads}, backend={self.backend!r}, "
                f"fused={self.fused}")


# ---------------------------------------------------------------------------------- MultiheadAttention
def _log_deferral(reason: str) -> None:
    if reason not in _deferrals_logged:
        _deferrals_logged.add(reason)
        log.debug("vlfast.nn.MultiheadAttention: calling torch.nn.MultiheadAttention.forward because %s "
                  "(logged once per reason)", reason)


def _mask_kind(mask: Optional[torch.Tensor]) -> Optional[str]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        return "bad"
    if mask.dtype == torch.bool:
        return "bool"
    if mask.is_floating_point():
        return "float"
    return "bad"


class MultiheadAttention(nn.MultiheadAttention):
    r"""Drop-in :class:`torch.nn.MultiheadAttention` running :func:`vlfast.ops.attention`.

    Same constructor arguments (plus keyword-only ``backend``), same parameters and
    ``state_dict`` (``in_proj_weight`` or ``q_proj_weight`` / ``k_proj_weight`` /
    ``v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``embed_dim``, ``in_proj_bias``,
    ``bias_k`` / ``bias_v``, ``out_proj``), and ``isinstance(m, torch.nn.MultiheadAttention)``
    holds, so ``nn.TransformerEncoderLayer`` and friends accept it (their inference fast
    path reads the parameters directly and is unchanged).

    ``forward`` has torch's signature and semantics.  The fused path runs when
    ``need_weights=False`` (what ``nn.Transformer*Layer`` passes) and the inputs are
    supported:

    * batched (``batch_first`` either way) or unbatched inputs, self- or cross-attention,
      ``kdim`` / ``vdim``, with or without biases, ``add_bias_kv``, ``add_zero_attn``;
    * ``key_padding_mask`` (N, S) bool (True = ignore; passed to the kernel as a padding
      mask) or float (added, as an (N, 1, 1, S) ``attn_bias``);
    * ``attn_mask`` (L, S) or (N * num_heads, L, S), bool (True = not allowed -> ``-inf``)
      or float (added); both masks may be given and are summed like torch does;
    * ``is_causal``: as in torch a hint that ``attn_mask`` is the causal mask.  With
      ``attn_mask`` given, L == S, no key padding mask and no ``bias_k`` / zero-attention
      key, the kernel's causal masking replaces the mask (torch does the same); otherwise
      ``attn_mask`` is used.  Unlike torch, which raises, ``is_causal=True`` without an
      ``attn_mask`` is accepted when L == S (causal masking, query i sees keys j <= i);
    * a dense (L, L) ``attn_mask`` that is exactly the causal mask (float ``0`` / ``-inf``, as
      open_clip's text tower and ``nn.Transformer.generate_square_subsequent_mask`` build it, or
      bool ``triu(1)``) also runs the kernel's causal mode, without ``is_causal``, when L == S and
      there is no ``bias_k`` / zero-attention key; the mask is recognised once per tensor (and
      in-place change), not scanned on every call (see :func:`is_causal_mask`);
    * float16 / bfloat16 / float32; dropout ``self.dropout`` in training mode only.

    Otherwise — ``need_weights=True`` (the default: the kernel never forms the weights),
    float64 or nested-tensor inputs, head dim > 256, ``is_causal`` combined with
    ``bias_k`` / ``add_zero_attn``, or inputs whose shapes torch would reject — the call is
    deferred to :meth:`torch.nn.MultiheadAttention.forward` (identical results and errors),
    and the reason is logged once at DEBUG level on logger ``"vlfast"``.

    On the fused path a query whose keys are all excluded by a bool key padding mask
    outputs zeros before ``out_proj`` (as torch's SDPA path does), and the output for
    ``batch_first=True`` is contiguous (torch returns a transposed view).  Returns
    ``(attn_output, None)``.

    ``fused=False`` (keyword only; see :func:`vlfast.models.set_fused`) keeps this dispatch and
    the projections but replaces the fused op by the eager formula
    :func:`vlfast.reference.attention_reference` (scores materialized, torch's dropout RNG).
    """

    backend: Optional[str] = None
    fused: bool = True

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 backend: Optional[str] = None, fused: bool = True):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend
        #: False runs the eager formula of vlfast.reference (the baseline); see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)

    # ------------------------------------------------------------------ dispatch
    def _unsupported(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> Optional[str]:
        if need_weights:
            return "need_weights=True (the fused kernel never forms the attention weights)"
        if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
            return "query, key or value is not a tensor"
        if query.is_nested or key.is_nested or value.is_nested:
            return "nested-tensor inputs"
        if query.dtype not in _FUSED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
            return "inputs are not all float32, float16 or bfloat16 of one dtype"
        if self.head_dim > MAX_HEAD_DIM:
            return f"head dim > {MAX_HEAD_DIM}"
        if is_causal and (self.bias_k is not None or self.add_zero_attn):
            return "is_causal combined with add_bias_kv or add_zero_attn"
        kpm_kind, mask_kind = _mask_kind(key_padding_mask), _mask_kind(attn_mask)
        if "bad" in (kpm_kind, mask_kind):
            return "a mask is neither bool nor floating"
        # shapes: anything torch would reject goes to torch, which raises its own error
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return "query, key and value are not all 3-D (batched) or all 2-D (unbatched)"
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            return "embedding dims do not match embed_dim / kdim / vdim"
        if key.shape[:-1] != value.shape[:-1]:
            return "key and value sequence/batch dims differ"
        if batched:
            b_axis = 0 if self.batch_first else 1
            B, L, S = query.shape[b_axis], query.shape[1 - b_axis], key.shape[1 - b_axis]
            if key.shape[b_axis] != B:
                return "query and key batch sizes differ"
            kpm_shape, mask_shapes = (B, S), ((L, S), (B * self.num_heads, L, S))
        else:
            L, S = query.shape[0], key.shape[0]
            kpm_shape, mask_shapes = (S,), ((L, S), (self.num_heads, L, S))
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != kpm_shape:
            return "key_padding_mask has the wrong shape"
        if attn_mask is not None and tuple(attn_mask.shape) not in mask_shapes:
            return "attn_mask has the wrong shape"
        if is_causal and attn_mask is None and L != S:
            return "is_causal=True without attn_mask and L != S"
        return None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        reason = self._unsupported(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if reason is None:
            return self._projected_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None
        _log_deferral(reason)
        if is_causal and attn_mask is None and isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) \
                and query.dim() in (2, 3) and key.dim() == query.dim():
            # torch needs the mask for the hint; supply the causal mask it stands for (square only)
            seq = 0 if (query.dim() == 2 or not self.batch_first) else 1
            L, S = query.shape[seq], key.shape[seq]
            if L == S:
                attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

    # ------------------------------------------------------------------ fused path (or its eager formula)
    def _projected_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        batched = query.dim() == 3
        self_attn = query is key and key is value
        # work in (B, L, E)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim
        dtype = query.dtype

        # in-projection
        b = self.in_proj_bias
        if self._qkv_same_embed_dim and self_attn:
            qkv = F.linear(query, self.in_proj_weight, b).view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            if self._qkv_same_embed_dim:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            else:
                w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            q = F.linear(query, w_q, b_q).view(B, L, H, hd).transpose(1, 2)
            k = F.linear(key, w_k, b_k).view(B, S, H, hd).transpose(1, 2)
            v = F.linear(value, w_v, b_v).view(B, S, H, hd).transpose(1, 2)
        dtype = q.dtype  # autocast may have changed it

        extra = 0  # keys appended after the S real ones (bias_k / zero attention)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(dtype).view(1, H, 1, hd).expand(B, H, 1, hd)], dim=2)
            v = torch.cat([v, self.bias_v.to(dtype).view(1, H, 1, hd).expand(B, H, 1, hd)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], dim=2)
            extra += 1

        causal = False
        if is_causal and (attn_mask is None or (key_padding_mask is None and L == S and extra == 0)):
            causal, attn_mask = True, None  # L == S here (checked), so top-left == bottom-right
        elif (attn_mask is not None and attn_mask.dim() == 2 and L == S and extra == 0
              and is_causal_mask(attn_mask, true_allows=False)):
            causal, attn_mask = True, None  # the dense causal mask (open_clip's text mask): the kernel's causal mode

        kpm, bias = None, None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                kpm = F.pad(key_padding_mask, (0, extra), value=False) if extra else key_padding_mask
            else:
                bias = F.pad(key_padding_mask.to(dtype), (0, extra)).view(B, 1, 1, S + extra)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                m = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
                    attn_mask, float("-inf"))
            else:
                m = attn_mask.to(dtype)
            if extra:
                m = F.pad(m, (0, extra))
            m = m.view(1, 1, L, S + extra) if m.dim() == 2 else m.view(B, H, L, S + extra)
            bias = m if bias is None else bias + m

        out = _attend(self.fused, q, k, v, key_padding_mask=kpm, attn_bias=bias, causal=causal,
                      dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        if batched and not self.batch_first:
            out = out.permute(2, 0, 1, 3).reshape(L, B, E)   # torch's (L, B, E) layout, contiguous
            return F.linear(out, self.out_proj.weight, self.out_proj.bias)
        out = F.linear(out.transpose(1, 2).reshape(B, L, E), self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, " \
               f"backend={self.backend!r}, fused={self.fused}"
