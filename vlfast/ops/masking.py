"""Fused MAE random masking and decoder unshuffle.

MAE (He et al., 2021, arXiv:2111.06377) masks 75% of the patch tokens: its
``random_masking`` draws noise, argsorts it twice, gathers the kept tokens and
gathers a mask back into order, after a full pass adding the positional
embedding; the decoder concatenates mask tokens and gathers again.  Here one
small selection kernel computes ranks, ``ids_restore``, ``ids_keep`` and the mask
from the (B, L) keys without any sort, and one gather kernel reads only the kept
tokens once with the positional add fused.  The decoder step is one kernel
writing each output row once.
"""

from typing import Optional, Tuple

import torch

from .. import _backend
from .. import _validation as check
from .._native import DTYPE_CODES

_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("native", "torch")}
#: random_masking has two parts: "rank" (selection: ids_restore, ids_keep, mask) and "gather"
OP = _backend.register_op("random_masking", _PREFERENCE, native_devices=("cpu",))
UNSHUFFLE_OP = _backend.register_op("unshuffle_tokens", _PREFERENCE, native_devices=("cpu",))

_FLOAT_DTYPES = tuple(DTYPE_CODES)


# ------------------------------------------------------------------ backend implementations
@OP.implement("torch", "rank")
def _random_masking_rank_torch(keys, len_keep, mask_dtype):
    ids_shuffle = torch.argsort(keys, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep].contiguous()
    mask = (ids_restore >= len_keep).to(mask_dtype)
    return ids_restore, ids_keep, mask


@OP.implement("torch", "gather")
def _random_masking_gather_torch(src, idx, pos):
    B, L, D = src.shape
    out = torch.gather(src, 1, idx.unsqueeze(-1).expand(-1, -1, D))
    if pos is None:
        return out.contiguous()
    compute = torch.promote_types(src.dtype, torch.float32)
    return (out.to(compute) + pos[idx].to(compute)).to(src.dtype)


@UNSHUFFLE_OP.implement("torch")
def _unshuffle_tokens_torch(src, ids_restore, fill):
    B, K, D = src.shape
    L = ids_restore.shape[1]
    fill = src.new_zeros(D) if fill is None else fill
    full = torch.cat([src, fill.reshape(1, 1, D).expand(B, L - K, D)], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


@OP.implement("native", "rank")
def _random_masking_rank_native(keys, len_keep, mask_dtype):
    from .. import _native

    C = _native.require()
    keys = keys.contiguous()
    B, L = keys.shape
    ids_restore = torch.empty(B, L, dtype=torch.int64)
    ids_keep = torch.empty(B, len_keep, dtype=torch.int64)
    mask = torch.empty(B, L, dtype=mask_dtype)
    C.random_masking_rank_cpu(keys.data_ptr(), DTYPE_CODES[keys.dtype], B, L, len_keep, ids_restore.data_ptr(),
                    ids_keep.data_ptr(), mask.data_ptr(), DTYPE_CODES[mask_dtype])
    return ids_restore, ids_keep, mask


@OP.implement("native", "gather")
def _random_masking_gather_native(src, idx, pos):
    from .. import _native

    C = _native.require()
    B, L, D = src.shape
    K = idx.shape[1]
    idx = idx.contiguous()
    out = torch.empty(B, K, D, dtype=src.dtype)
    pos_addr, pos_strides = (pos.data_ptr(), pos.stride()) if pos is not None else (0, (0, 0))
    C.random_masking_gather_cpu(src.data_ptr(), DTYPE_CODES[src.dtype], B, L, D, *src.stride(), idx.data_ptr(), K,
                      pos_addr, *pos_strides, out.data_ptr())
    return out


@UNSHUFFLE_OP.implement("native")
def _unshuffle_tokens_native(src, ids_restore, fill):
    from .. import _native

    C = _native.require()
    B, K, D = src.shape
    L = ids_restore.shape[1]
    ids_restore = ids_restore.contiguous()
    out = torch.empty(B, L, D, dtype=src.dtype)
    fill_addr, fill_stride = (fill.data_ptr(), fill.stride(0)) if fill is not None else (0, 0)
    C.unshuffle_tokens_cpu(src.data_ptr(), DTYPE_CODES[src.dtype], B, K, D, *src.stride(), ids_restore.data_ptr(),
                         L, fill_addr, fill_stride, out.data_ptr())
    return out


OP.implement("triton", "rank")(_backend.triton_launcher("masking", "random_masking_rank"))
OP.implement("triton", "gather")(_backend.triton_launcher("masking", "random_masking_gather"))
UNSHUFFLE_OP.implement("triton")(_backend.triton_launcher("masking", "unshuffle_tokens"))


def _inverse_keep(ids_restore: torch.Tensor, K: int) -> torch.Tensor:
    """Positions of slots 0..K-1: the first K entries of the inverse permutation of ids_restore."""
    B, L = ids_restore.shape
    ar = torch.arange(L, device=ids_restore.device).expand(B, L)
    # zeros, not empty: a row that is not a permutation leaves slots unwritten, and they must
    # still be valid indices for the gather kernels
    return torch.zeros_like(ids_restore).scatter_(1, ids_restore, ar)[:, :K].contiguous()


# ------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("vlfast::random_masking_rank", mutates_args=())
def _random_masking_rank_op(keys: torch.Tensor, len_keep: int, mask_dtype: torch.dtype,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return OP.impl(backend, "rank")(keys, len_keep, mask_dtype)


@_random_masking_rank_op.register_fake
def _(keys, len_keep, mask_dtype, backend):
    B, L = keys.shape
    return (keys.new_empty(B, L, dtype=torch.int64), keys.new_empty(B, len_keep, dtype=torch.int64),
            keys.new_empty(B, L, dtype=mask_dtype))


@torch.library.custom_op("vlfast::random_masking_gather", mutates_args=())
def _random_masking_gather_op(src: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                      pos: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return OP.impl(backend, "gather")(src, ids_keep, pos)


@_random_masking_gather_op.register_fake
def _(src, ids_keep, ids_restore, pos, backend):
    return src.new_empty(src.shape[0], ids_keep.shape[1], src.shape[2])


def _random_masking_gather_setup(ctx, inputs, output):
    src, ids_keep, ids_restore, pos, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.backend = backend
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = None if pos is None else pos.dtype


def _random_masking_gather_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    grad_src = torch.ops.vlfast.unshuffle_tokens(grad.contiguous(), ids_restore, None, ctx.backend)
    grad_pos = None
    if ctx.pos_shape is not None and ctx.needs_input_grad[3]:
        grad_pos = grad_src.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.pos_dtype)
    return grad_src, None, None, grad_pos, None


torch.library.register_autograd("vlfast::random_masking_gather", _random_masking_gather_backward,
                                setup_context=_random_masking_gather_setup)


@torch.library.custom_op("vlfast::unshuffle_tokens", mutates_args=())
def _unshuffle_tokens_op(src: torch.Tensor, ids_restore: torch.Tensor, fill: Optional[torch.Tensor],
                       backend: str) -> torch.Tensor:
    return UNSHUFFLE_OP.impl(backend)(src, ids_restore, fill)


@_unshuffle_tokens_op.register_fake
def _(src, ids_restore, fill, backend):
    return src.new_empty(src.shape[0], ids_restore.shape[1], src.shape[2])


def _unshuffle_tokens_setup(ctx, inputs, output):
    src, ids_restore, fill, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K = src.shape[1]
    ctx.backend = backend
    ctx.fill_dtype = None if fill is None else fill.dtype


def _unshuffle_tokens_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    grad = grad.contiguous()
    grad_src = grad_fill = None
    if ctx.needs_input_grad[0]:
        ids_keep = _inverse_keep(ids_restore, ctx.K)
        grad_src = torch.ops.vlfast.random_masking_gather(grad, ids_keep, ids_restore, None, ctx.backend)
    if ctx.fill_dtype is not None and ctx.needs_input_grad[2]:
        removed = (ids_restore >= ctx.K).unsqueeze(-1)
        acc = torch.promote_types(grad.dtype, torch.float32)
        grad_fill = torch.where(removed, grad, 0).sum((0, 1), dtype=acc).to(ctx.fill_dtype)
    return grad_src, None, grad_fill, None


torch.library.register_autograd("vlfast::unshuffle_tokens", _unshuffle_tokens_backward,
                                setup_context=_unshuffle_tokens_setup)


# ------------------------------------------------------------------ validation
def _check_x(name, x, ndim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _same_device(name, t, x):
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


# ------------------------------------------------------------------ public ops
def random_masking(x: torch.Tensor, mask_ratio: Optional[float] = None, *, noise: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   pos_embed: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""MAE per-sample random masking, fused: selection, gather and positional add in one pass.

    With ``len_keep = int(L * (1 - mask_ratio))``, keeps for each sample the
    ``len_keep`` tokens with the smallest noise, in increasing order of noise (ties
    broken by the lower index), exactly as MAE's reference::

        ids_shuffle = argsort(noise, dim=1); ids_restore = argsort(ids_shuffle, dim=1)
        x_kept = gather(x + pos_embed, 1, ids_shuffle[:, :len_keep])

    Args:
        x: (B, L, D) float32, float16, bfloat16 or float64; any strides.
        mask_ratio: fraction of tokens removed, in [0, 1).  Required unless ``mask``
            is given (then optional, and checked against the mask's count).
        noise: optional (B, L) floating keys.  With it, all three outputs equal
            the reference's exactly.  Without it, ``torch.rand(B, L, generator=generator)``
            on x's device is drawn, as MAE's code does, so the same seed gives the
            same mask as the eager MAE.
        mask: optional precomputed bool (B, L) mask, True = removed, with the same
            number of True in every row (e.g. from :func:`block_masking` or
            :func:`tube_masking`).  The kept tokens are the unmasked ones in
            increasing position order; ``ids_restore`` lists kept slots first, then
            removed ones, in position order, consistent with :func:`unshuffle_tokens`.
        generator: a ``torch.Generator`` for the noise (not with ``noise``/``mask``).
        pos_embed: optional (L, D) or (1, L, D) positional embedding, added before
            the gather (cast to x's dtype; the sum is computed in fp32 and
            rounded once).  Gets a gradient.
        backend: ``None``/``"auto"``, ``"triton"``, ``"native"`` (CPU) or ``"torch"``.

    Returns:
        ``(x_kept, mask, ids_restore)``: x_kept (B, len_keep, D) in x's dtype;
        mask (B, L) in x's dtype, 0 = kept, 1 = removed, in the original order;
        ids_restore (B, L) int64.  Gradients flow to ``x`` (zero on removed tokens)
        and ``pos_embed``.
    """
    _check_x("x", x, 3)
    B, L, D = x.shape
    if mask is not None:
        if noise is not None or generator is not None:
            raise ValueError("mask cannot be combined with noise or generator: the mask fixes the selection")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (B, L):
            raise ValueError(f"mask must have shape (B, L) = {(B, L)}, got {tuple(mask.shape)}")
        _same_device("mask", mask, x)
        counts = mask.sum(1)
        removed = int(counts[0]) if B else 0
        if B and not bool((counts == removed).all()):
            raise ValueError(f"mask must remove the same number of tokens in every row, got counts "
                             f"from {int(counts.min())} to {int(counts.max())}")
        len_keep = L - removed
        if mask_ratio is not None and int(L * (1 - check.mask_ratio(mask_ratio))) != len_keep:
            raise ValueError(f"mask keeps {len_keep} of {L} tokens but mask_ratio={mask_ratio} keeps "
                             f"{int(L * (1 - mask_ratio))}")
        keys = mask.to(torch.float32)  # stable order: kept (0) first, then removed (1), by position
    else:
        if mask_ratio is None:
            raise ValueError("mask_ratio is required unless a precomputed mask is given")
        len_keep = int(L * (1 - check.mask_ratio(mask_ratio)))
        if noise is not None:
            if generator is not None:
                raise ValueError("pass either noise or generator, not both")
            if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
                raise TypeError("noise must be a floating tensor of shape (B, L)")
            if noise.shape != (B, L):
                raise ValueError(f"noise must have shape (B, L) = {(B, L)}, got {tuple(noise.shape)}")
            _same_device("noise", noise, x)
            keys = noise.detach()
        else:
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            keys = torch.rand(B, L, device=x.device, generator=generator)
    pos = None
    if pos_embed is not None:
        if not isinstance(pos_embed, torch.Tensor) or not pos_embed.is_floating_point():
            raise TypeError("pos_embed must be a floating tensor of shape (L, D) or (1, L, D)")
        if pos_embed.shape not in ((L, D), (1, L, D)):
            raise ValueError(f"pos_embed must have shape (L, D) = {(L, D)} or (1, L, D), got {tuple(pos_embed.shape)}")
        _same_device("pos_embed", pos_embed, x)
        pos = pos_embed.reshape(L, D).to(x.dtype)
    if keys.dtype not in _FLOAT_DTYPES:
        keys = keys.float()
    name = OP.select(x.device, backend)
    ids_restore, ids_keep, mask_out = torch.ops.vlfast.random_masking_rank(keys, len_keep, x.dtype, name)
    x_kept = torch.ops.vlfast.random_masking_gather(x, ids_keep, ids_restore, pos, name)
    return x_kept, mask_out, ids_restore


def unshuffle_tokens(x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    r"""MAE decoder step: put mask tokens in the removed slots and undo the shuffle, in one pass.

    Equals ``cat([x_kept, mask_token.expand(B, L - K, C)], 1).gather(1, ids_restore[..., None].expand(-1, -1, C))``
    without building the concatenation: ``out[b, j] = x_kept[b, ids_restore[b, j]]`` when
    ``ids_restore[b, j] < K``, else ``mask_token``.

    Args:
        x_kept: (B, K, C) floating tensor (any strides).
        ids_restore: (B, L) int64 with L >= K, each row a permutation of 0..L-1 (as
            returned by :func:`random_masking`).  Values outside [0, L) raise
            ``ValueError`` in eager mode (under ``torch.compile`` the native and torch
            backends still raise; the Triton kernel does not check); the permutation
            property itself is not checked (it
            would cost a sort): a row with repeats gives the reference's forward
            but not its gradient.
        mask_token: (C,), (1, C) or (1, 1, C), cast to x_kept's dtype.  Gets a gradient
            (the sum of the output gradient over removed slots).
        backend: ``None``/``"auto"``, ``"triton"``, ``"native"`` (CPU) or ``"torch"``.

    Returns:
        (B, L, C) in x_kept's dtype.  Gradients flow to ``x_kept`` and ``mask_token``.
    """
    _check_x("x_kept", x_kept, 3)
    B, K, C = x_kept.shape
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dtype != torch.int64:
        raise TypeError(f"ids_restore must be an int64 tensor, got {getattr(ids_restore, 'dtype', type(ids_restore))}")
    if ids_restore.dim() != 2 or ids_restore.shape[0] != B:
        raise ValueError(f"ids_restore must have shape (B, L) with B = {B}, got {tuple(ids_restore.shape)}")
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(f"ids_restore has L = {L} columns, fewer than the K = {K} kept tokens")
    _same_device("ids_restore", ids_restore, x_kept)
    if not isinstance(mask_token, torch.Tensor) or not mask_token.is_floating_point():
        raise TypeError("mask_token must be a floating tensor of shape (C,), (1, C) or (1, 1, C)")
    if mask_token.shape not in ((C,), (1, C), (1, 1, C)):
        raise ValueError(f"mask_token must have shape (C,), (1, C) or (1, 1, C) with C = {C}, "
                         f"got {tuple(mask_token.shape)}")
    _same_device("mask_token", mask_token, x_kept)
    if ids_restore.numel() and not torch.compiler.is_compiling():  # data-dependent: eager only
        lo, hi = torch.aminmax(ids_restore)
        if int(lo) < 0 or int(hi) >= L:
            raise ValueError(f"ids_restore values must be in [0, {L}), got range [{int(lo)}, {int(hi)}]")
    name = UNSHUFFLE_OP.select(x_kept.device, backend)
    fill = mask_token.reshape(C).to(x_kept.dtype)
    return torch.ops.vlfast.unshuffle_tokens(x_kept, ids_restore, fill, name)
