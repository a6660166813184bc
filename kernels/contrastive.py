"""Tiled contrastive-loss kernels (InfoNCE log-sum-exp with soft targets, SigLIP) in Triton.

The ``Nq x Nk`` logits are never materialized in the forward: its kernels recompute score tiles
``x_ij = <q_i, k_j>`` (fp32 accumulation, ``tl.dot``; fp16/bf16 inputs use tensor cores,
fp32 inputs IEEE fp32 dots, or TF32 ones under ``torch.set_float32_matmul_precision("high")`` /
``"medium"``, as the torch GEMMs of the backward: ``_common.dot_precision``) from the features,
looping over the feature dim in ``BLOCK_D`` chunks, so any ``D`` (1..1024 and beyond) works
and only ``O((Nq + Nk) D)`` memory is touched.  The backward computes each score tile once per
pass and keeps the gradient tile ``G`` in a bounded workspace (below).

InfoNCE (``s_ij = scale * x_ij``, soft scores ``ŝ_ij = soft_scale * <sq_i, sk_j>``):

* ``_lse_fwd_kernel``: one program per (query block, key split), loops over the split's key
  blocks with an online max / sum (base-2 exponentials, ``scale * log2(e)`` folded in, never a
  raw ``exp(s)``, so ``scale = 100`` cannot overflow): ``lse``; with soft targets a second dot
  per tile, its own online max / sum (``soft_lse``) and an accumulator
  ``sum_j exp(ŝ_ij - m̂_i) x_ij`` rescaled whenever ``m̂`` grows (``soft_dot = scale * acc / l̂``).
* Split over keys (FlashDecoding's split-K): when the query blocks ``cdiv(Nq, BLOCK_M)`` are
  fewer than two waves of the device's SMs (one CLIP rank's local queries against the gathered
  keys: Nq = 4096 is 32 programs for an H200's 132 SMs), the keys are cut into ``S`` splits of
  whole key blocks, each program writes its raw ``(m, l)`` (and ``(m̂, l̂, acc)``) and
  ``_lse_combine_kernel`` merges the ``S`` partials of a row:
  ``M = max_s m_s``, ``lse = M + log2 sum_s l_s 2^(m_s - M)`` (in base 2, then times ln 2), the
  soft ones alike with ``soft_dot = scale * sum_s acc_s 2^(m̂_s - M̂) / sum_s l̂_s 2^(m̂_s - M̂)``.
  SigLIP's per-row sums split the same way (the partial rows are summed by torch).
* ``_grad_tile_kernel`` (the backward, shared by InfoNCE and SigLIP): one program per
  ``BLOCK_M x BLOCK_N`` tile of a rectangle of queries x keys computes the score tile once
  (over all of D) and writes ``G_ij = g_i p_ij (+ g̃_i t_ij)`` (InfoNCE, ``p_ij = exp(s_ij - lse_i)``,
  ``t_ij = exp(ŝ_ij - soft_lse_i)``) or ``G_ij = -g_i z_ij sigmoid(-z_ij u_ij)`` (SigLIP) in the
  inputs' dtype, plus per-program partial sums ``sum G * x`` (dscale) and ``sum G`` (SigLIP
  dbias) that torch adds up (deterministic).  The feature gradients are then two GEMMs on that
  tile, run by torch (cuBLAS on GPUs, fp32 accumulation, one rounding):
  ``dq = scale * G @ k`` and ``dk = scale * G^T @ q``.  When the whole ``Nq x Nk`` G fits the
  workspace (``WORKSPACE_BYTES``, 256 MiB by default, ``workspace_bytes=`` or
  ``$VLFAST_CONTRASTIVE_WORKSPACE_MB``) one rectangle gives both: each score tile is computed
  once, the minimum (3 GEMM passes over ``Nq * Nk * D``: scores, dq, dk).  Otherwise two passes
  of chunks: key chunks ``[0:Nq, c:c+Kc]`` give complete ``dk`` rows and query chunks
  ``[r:r+Qc, 0:Nk]`` complete ``dq`` rows (and the partial sums), so every output row is one GEMM
  with fp32 accumulation and nothing is accumulated across chunks in low precision: 4 passes,
  1.33x the minimum (the old kernel recomputed the score tile for every 128-wide output chunk
  in each of its two launches: 14 passes at D = 768).  No atomics: dq / dk are deterministic.
  fp32 inputs: the GEMMs follow torch's fp32 matmul settings (``torch.backends.cuda.matmul
  .allow_tf32``, off by default).

SigLIP (``u_ij = scale * x_ij + bias``, ``z_ij = +1`` iff ``j == i + pos_offset`` else -1):

* ``_siglip_fwd_kernel``: ``r_i = sum_j softplus(-z_ij u_ij)``, softplus computed as
  ``max(v, 0) + log1p(exp(-|v|))`` with an accurate log1p (Goldberg's
  ``log(w) * e / (w - 1)``, ``w = 1 + e``), so the tiny negative-pair terms of a
  ``bias = -10`` model keep their relative precision.
* backward: ``_grad_tile_kernel`` with the SigLIP ``G``.

``EXCLUDE_DIAG`` (constexpr, SimCLR's NT-Xent): key i leaves query i's softmax.  The forward
sets ``s_ii = -inf`` (and ``ŝ_ii``) in the tiles that cross the diagonal, so ``lse_i = log
sum_{j != i} exp(s_ij)`` (a split whose only key for row i is i gives ``m = -inf, l = 0``, which
the combine ignores); the backward gives those elements zero probability (``G_ii = 0``).  With
the flag off the kernels compile exactly as before.

Rows / columns beyond ``Nq`` / ``Nk`` are masked (zero features, ``-inf`` in the max / sum,
zero in the gradients).  All row offsets are int64; every grid is 1-D.
Outputs in bf16 are rounded with ``round_to`` (round-to-nearest-even also in the interpreter).
Tiles: the table ``TILES`` below (``vlfast info`` prints it; the interpreter's tiles are in
``_common.INTERPRETER_TILES``; tests force tiles with ``_common.override_tiles``).
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vlfast import _validation as check

from ._common import (LN2_C, LOG2E, LOG2E_C, TileTable, autotune, dot_precision, interpret, mma, round_to,
                      upcast_dot)

# ----------------------------------------------------------------------------- tiles
TILES = TileTable(
    "contrastive",
    doc="InfoNCE / SigLIP tiles, UNTUNED (never timed on a GPU), only checked by the sm_90a compile gate "
        "(python -m vlfast.kernels.gate, no GPU): fp16/bf16 dots are wgmma with no register spill for D in "
        "{256, 512, 768}, with and without soft targets; fp32 uses IEEE FMA dots (no tensor cores).  "
        "fwd: BLOCK_M x BLOCK_N score tiles, BLOCK_D-wide feature chunks (capped at next_pow2(D), and "
        "next_pow2(DS) for the soft features).  bwd: the G tile (BLOCK_M queries x BLOCK_N keys) of "
        "_grad_tile_kernel, the same feature chunks.  combine: BLOCK_M rows per program of the split-K "
        "merge.  soft: with soft targets.",
    kernels={"fwd": ("_lse_fwd_kernel", "_siglip_fwd_kernel"), "bwd": ("_grad_tile_kernel",),
             "combine": ("_lse_combine_kernel",)},
    keys=("kind", "dtype", "soft"),
    values=("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages"),
    rows=(
        # kind      dtype        soft   BLOCK_M  BLOCK_N  BLOCK_D  num_warps  num_stages
        ("fwd",     "fp16/bf16", None,  128,     64,      32,      8,         3),
        ("fwd",     "fp32",      None,  64,      32,      32,      4,         2),
        ("bwd",     "fp16/bf16", None,  128,     128,     64,      8,         3),
        ("bwd",     "fp32",      None,  64,      64,      32,      4,         2),
        ("combine", "any",       None,  128,     None,    None,    4,         None),
    ),
)


# ----------------------------------------------------------------------------- device code
@triton.jit
def _sdot(a_ptr, a_rows, a_ok, s_a, b_ptr, b_rows, b_ok, s_b,
          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
          DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_A, BLOCK_B] fp32 tile of ``<a_i, b_j>`` over the D features (BLOCK_D chunks);
    ``a_rows`` / ``b_rows`` are int64 row indices, masked rows give 0."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    a_base = a_ptr + a_rows[:, None] * s_a
    b_base = b_ptr + b_rows[:, None] * s_b
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        if D % BLOCK_D == 0:
            a = tl.load(a_base + dd[None, :], mask=a_ok[:, None], other=0.0)
            b = tl.load(b_base + dd[None, :], mask=b_ok[:, None], other=0.0)
        else:
            d_ok = dd < D
            a = tl.load(a_base + dd[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(b_base + dd[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(a, tl.trans(b), acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _log1p(e):
    """log(1 + e) for e >= 0, accurate for tiny e (Goldberg)."""
    w = 1.0 + e
    return tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, sq_ptr, sk_ptr, lse_ptr, sdot_ptr, slse_ptr, part_ptr,
    s_q, s_k, s_sq, s_sk,
    Nq, Nk, n_split, split_len,
    c_main, c_soft, scale,          # scale * log2(e), soft_scale * log2(e), scale
    D: tl.constexpr, DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
    SOFT: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr = False,
):
    # program (query block, key split); split s covers keys [s * split_len, (s + 1) * split_len)
    pid = tl.program_id(0)
    split = pid % n_split
    offs_m = (pid // n_split).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nq
    offs_n0 = tl.arange(0, BLOCK_N)
    k_lo = split.to(tl.int64) * split_len
    k_hi = tl.minimum(k_lo + split_len, Nk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mh_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lh_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(k_lo, k_hi, BLOCK_N):
        offs_n = tl.cast(start_n, tl.int64) + offs_n0
        n_ok = offs_n < k_hi
        x = _sdot(q_ptr, offs_m, m_ok, s_q, k_ptr, offs_n, n_ok, s_k,
                  D, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST)
        if EXCLUDE_DIAG:
            keep = n_ok[None, :] & (offs_n[None, :] != offs_m[:, None])
            s = tl.where(keep, x * c_main, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row whose only key so far is excluded
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
        else:
            s = tl.where(n_ok[None, :], x * c_main, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))         # finite: every tile has a valid column
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if SOFT:
            xh = _sdot(sq_ptr, offs_m, m_ok, s_sq, sk_ptr, offs_n, n_ok, s_sk,
                       DS, BLOCK_DS, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST)
            if EXCLUDE_DIAG:
                sh = tl.where(keep, xh * c_soft, float("-inf"))
                mh_new = tl.maximum(mh_i, tl.max(sh, 1))
                mh_ref = tl.where(mh_new == float("-inf"), 0.0, mh_new)
                beta = tl.exp2(mh_i - mh_ref)
                th = tl.exp2(sh - mh_ref[:, None])   # 0 on masked columns and on the diagonal
            else:
                sh = tl.where(n_ok[None, :], xh * c_soft, float("-inf"))
                mh_new = tl.maximum(mh_i, tl.max(sh, 1))
                beta = tl.exp2(mh_i - mh_new)
                th = tl.exp2(sh - mh_new[:, None])       # 0 on masked columns, where x is 0 too
            lh_i = lh_i * beta + tl.sum(th, 1)
            acc = acc * beta + tl.sum(th * x, 1)
            mh_i = mh_new

    if SPLIT:
        # raw partials, part[field, split, row]: m, l (base 2), then m̂, l̂, acc with soft targets
        plane = tl.cast(n_split, tl.int64) * Nq
        base = part_ptr + split.to(tl.int64) * Nq + offs_m
        tl.store(base, m_i, mask=m_ok)
        tl.store(base + plane, l_i, mask=m_ok)
        if SOFT:
            tl.store(base + 2 * plane, mh_i, mask=m_ok)
            tl.store(base + 3 * plane, lh_i, mask=m_ok)
            tl.store(base + 4 * plane, acc, mask=m_ok)
    else:
        tl.store(lse_ptr + offs_m, (m_i + tl.log2(l_i)) * LN2_C, mask=m_ok)
        if SOFT:
            tl.store(slse_ptr + offs_m, (mh_i + tl.log2(lh_i)) * LN2_C, mask=m_ok)
            tl.store(sdot_ptr + offs_m, acc * (scale / lh_i), mask=m_ok)


@triton.jit
def _merge_lse(part_ptr, plane, rows, rows_ok, S, Nq, BLOCK_S: tl.constexpr):
    """Merge the split partials (m_s, l_s) at ``part_ptr`` / ``part_ptr + plane`` (base 2, laid
    out [split, row]) of ``rows``: ``(M, L, w, idx, ok)`` with ``M = max_s m_s`` (0 where every
    m_s is -inf), ``L = sum_s l_s 2^(m_s - M)``, the weights ``w = 2^(m_s - M)`` and the
    [BLOCK_S, rows] offsets / mask of the partials."""
    offs_s = tl.arange(0, BLOCK_S)
    ok = (offs_s < S)[:, None] & rows_ok[None, :]
    idx = offs_s.to(tl.int64)[:, None] * Nq + rows[None, :]
    m = tl.load(part_ptr + idx, mask=ok, other=float("-inf"))
    big = tl.max(m, 0)
    big = tl.where(big == float("-inf"), 0.0, big)
    w = tl.exp2(m - big[None, :])
    l_s = tl.load(part_ptr + plane + idx, mask=ok, other=0.0)
    return big, tl.sum(l_s * w, 0), w, idx, ok


@triton.jit
def _lse_combine_kernel(part_ptr, lse_ptr, sdot_ptr, slse_ptr, Nq, S, scale,
                        SOFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nq
    plane = tl.cast(S, tl.int64) * Nq
    big, total, _, _, _ = _merge_lse(part_ptr, plane, offs_m, m_ok, S, Nq, BLOCK_S)
    tl.store(lse_ptr + offs_m, (big + tl.log2(total)) * LN2_C, mask=m_ok)
    if SOFT:
        bigh, totalh, wh, idx, ok = _merge_lse(part_ptr + 2 * plane, plane, offs_m, m_ok, S, Nq, BLOCK_S)
        acc = tl.sum(tl.load(part_ptr + 4 * plane + idx, mask=ok, other=0.0) * wh, 0)
        tl.store(slse_ptr + offs_m, (bigh + tl.log2(totalh)) * LN2_C, mask=m_ok)
        tl.store(sdot_ptr + offs_m, acc * (scale / totalh), mask=m_ok)


@triton.jit
def _siglip_fwd_kernel(
    x_ptr, y_ptr, r_ptr, s_x, s_y, Nx, Ny, n_split, split_len, scale, bias, pos_offset,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # program (row block, split); writes r_ptr[split, rows] (the split's partial row sums)
    pid = tl.program_id(0)
    split = pid % n_split
    offs_m = (pid // n_split).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nx
    offs_n0 = tl.arange(0, BLOCK_N)
    k_lo = split.to(tl.int64) * split_len
    k_hi = tl.minimum(k_lo + split_len, Ny)
    target = offs_m + pos_offset
    r = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(k_lo, k_hi, BLOCK_N):
        offs_n = tl.cast(start_n, tl.int64) + offs_n0
        n_ok = offs_n < k_hi
        x = _sdot(x_ptr, offs_m, m_ok, s_x, y_ptr, offs_n, n_ok, s_y,
                  D, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST)
        u = x * scale + bias
        v = tl.where(offs_n[None, :] == target[:, None], -u, u)      # -z * u
        sp = tl.maximum(v, 0.0) + _log1p(tl.exp(-tl.abs(v)))
        r += tl.sum(tl.where(n_ok[None, :], sp, 0.0), 1)
    tl.store(r_ptr + split.to(tl.int64) * Nx + offs_m, r, mask=m_ok)


@triton.jit
def _grad_tile_kernel(
    q_ptr, k_ptr, sq_ptr, sk_ptr,                   # queries, keys; soft features
    lse_ptr, g_ptr, slse_ptr, gs_ptr,               # per-query stats (global query index)
    G_ptr, part_ptr,
    s_q, s_k, s_sq, s_sk, s_g,
    q0, k0, Mq, Mk, n_n,                            # the rectangle [q0, q0 + Mq) x [k0, k0 + Mk)
    c_main, c_soft, scale, bias, pos_offset,
    D: tl.constexpr, DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
    SIGLIP: tl.constexpr, SOFT: tl.constexpr, PARTIALS: tl.constexpr,
    G_BF16: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, EXCLUDE_DIAG: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rm = (pid // n_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)     # rows of the rectangle
    rn = (pid % n_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < Mq
    n_ok = rn < Mk
    offs_q = q0 + rm
    offs_k = k0 + rn
    x = _sdot(q_ptr, offs_q, m_ok, s_q, k_ptr, offs_k, n_ok, s_k,
              D, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST)
    g = tl.load(g_ptr + offs_q, mask=m_ok, other=0.0)[:, None]
    in_rect = m_ok[:, None] & n_ok[None, :]
    valid = in_rect
    if EXCLUDE_DIAG:
        valid = valid & (offs_q[:, None] != offs_k[None, :])
    if SIGLIP:
        u = x * scale + bias
        pos = offs_k[None, :] == offs_q[:, None] + pos_offset
        v = tl.where(pos, -u, u)                          # -z * u
        e = tl.exp(-tl.abs(v))
        sig = tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        G = tl.where(pos, -g * sig, g * sig)
    else:
        lse = tl.load(lse_ptr + offs_q, mask=m_ok, other=0.0) * LOG2E_C
        G = g * tl.exp2(x * c_main - lse[:, None])
        if SOFT:
            xh = _sdot(sq_ptr, offs_q, m_ok, s_sq, sk_ptr, offs_k, n_ok, s_sk,
                       DS, BLOCK_DS, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST)
            slse = tl.load(slse_ptr + offs_q, mask=m_ok, other=0.0) * LOG2E_C
            gs = tl.load(gs_ptr + offs_q, mask=m_ok, other=0.0)
            G += gs[:, None] * tl.exp2(xh * c_soft - slse[:, None])
    G = tl.where(valid, G, 0.0)
    tl.store(G_ptr + rm[:, None] * s_g + rn[None, :], round_to(G, G_BF16, G_ptr.dtype.element_ty), mask=in_rect)
    if PARTIALS:
        tl.store(part_ptr + pid, tl.sum(tl.sum(G * x, 1), 0))
        tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(tl.sum(G, 1), 0))


# ----------------------------------------------------------------------------- host side
_INT64_MAX = 2 ** 63 - 1
H200_SMS = 132                  # SMs the split rule assumes off CUDA (the gate's sm_90a target, the interpreter)
MAX_SPLITS = 64                 # key splits of the forward at most
MIN_SPLIT_BLOCKS = 4            # key blocks per split at least
WORKSPACE_BYTES = 256 * 2 ** 20  # the backward's G workspace (see the module docstring)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _config(kind: str, dtype: torch.dtype, D: int, DS: int = 0, tiles=None):
    """Tiles of ``kind`` (fwd, bwd) from ``TILES`` (or ``tiles``, a lookup's dict); feature chunks
    capped at the feature dims."""
    t = TILES.lookup(kind, dtype, soft=DS > 0) if tiles is None else tiles
    return dict(bm=t["BLOCK_M"], bn=t["BLOCK_N"], bd=min(t["BLOCK_D"], _pow2(D)),
                bds=min(t["BLOCK_D"], _pow2(DS)), num_warps=t["num_warps"], num_stages=t["num_stages"])


def _half_wgmma(tiles) -> bool:
    """fp16/bf16 candidates keep wgmma: >= 64 query rows (the dots' M side) per program."""
    return tiles["BLOCK_M"] >= 64


def _tuned(kind: str, dtype: torch.dtype, DS: int, key: tuple, launch, device: torch.device):
    """``TILES.lookup(kind, ...)``, or with ``VLFAST_AUTOTUNE=1`` the fastest candidate around it
    (``_common.autotune``; ``launch(tiles)`` is repeatable: it overwrites every output)."""
    base = TILES.lookup(kind, dtype, soft=DS > 0)
    prune = _half_wgmma if dtype in (torch.float16, torch.bfloat16) and not interpret() else None
    return autotune(TILES, kind, dtype, key, base, launch, device, prune=prune)


_SM_COUNTS = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA: its properties); ``H200_SMS`` elsewhere."""
    if device.type != "cuda":
        return H200_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def plan_key_splits(n_blocks: int, Nk: int, block_n: int, device: torch.device, splits=None,
                    sms: Optional[int] = None):
    """``(S, split_len)``: the forward's split of ``Nk`` keys over ``S`` programs per query block.

    Automatic (``splits=None``): ``S = 1`` when the ``n_blocks`` query blocks fill two waves of
    the device's SMs (``num_sms``); otherwise as many splits as bring the grid to two waves, at
    most ``MAX_SPLITS`` and with at least ``MIN_SPLIT_BLOCKS`` key blocks each.  ``splits``: an
    int >= 1 asks for a count (at most the key blocks; fewer where whole key blocks do not divide
    evenly).  ``split_len`` is a multiple of ``block_n`` and ``S = cdiv(Nk, split_len)``, so no
    split is empty.  ``sms``: the SM count to plan for instead of ``num_sms(device)``.
    """
    n_kb = triton.cdiv(Nk, block_n)
    if splits is None:
        waves = 2 * (num_sms(device) if sms is None else sms)
        want = 1 if n_blocks >= waves else triton.cdiv(waves, n_blocks)
        S = max(1, min(want, MAX_SPLITS, n_kb // MIN_SPLIT_BLOCKS))
    else:
        S = min(check.integer("key_splits", splits, 1), n_kb)
    split_len = triton.cdiv(n_kb, S) * block_n
    return triton.cdiv(Nk, split_len), split_len


def _workspace(workspace_bytes) -> int:
    if workspace_bytes is not None:
        return check.integer("workspace_bytes", workspace_bytes, 1)
    env = os.environ.get("VLFAST_CONTRASTIVE_WORKSPACE_MB")
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"VLFAST_CONTRASTIVE_WORKSPACE_MB must be a number of MiB, got {env!r}") from None
        if not mb > 0:
            raise ValueError(f"VLFAST_CONTRASTIVE_WORKSPACE_MB must be > 0, got {env!r}")
        return int(mb * 2 ** 20)
    return WORKSPACE_BYTES


def grad_plan(Nq: int, Nk: int, elsize: int, block_m: int, block_n: int, workspace_bytes: int):
    """The backward's rectangles: a list of ``(q0, Mq, k0, Mk, role)`` in launch order.

    ``role`` is ``"both"`` (the whole G: dq, dk and the partial sums from one score pass),
    ``"dk"`` (a key chunk ``[0:Nq, k0:k0+Mk]``: those dk rows) or ``"dq"`` (a query chunk: those
    dq rows and the partial sums).  A chunk holds as many whole tiles as fit ``workspace_bytes``
    of G (``elsize`` bytes per element), at least one tile row.
    """
    if Nq * Nk * elsize <= workspace_bytes:
        return [(0, Nq, 0, Nk, "both")]
    kc = max(block_n, workspace_bytes // (Nq * elsize) // block_n * block_n)
    qc = max(block_m, workspace_bytes // (Nk * elsize) // block_m * block_m)
    plan = [(0, Nq, k0, min(kc, Nk - k0), "dk") for k0 in range(0, Nk, kc)]
    return plan + [(q0, min(qc, Nq - q0), 0, Nk, "dq") for q0 in range(0, Nq, qc)]


# ----------------------------------------------------------------------------- argument checks
def _check_pair(a_name, a, b_name, b):
    """Two (N, D) feature tensors of one fp32 / fp16 / bf16 dtype and device, last stride made 1."""
    a = check.tensor(a_name, a, ndim=2, dtypes=check.HALF_AND_FLOAT, shape_doc="(N, D)")
    b = check.tensor(b_name, b, ndim=2, dtypes=check.HALF_AND_FLOAT, shape_doc="(N, D)")
    if b.dtype != a.dtype:
        raise TypeError(f"{b_name} must have {a_name}'s dtype {a.dtype}, got {b.dtype}")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"{b_name} has feature dim {b.shape[1]}, expected {a_name}'s D = {a.shape[1]}")
    check.same_device(b_name, b, a.device, a_name)
    if a.stride(-1) != 1:
        a = a.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    return a, b


def _check_soft(q, k, sq, sk):
    """Soft-target features: both or neither; (Nq, DS) and (Nk, DS) on q's device."""
    if (sq is None) != (sk is None):
        raise ValueError("sq and sk must be given together (or both None)")
    if sq is None:
        return None, None
    sq, sk = _check_pair("sq", sq, "sk", sk)
    if sq.shape[0] != q.shape[0] or sk.shape[0] != k.shape[0]:
        raise ValueError(f"sq and sk must have Nq = {q.shape[0]} and Nk = {k.shape[0]} rows, "
                         f"got {sq.shape[0]} and {sk.shape[0]}")
    check.same_device("sq", sq, q.device, "q")
    return sq, sk


FEATURE_PITCH = 16             # elements: the row pitch and feature-dim multiple the kernels read (_kernel_pair)


def _kernel_pair(a, b):
    """``(a', b', D')``: the two (N, D) feature tensors as the kernels read them.

    Triton specializes integer arguments divisible by 16 (and 16-byte aligned pointers), so rows
    whose pitch and length are multiples of ``FEATURE_PITCH`` elements load 128 bits at a time;
    any other D (257, 40) or row stride gets one 16-bit load per element and, at D = 257, 222
    instead of 61 registers (the gate, bf16 forward).  Such features become zero-padded copies
    of shape (N, ceil16(D)): the padded columns add exact zeros to every dot product, so the
    scores, and everything computed from them, are unchanged.  Aligned features are used as is.
    The backward's GEMMs read the caller's tensors (any stride); the copies cost one pass over
    the features, against the ``Nq * Nk * D`` of the score tiles."""
    D = a.shape[1]
    if D % FEATURE_PITCH == 0 and all(_pitched(t) for t in (a, b)):
        return a, b, D
    Dp = triton.cdiv(max(D, 1), FEATURE_PITCH) * FEATURE_PITCH
    return F.pad(a, (0, Dp - D)), F.pad(b, (0, Dp - D)), Dp


def _pitched(t) -> bool:
    """Rows at a pitch of ``FEATURE_PITCH`` elements from a 16-byte aligned start (a single row's
    pitch does not matter)."""
    return ((t.shape[0] <= 1 or t.stride(0) % FEATURE_PITCH == 0)
            and (t.device.type == "meta" or t.data_ptr() % 16 == 0))


def _vec(name, v, n, device):
    """A per-row vector of n values as fp32 (n,) on ``device``; None gives zeros."""
    if v is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    check.tensor(name, v, dtypes=check.FLOATING)
    if v.numel() != n:
        raise ValueError(f"{name} must have {n} elements (one per row), got shape {tuple(v.shape)}")
    return v.reshape(n).to(device=device, dtype=torch.float32).contiguous()


# ----------------------------------------------------------------------------- launchers
def contrastive_loss_lse_forward(q, k, scale: float, sq=None, sk=None, soft_scale: float = 1.0,
                                 exclude_diagonal: bool = False, key_splits=None):
    """InfoNCE statistics without the logits: ``(lse, soft_dot, soft_lse)``, fp32 (Nq,) each.

    ``lse_i = log sum_j exp(scale <q_i, k_j>)``; with soft targets
    ``t_ij = softmax_j(soft_scale <sq_i, sk_j>)``, ``soft_lse_i`` its log-normalizer and
    ``soft_dot_i = sum_j t_ij * scale <q_i, k_j>``.  Nk == 0 gives lse = soft_lse = -inf,
    soft_dot = 0.

    Args:
        q: (Nq, D), k: (Nk, D), one dtype of fp32 / fp16 / bf16, one device, any row stride.
        scale, soft_scale: floats.  sq: (Nq, DS), sk: (Nk, DS) soft-target features (one dtype),
            both or neither.
        exclude_diagonal: drop key i from query i's sums (j != i in every formula above), for
            each i < min(Nq, Nk); a query left without keys gets lse = -inf.
        key_splits: None (automatic, ``plan_key_splits``) or an int >= 1: the programs per query
            block over the keys, merged by ``_lse_combine_kernel``.

    Returns: ``(lse, soft_dot, soft_lse)``; the soft ones are None without ``sq`` / ``sk``.
    Tiles: ``TILES`` kind ``fwd`` (one program per BLOCK_M queries and key split, BLOCK_N keys per
    step) and ``combine``.
    """
    q, k = _check_pair("q", q, "k", k)
    sq, sk = _check_soft(q, k, sq, sk)
    scale = check.real("scale", scale, finite=False)
    soft_scale = check.real("soft_scale", soft_scale, finite=False)
    exclude_diagonal = check.flag("exclude_diagonal", exclude_diagonal)
    if key_splits is not None:
        key_splits = check.integer("key_splits", key_splits, 1)
    soft = sq is not None
    Nq, D = q.shape
    Nk = k.shape[0]
    DS = sq.shape[1] if soft else 0
    dev = q.device
    lse = torch.empty(Nq, dtype=torch.float32, device=dev)
    sdot = torch.empty(Nq, dtype=torch.float32, device=dev) if soft else None
    slse = torch.empty(Nq, dtype=torch.float32, device=dev) if soft else None
    if Nq == 0:
        return lse, sdot, slse
    if Nk == 0:
        lse.fill_(float("-inf"))
        if soft:
            sdot.zero_(), slse.fill_(float("-inf"))
        return lse, sdot, slse
    extra = dict(EXCLUDE_DIAG=True) if exclude_diagonal else {}  # flag off: the launch of before, unchanged
    q, k, D = _kernel_pair(q, k)
    if soft:
        sq, sk, DS = _kernel_pair(sq, sk)

    def launch(tiles):
        cfg = _config("fwd", q.dtype, D, DS, tiles)
        n_m = triton.cdiv(Nq, cfg["bm"])
        S, split_len = plan_key_splits(n_m, Nk, cfg["bn"], dev, key_splits)
        part = torch.empty(5 if soft else 2, S, Nq, dtype=torch.float32, device=dev) if S > 1 else lse
        _lse_fwd_kernel[(n_m * S,)](
            q, k, sq if soft else q, sk if soft else k, lse, sdot if soft else lse, slse if soft else lse, part,
            q.stride(0), k.stride(0), sq.stride(0) if soft else 0, sk.stride(0) if soft else 0,
            Nq, Nk, S, split_len, scale * LOG2E, soft_scale * LOG2E, scale,
            D=D, DS=DS, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_D=cfg["bd"], BLOCK_DS=cfg["bds"],
            SOFT=soft, SPLIT=S > 1, DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
        if S > 1:
            t = TILES.lookup("combine")
            _lse_combine_kernel[(triton.cdiv(Nq, t["BLOCK_M"]),)](
                part, lse, sdot if soft else lse, slse if soft else lse, Nq, S, scale,
                SOFT=soft, BLOCK_M=t["BLOCK_M"], BLOCK_S=triton.next_power_of_2(S), num_warps=t["num_warps"])

    key = (D, DS, exclude_diagonal, key_splits, _pow2(Nq), _pow2(Nk))
    launch(_tuned("fwd", q.dtype, DS, key, launch, dev))
    return lse, sdot, slse


def _backward(q, k, sq, sk, lse, g, slse, gs, *, scale, soft_scale=1.0, bias=0.0, pos_offset=0,
              siglip, exclude_diagonal=False, workspace_bytes=None):
    """``(dq, dk, sums)``: ``dq = scale * G @ k``, ``dk = scale * G^T @ q`` and ``sums`` (2,) fp32 =
    ``(sum G * x, sum G)``, G over queries x keys from ``_grad_tile_kernel`` on the rectangles of
    ``grad_plan``.  Arguments are checked by the callers."""
    Nq, D = q.shape
    Nk = k.shape[0]
    soft = sq is not None
    DS = sq.shape[1] if soft else 0
    dev = q.device
    dq = torch.empty(Nq, D, dtype=q.dtype, device=dev)
    dk = torch.empty(Nk, D, dtype=k.dtype, device=dev)
    dummy = lse if lse is not None else g
    extra = dict(EXCLUDE_DIAG=True) if exclude_diagonal else {}  # flag off: the launch of before, unchanged
    ws = _workspace(workspace_bytes)
    qt, kt, Dt = _kernel_pair(q, k)                     # what the score tiles read; the GEMMs read q, k
    if soft:
        sq, sk, DS = _kernel_pair(sq, sk)

    def launch(tiles):
        cfg = _config("bwd", q.dtype, Dt, DS, tiles)
        plan = grad_plan(Nq, Nk, q.element_size(), cfg["bm"], cfg["bn"], ws)
        work = torch.empty(max(mq * mk for _, mq, _, mk, _ in plan), dtype=q.dtype, device=dev)
        return [grad_rect(rect, work, cfg) for rect in plan]

    def grad_rect(rect, work, cfg):
        q0, mq, k0, mk, role = rect
        bm, bn = cfg["bm"], cfg["bn"]
        n_n = triton.cdiv(mk, bn)
        n_prog = triton.cdiv(mq, bm) * n_n
        partials = role != "dk"
        part = torch.empty(2, n_prog, dtype=torch.float32, device=dev) if partials else g
        G = work[:mq * mk].view(mq, mk)
        _grad_tile_kernel[(n_prog,)](
            qt, kt, sq if soft else qt, sk if soft else kt,
            dummy, g, slse if soft else dummy, gs if soft else dummy,
            G, part,
            qt.stride(0), kt.stride(0), sq.stride(0) if soft else 0, sk.stride(0) if soft else 0, mk,
            q0, k0, mq, mk, n_n,
            scale * LOG2E, soft_scale * LOG2E, scale, bias, pos_offset,
            D=Dt, DS=DS, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["bd"], BLOCK_DS=cfg["bds"],
            SIGLIP=siglip, SOFT=soft, PARTIALS=partials, G_BF16=q.dtype == torch.bfloat16,
            DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
        # beta=0: the uninitialized output rows are ignored (NaN included), alpha applied before rounding
        if role != "dq":
            dk[k0:k0 + mk].addmm_(G.t(), q[q0:q0 + mq], beta=0, alpha=scale)
        if role != "dk":
            dq[q0:q0 + mq].addmm_(G, k[k0:k0 + mk], beta=0, alpha=scale)
            return part.sum(1)
        return None

    key = (Dt, DS, siglip, exclude_diagonal, _pow2(Nq), _pow2(Nk), ws)
    sums = launch(_tuned("bwd", q.dtype, DS, key, launch, dev))
    return dq, dk, torch.stack([s for s in sums if s is not None]).sum(0)


def contrastive_loss_lse_backward(q, k, scale: float, lse, g_lse, sq=None, sk=None, soft_scale: float = 1.0,
                                  soft_lse=None, g_soft=None, exclude_diagonal: bool = False,
                                  workspace_bytes=None):
    """Gradients of ``sum_i g_lse_i lse_i + g_soft_i soft_dot_i`` (the soft target t constant).

    ``G_ij = g_lse_i p_ij + g_soft_i t_ij`` with ``p_ij = exp(scale <q_i, k_j> - lse_i)``;
    returns ``(dq, dk, dscale)``: ``dq = scale G @ k`` (q.dtype), ``dk = scale G^T @ q``
    (k.dtype), ``dscale = sum_ij G_ij <q_i, k_j>`` (0-dim fp32).

    Args:
        q, k, scale, sq, sk, soft_scale: as given to ``contrastive_loss_lse_forward``.
        lse, soft_lse: (Nq,) from the forward; g_lse, g_soft: (Nq,) upstream gradients (any
            floating dtype, read as fp32).  ``g_lse`` None counts as zeros; ``g_soft`` None drops
            the soft term (``g_soft`` needs sq, sk and soft_lse).
        exclude_diagonal: as given to the forward (``G_ii = 0``).
        workspace_bytes: the G workspace (None: ``$VLFAST_CONTRASTIVE_WORKSPACE_MB`` or
            ``WORKSPACE_BYTES``); the whole Nq x Nk G in it is one score pass, else two (``grad_plan``).

    Tiles: ``TILES`` kind ``bwd`` (``_grad_tile_kernel``: one program per BLOCK_M x BLOCK_N tile of
    G); the feature gradients are torch GEMMs (``addmm``) on G.
    """
    q, k = _check_pair("q", q, "k", k)
    scale = check.real("scale", scale, finite=False)
    soft_scale = check.real("soft_scale", soft_scale, finite=False)
    exclude_diagonal = check.flag("exclude_diagonal", exclude_diagonal)
    workspace_bytes = _workspace(workspace_bytes)
    Nq, D = q.shape
    Nk = k.shape[0]
    dev = q.device
    soft = g_soft is not None
    if soft:
        if sq is None or sk is None or soft_lse is None:
            raise ValueError("g_soft needs sq, sk and soft_lse")
        sq, sk = _check_soft(q, k, sq, sk)
    if Nq == 0 or Nk == 0:
        return (torch.zeros_like(q), torch.zeros_like(k),
                torch.zeros((), dtype=torch.float32, device=dev))
    lse = _vec("lse", lse, Nq, dev)
    g_lse = _vec("g_lse", g_lse, Nq, dev)
    if soft:
        soft_lse = _vec("soft_lse", soft_lse, Nq, dev)
        g_soft = _vec("g_soft", g_soft, Nq, dev)
    else:
        sq = sk = soft_lse = None
    dq, dk, sums = _backward(q, k, sq, sk, lse, g_lse, soft_lse, g_soft, scale=scale, soft_scale=soft_scale,
                             siglip=False, exclude_diagonal=exclude_diagonal, workspace_bytes=workspace_bytes)
    return dq, dk, sums[0]


def siglip_rows_forward(x, y, scale: float, bias: float, pos_offset: int = 0, key_splits=None):
    """Per-row SigLIP loss, fp32 (Nx,): ``r_i = sum_j softplus(-z_ij (scale <x_i, y_j> + bias))``.

    ``z_ij = +1`` iff ``j == i + pos_offset`` else -1.  x: (Nx, D), y: (Ny, D), one dtype of
    fp32 / fp16 / bf16 and one device; scale, bias: floats; pos_offset: int (the global index
    of x's first row among y's rows); key_splits: as for ``contrastive_loss_lse_forward`` (the
    split partial rows are summed by torch).
    Tiles: ``TILES`` kind ``fwd`` (one program per BLOCK_M rows of x and split, BLOCK_N rows of y per step).
    """
    x, y = _check_pair("x", x, "y", y)
    scale = check.real("scale", scale, finite=False)
    bias = check.real("bias", bias, finite=False)
    pos_offset = check.integer("pos_offset", pos_offset, -_INT64_MAX - 1, _INT64_MAX)
    Nx, D = x.shape
    Ny = y.shape[0]
    if key_splits is not None:
        check.integer("key_splits", key_splits, 1)
    if Nx == 0 or Ny == 0:
        return torch.zeros(Nx, dtype=torch.float32, device=x.device)
    x, y, D = _kernel_pair(x, y)

    def launch(tiles):
        cfg = _config("fwd", x.dtype, D, 0, tiles)
        n_m = triton.cdiv(Nx, cfg["bm"])
        S, split_len = plan_key_splits(n_m, Ny, cfg["bn"], x.device, key_splits)
        r = torch.empty(S, Nx, dtype=torch.float32, device=x.device)
        _siglip_fwd_kernel[(n_m * S,)](
            x, y, r, x.stride(0), y.stride(0), Nx, Ny, S, split_len, scale, bias, pos_offset,
            D=D, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_D=cfg["bd"],
            DOT_PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return r[0] if S == 1 else r.sum(0)

    key = ("siglip", D, key_splits, _pow2(Nx), _pow2(Ny))
    return launch(_tuned("fwd", x.dtype, 0, key, launch, x.device))


def siglip_rows_backward(x, y, scale: float, bias: float, g_row, pos_offset: int = 0, workspace_bytes=None):
    """Gradients of ``sum_i g_row_i r_i``: ``G_ij = -g_row_i z_ij sigmoid(-z_ij u_ij)``,
    ``u_ij = scale <x_i, y_j> + bias``.

    Returns ``(dx, dy, dscale, dbias)``: ``dx = scale G @ y``, ``dy = scale G^T @ x`` (input
    dtypes), ``dscale = sum G_ij <x_i, y_j>``, ``dbias = sum G_ij`` (0-dim fp32).  x, y, scale,
    bias, pos_offset as for ``siglip_rows_forward``; g_row: (Nx,) floating; workspace_bytes: as
    for ``contrastive_loss_lse_backward``.
    Tiles: ``TILES`` kind ``bwd`` (``_grad_tile_kernel``), then torch GEMMs on G.
    """
    x, y = _check_pair("x", x, "y", y)
    scale = check.real("scale", scale, finite=False)
    bias = check.real("bias", bias, finite=False)
    pos_offset = check.integer("pos_offset", pos_offset, -_INT64_MAX - 1, _INT64_MAX)
    workspace_bytes = _workspace(workspace_bytes)
    Nx = x.shape[0]
    Ny = y.shape[0]
    dev = x.device
    if Nx == 0 or Ny == 0:
        z = torch.zeros((), dtype=torch.float32, device=dev)
        return torch.zeros_like(x), torch.zeros_like(y), z, z.clone()
    g_row = _vec("g_row", g_row, Nx, dev)
    dx, dy, sums = _backward(x, y, None, None, None, g_row, None, None, scale=scale, bias=bias,
                             pos_offset=pos_offset, siglip=True, workspace_bytes=workspace_bytes)
    return dx, dy, sums[0], sums[1]
