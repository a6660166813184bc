"""MAE random masking in Triton: per-row selection, row gather (+ positional add), unshuffle.

Three kernels replace MAE's ``argsort -> argsort -> gather -> gather`` chain and the
decoder's ``cat -> gather``:

* ``_mask_rank_kernel``: for each row, the rank of every key in ascending order,
  ties broken by the lower index (a stable argsort computed by counting, O(L^2)
  comparisons per row, which is cheap for MAE's L <= a few thousand).  It writes
  ``ids_restore`` (the rank), ``ids_keep`` (the positions of ranks < len_keep, in
  rank order) and the binary mask, so no sort and no inverse permutation is run.
* ``_gather_rows_kernel``: ``out[b, r] = src[b, idx[b, r]] (+ pos[idx[b, r]])``, reading
  only the kept tokens once, the positional add fused.
* ``_unshuffle_rows_kernel``: ``out[b, j] = src[b, ids_restore[b, j]]`` when that is a
  kept slot, else ``fill``; MAE's decoder step, and the backward of the gather
  (``fill = 0``).
"""

import torch
import triton
import triton.language as tl

from ._common import TileTable, compute_type, round_to

TILES = TileTable(
    "masking",
    doc="MAE masking: rank programs own BLOCK_J positions of a row and compare them with BLOCK_K keys "
        "per step; gather / unshuffle programs copy BLOCK_D = min(next_pow2(D), BLOCK_D_CAP) features "
        "of one row.  The same on GPUs and in the interpreter; Triton's default warps and stages.",
    kernels={"rank": ("_mask_rank_kernel",), "gather": ("_gather_rows_kernel",),
             "unshuffle": ("_unshuffle_rows_kernel",)},
    keys=("kind", "dtype"),
    values=("BLOCK_J", "BLOCK_K", "BLOCK_D_CAP"),
    rows=(
        # kind       dtype  BLOCK_J  BLOCK_K  BLOCK_D_CAP
        ("rank",      "any", 64,      64,      None),
        ("gather",    "any", None,    None,    1024),
        ("unshuffle", "any", None,    None,    1024),
    ),
)


@triton.jit
def _mask_rank_kernel(
    keys_ptr,          # (B, L) floating, row stride stride_kb, unit column stride
    ids_restore_ptr,   # (B, L) int64 out: rank of position j
    ids_keep_ptr,      # (B, len_keep) int64 out: position of rank r
    mask_ptr,          # (B, L) out: 0 kept, 1 removed
    L, len_keep, stride_kb,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < L
    kj = tl.load(keys_ptr + b * stride_kb + j, mask=jm, other=0.0)
    nan_j = kj != kj
    rank = tl.zeros([BLOCK_J], dtype=tl.int32)
    for k0 in range(0, L, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < L
        kk = tl.load(keys_ptr + b * stride_kb + k, mask=km, other=0.0)
        nan_k = kk != kk
        a = kk[None, :]
        c = kj[:, None]
        na = nan_k[None, :]
        nc = nan_j[:, None]
        # key_k precedes key_j: smaller, or equal (NaN ~ NaN) with a lower index; NaN sorts last
        less = (~na & ~nc & (a < c)) | (~na & nc)
        equal = (na & nc) | (~na & ~nc & (a == c))
        before = less | (equal & (k[None, :] < j[:, None]))
        before = before & km[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    tl.store(ids_restore_ptr + b * L + j, rank.to(tl.int64), mask=jm)
    kept = rank < len_keep
    tl.store(mask_ptr + b * L + j, tl.where(kept, 0.0, 1.0).to(mask_ptr.dtype.element_ty), mask=jm)
    tl.store(ids_keep_ptr + b * len_keep + rank, j.to(tl.int64), mask=jm & kept)


@triton.jit
def _gather_rows_kernel(
    src_ptr, idx_ptr, pos_ptr, out_ptr,
    K, D,
    s_b, s_l, s_d,          # src strides (elements)
    pos_s_l, pos_s_d,       # pos strides (elements)
    HAS_POS: tl.constexpr, OUT_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)      # b * K + r
    b = row // K
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # d * stride may pass 2**31
    dm = d < D
    l = tl.load(idx_ptr + row)
    v = tl.load(src_ptr + b * s_b + l * s_l + d * s_d, mask=dm)
    if HAS_POS:
        p = tl.load(pos_ptr + l * pos_s_l + d * pos_s_d, mask=dm)
        out = round_to(v.to(COMPUTE) + p.to(COMPUTE), OUT_BF16, out_ptr.dtype.element_ty)
    else:
        out = v
    tl.store(out_ptr + row * D + d, out, mask=dm)


@triton.jit
def _unshuffle_rows_kernel(
    src_ptr, ids_restore_ptr, fill_ptr, out_ptr,
    K, L, D,
    s_b, s_k, s_d,          # src strides (elements)
    fill_s_d,
    HAS_FILL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)      # b * L + j
    b = row // L
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # d * stride may pass 2**31
    dm = d < D
    r = tl.load(ids_restore_ptr + row)
    kept = tl.full([BLOCK_D], r, tl.int64) < K   # a vector, so it combines with the lane mask
    v = tl.load(src_ptr + b * s_b + r * s_k + d * s_d, mask=dm & kept, other=0.0)
    if HAS_FILL:
        f = tl.load(fill_ptr + d * fill_s_d, mask=dm & ~kept, other=0.0)
        v = tl.where(kept, v, f)
    tl.store(out_ptr + row * D + d, v, mask=dm)


def _block_d(kind: str, D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), TILES.lookup(kind)["BLOCK_D_CAP"])


def random_masking_rank(keys: torch.Tensor, len_keep: int, mask_dtype: torch.dtype):
    """``(ids_restore, ids_keep, mask)`` for keys (B, L); see the module docstring.

    ``ids_restore[b, j]`` = rank of ``keys[b, j]`` in a stable ascending order (NaN last),
    ``ids_keep[b, r]`` = position of rank ``r < len_keep``, ``mask[b, j] = 0`` if kept else 1
    (``mask_dtype``).  Arguments are checked by ``vlfast.ops.masking``.
    Tiles: ``TILES`` kind ``rank`` (grid (B, cdiv(L, BLOCK_J))).
    """
    B, L = keys.shape
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    ids_restore = torch.empty(B, L, dtype=torch.int64, device=keys.device)
    ids_keep = torch.empty(B, len_keep, dtype=torch.int64, device=keys.device)
    mask = torch.empty(B, L, dtype=mask_dtype, device=keys.device)
    if B and L:
        t = TILES.lookup("rank")
        grid = (B, triton.cdiv(L, t["BLOCK_J"]))
        _mask_rank_kernel[grid](keys, ids_restore, ids_keep, mask, L, len_keep, keys.stride(0),
                                BLOCK_J=t["BLOCK_J"], BLOCK_K=t["BLOCK_K"])
    return ids_restore, ids_keep, mask


def random_masking_gather(src: torch.Tensor, idx: torch.Tensor, pos):
    """``out[b, r] = src[b, idx[b, r]] (+ pos[idx[b, r]])``; src (B, L, D) any strides, idx (B, K) int64.

    pos: None or (L, D) any strides; the add is computed in fp32 (fp64 for fp64 src) and rounded
    to src's dtype.  Tiles: ``TILES`` kind ``gather`` (grid (B * K, cdiv(D, BLOCK_D))).
    """
    B, L, D = src.shape
    K = idx.shape[1]
    out = torch.empty(B, K, D, dtype=src.dtype, device=src.device)
    if B * K * D == 0:
        return out
    idx = idx.contiguous()
    block_d = _block_d("gather", D)
    has_pos = pos is not None
    pos_arg = pos if has_pos else src
    pos_strides = pos.stride() if has_pos else (0, 0)
    grid = (B * K, triton.cdiv(D, block_d))
    _gather_rows_kernel[grid](
        src, idx, pos_arg, out, K, D, *src.stride(), *pos_strides,
        HAS_POS=has_pos, OUT_BF16=src.dtype == torch.bfloat16,
        COMPUTE=compute_type(src.dtype), BLOCK_D=block_d)
    return out


def unshuffle_tokens(src: torch.Tensor, ids_restore: torch.Tensor, fill):
    """``out[b, j] = src[b, ids_restore[b, j]]`` if that is < K else ``fill`` (zeros when None).

    src (B, K, D) any strides, ids_restore (B, L) int64, fill None or (D,).
    Tiles: ``TILES`` kind ``unshuffle`` (grid (B * L, cdiv(D, BLOCK_D))).
    """
    B, K, D = src.shape
    L = ids_restore.shape[1]
    out = torch.empty(B, L, D, dtype=src.dtype, device=src.device)
    if B * L * D == 0:
        return out
    ids_restore = ids_restore.contiguous()
    block_d = _block_d("unshuffle", D)
    has_fill = fill is not None
    grid = (B * L, triton.cdiv(D, block_d))
    _unshuffle_rows_kernel[grid](
        src, ids_restore, fill if has_fill else src, out, K, L, D, *src.stride(),
        fill.stride(0) if has_fill else 0, HAS_FILL=has_fill, BLOCK_D=block_d)
    return out
