"""Fused multi-head attention (FlashAttention-2 style) in Triton: forward, backward, dropout mask.

Scores ``s_ij = scale * <q_i, k_j> + bias_ij`` (fp32 accumulation), keys excluded by
``key_padding_mask`` (True = padding) or by ``causal`` (query ``i`` sees key ``j`` iff
``j <= i + Nk - Nq``) get ``-inf``.  ``p_ij = exp(s_ij - lse_i)`` and
``out_i = sum_j drop_ij * p_ij / (1 - dropout_p) * v_j``.  A query row whose keys are all
excluded has ``lse = -inf``, a zero output and zero gradients (every ``exp`` and division
is guarded, so no NaN appears).  This visibility rule (bias add, padding, causal, ``-inf``)
lives in one device helper, ``_visible_scores``, which all three attention kernels call.

Kernels (all on a 1-D grid: ``program_id(0) = bh * n_blocks + block``, so neither
``B * H`` nor the number of blocks meets the 65535 limit of grid axes 1/2, and programs
of the same head run next to each other and share K/V in L2):

* ``_attn_fwd_kernel``: one program per (b, h, query block); online softmax over the key
  blocks (base-2 exponentials, the scale folded with ``log2(e)``), writes ``out`` and
  ``lse`` (natural log, before dropout).
* ``_attn_bwd_preprocess_kernel``: ``delta_i = sum_d do_id * out_id`` (fp32).
* ``_attn_bwd_dkdv_kernel``: one program per (b, h, key block), loops over the query
  blocks that can see it, recomputes ``p`` from ``lse`` and accumulates ``dk``, ``dv``.
* ``_attn_bwd_dq_kernel``: one program per (b, h, query block), loops over the key blocks,
  accumulates ``dq`` and writes ``dS`` for the bias gradient.
  No atomics touch dq/dk/dv, so they are deterministic.

Interior and edge blocks: each loop runs its interior blocks apart (``EDGE=False`` in the step
helpers ``_fwd_step`` / ``_dkdv_step`` / ``_dq_step``): blocks entirely inside ``Nq`` / ``Nk``
that, with ``causal``, every query of the tile sees in full (``_interior_keys``).  They load
without row masks (and without column masks when ``D`` is a power of two) and evaluate neither
the key bound nor the causal rule; only data masks remain (padding, rows with no visible key,
the bias rows' bound).  The causal diagonal and the last partial block take the masked path.
The dK/dV kernel splits where its registers allow (``_dkdv_interior``); elsewhere it keeps one
masked loop.  The split is opt-in (``VLFAST_ATTENTION_INTERIOR=1``, ``interior_split``): the
compile gate measured its cost in registers and occupancy, and no GPU has timed it yet.

Bias gradient (``bias_grad_shape`` given; ``dbias = dS`` summed over the broadcast dims):
with no broadcast dim ``dS`` is stored directly; otherwise it is reduced inside the tile
over the query/key axis when that axis is broadcast and ``tl.atomic_add``-ed into an fp32
buffer of ``bias_grad_shape`` with relaxed semantics (a sum needs no ordering, so no memory
fence per atomic: the default acq_rel puts a ``MEMBAR.ALL.GPU`` in the hot loop; the gate's
``membar`` column counts them); the b/h programs that share an element race, so the last
bits of dbias are not deterministic.  ``deterministic=True`` instead writes the full
``(B, H, Nq, Nk)`` fp32 ``dS`` (that much extra memory) and reduces it with ``torch.sum``.

Dropout (FlashAttention-2's scheme: one Philox call per 8 scores, with 16-bit thresholds).  With
the flattened row ``r = (b*H + h)*Nq + i`` and key ``j`` in group ``g = j // 8`` at lane
``l = j % 8``: ``w0, w1, w2, w3 = tl.randint4x(seed, offset + r * ceil(Nk / 8) + g)`` (one
Philox4x32-10 call; int64 counters, ``offset + B*H*Nq*ceil(Nk / 8)`` must fit in int64; the int64
seed is Philox's key, its low and high 32-bit words), ``u_ij`` = the 16-bit half ``l % 2`` (low
half first) of word ``w_{l // 2}``, and ``drop_ij = u_ij >= t`` (True = kept) with
``t = min(round(dropout_p * 65536), 65535)`` computed on the host.  ``dropout_p`` is thus
quantized to 1/65536: the drop probability is ``t / 65536``, within 2^-17 of ``dropout_p`` (for
``dropout_p <= 1 - 2^-17``; above, ``t = 65535``).  Kept values are scaled by
``1 / (1 - dropout_p)``, the probability asked for (torch's convention), not the quantized one:
a kept-and-scaled value's expectation is off by at most ``2^-17 / (1 - dropout_p)`` relative,
and ``dropout_mask`` replayed with ``1 / (1 - dropout_p)`` reproduces the kernels exactly.  The
counters depend on (r, j) only, never on the tiles, so the forward, both backward kernels (each
with its own tiles) and ``dropout_mask`` (which materializes the mask for tests) draw the same
mask from one device helper, ``_keep_mask``.  ``dropout_p == 0`` compiles without any RNG.

Head dims that are not powers of two are padded to the next power of two (at least 16,
the smallest ``tl.dot`` K) with masked loads; ``HEAD_DIM`` is a constexpr, so the mask
folds away when ``D`` is a power of two.  Row strides that are multiples of 8 but not 16
(D = 40, 72 rows) are handed to the compiler as multiples of ``VEC`` (``_stride_vec`` on the
host, ``_aligned`` in the kernels), so their tiles load 128 bits at a time.  fp32 inputs use
IEEE fp32 dots by default, TF32 tensor-core dots when the program opted in with
``torch.set_float32_matmul_precision("high")`` (or ``"medium"``; read at each launch,
``_common.dot_precision``; the interpreter does not emulate TF32's rounding).
Outputs are rounded with ``round_to`` (bf16 round-to-nearest-even also in the interpreter).
Tiles: the table ``TILES`` below (``vlfast info`` prints it; the interpreter's tiles are in
``_common.INTERPRETER_TILES``; tests force tiles with ``_common.override_tiles``;
``VLFAST_AUTOTUNE=1`` tunes them per shape bucket, ``_tuned``).
"""

import math

import torch
import triton
import triton.language as tl

from vlfast import _validation as check

from ._common import (LN2_C, LOG2E, LOG2E_C, TileTable, autotune, dot_precision, env_flag, interpret, mma,
                      round_to, upcast_dot)

# ----------------------------------------------------------------------------- tiles
TILES = TileTable(
    "attention",
    doc="Flash attention.  max_BLOCK_D: the padded head dim (max(16, next_pow2(D)), D <= 256) is at "
        "most this.  fp16/bf16 rows are checked by the sm_90a compile gate (python -m vlfast.kernels.gate, "
        "triton 3.8, no GPU): every dot is wgmma (>= 64 rows per warpgroup on the MMA's M side: fwd/bwd_q "
        "BLOCK_M, bwd_kv BLOCK_N), no register spill for D in {40, 64, 72, 80, 128, 256} with padding, bias, "
        "causal or dropout, shared memory <= 104 KB, 1-2 CTAs per SM; under triton 3.6 too.  fp32 rows (IEEE "
        "FMA dots, whose operand rows live in registers): small tiles (16-64 rows, mostly 8 warps) that spill at "
        "most 32 B for those D and variants at N = 197 and 1024 under triton 3.8 and 3.6 (0 in most; up to "
        "39 KB with the former 64-row tiles).  tf32 rows: fp32 inputs with TF32 dots "
        "(torch.set_float32_matmul_precision('high'), _common.tile_classes): wgmma tiles (>= 64 rows on the "
        "M side), no spill except the D = 256 backward (bwd_kv up to 152 B: its fp32 dk/dv accumulators take "
        "half the registers) and, under triton 3.6, bwd_q D = 72 with a bias (16 B).  Not yet timed on a GPU: "
        "retune there (wider tiles, "
        "TMA descriptors) before relying on them.  bwd_preprocess: "
        "BLOCK_M is then clamped to [16, 4096 // BLOCK_D]; dropout_mask: BLOCK_N to max(16, next_pow2(Nk)) "
        "(every BLOCK_N a multiple of 8: one Philox call per 8 keys).",
    kernels={
        "fwd": ("_attn_fwd_kernel",),
        "bwd_preprocess": ("_attn_bwd_preprocess_kernel",),
        "bwd_kv": ("_attn_bwd_dkdv_kernel",),
        "bwd_q": ("_attn_bwd_dq_kernel",),
        "dropout_mask": ("_dropout_mask_kernel",),
    },
    keys=("kind", "dtype", "max_BLOCK_D"),
    values=("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
    rows=(
        # kind            dtype        max_BLOCK_D  BLOCK_M  BLOCK_N  num_warps  num_stages
        ("fwd",           "fp32",       64,          32,      64,      8,         2),
        ("fwd",           "tf32",       64,          128,     32,      8,         3),
        ("fwd",           "fp16/bf16",  64,          128,     32,      8,         3),
        ("fwd",           "fp32",       128,         16,      16,      4,         3),
        ("fwd",           "tf32",       128,         64,      16,      8,         2),
        ("fwd",           "fp16/bf16",  128,         64,      32,      8,         2),
        ("fwd",           "fp32",       256,         16,      32,      8,         2),
        ("fwd",           "tf32",       256,         64,      16,      8,         2),
        ("fwd",           "fp16/bf16",  256,         64,      32,      8,         2),
        ("bwd_kv",        "fp32",       64,          16,      64,      8,         2),
        ("bwd_kv",        "tf32",       64,          32,      64,      8,         2),
        ("bwd_kv",        "fp16/bf16",  64,          32,      128,     8,         3),
        ("bwd_kv",        "fp32",       128,         16,      64,      8,         2),
        ("bwd_kv",        "tf32",       128,         16,      64,      8,         2),
        ("bwd_kv",        "fp16/bf16",  128,         16,      64,      8,         2),
        ("bwd_kv",        "fp32",       256,         16,      32,      8,         2),
        ("bwd_kv",        "tf32",       256,         16,      64,      8,         2),
        ("bwd_kv",        "fp16/bf16",  256,         16,      64,      8,         2),
        ("bwd_q",         "fp32",       64,          64,      32,      8,         2),
        ("bwd_q",         "tf32",       64,          64,      32,      8,         2),
        ("bwd_q",         "fp16/bf16",  64,          128,     32,      8,         3),
        ("bwd_q",         "fp32",       128,         64,      16,      8,         2),
        ("bwd_q",         "tf32",       128,         64,      16,      8,         2),
        ("bwd_q",         "fp16/bf16",  128,         128,     16,      8,         2),
        ("bwd_q",         "fp32",       256,         32,      32,      8,         2),
        ("bwd_q",         "tf32",       256,         64,      16,      8,         2),
        ("bwd_q",         "fp16/bf16",  256,         64,      16,      8,         2),
        ("bwd_preprocess", "any",       None,        16,      None,    None,      None),
        ("dropout_mask",  "any",        None,        16,      256,     None,      None),
    ),
)


# ----------------------------------------------------------------------------- device code
@triton.jit
def _visible_scores(s, offs_m, offs_n, m_ok, n_ok, live, bias_ptr, s_bm, s_bn, kpm_ptr, s_pn, Nq, Nk,
                    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                    LIVE: tl.constexpr, TRANS: tl.constexpr, EDGE: tl.constexpr):
    """The visibility rule of every attention kernel, applied to one score tile (base 2).

    ``s`` holds ``scale * log2(e) * <q_i, k_j>`` (fp32) for queries ``offs_m`` and keys ``offs_n``
    (absolute indices), laid out ``[queries, keys]``, or ``[keys, queries]`` when ``TRANS``.
    Returns ``s + log2(e) * bias_ij`` where query ``i`` sees key ``j`` and ``-inf`` elsewhere.
    Query ``i`` sees key ``j`` iff ``j < Nk`` (``n_ok``), key ``j`` is not padding
    (``kpm_ptr[j * s_pn] == 0``), with ``CAUSAL`` ``j <= i + Nk - Nq`` (bottom-right aligned) and,
    with ``LIVE`` (the backward), ``live_i`` (the row has a finite lse; dead rows get no gradient).
    ``m_ok`` (``i < Nq``) masks the bias loads; the forward does not mask rows (out-of-range rows
    are never stored).  ``bias_ptr`` points at the bias element (offs_m[0], offs_n[0]) of this
    (b, h), ``s_bm`` / ``s_bn`` its query / key strides; ``kpm_ptr`` points at batch row b.

    ``EDGE`` False: an interior tile, whose keys are all ``< Nk`` and, with ``CAUSAL``, all visible
    to every query of the tile (the caller's loop bounds guarantee it): neither the key bound nor
    the causal rule is evaluated, only the data masks (padding, live rows, the bias rows' bound).
    """
    if HAS_BIAS:
        if TRANS:
            bias_off = tl.arange(0, s.shape[0])[:, None] * s_bn + tl.arange(0, s.shape[1])[None, :] * s_bm
            if EDGE:
                in_range = n_ok[:, None] & m_ok[None, :]
            else:
                in_range = m_ok[None, :]
        else:
            bias_off = tl.arange(0, s.shape[0])[:, None] * s_bm + tl.arange(0, s.shape[1])[None, :] * s_bn
            if EDGE:
                in_range = m_ok[:, None] & n_ok[None, :]
            else:
                in_range = m_ok[:, None]
        bias = tl.load(bias_ptr + bias_off, mask=in_range, other=0.0)
        s += bias.to(tl.float32) * LOG2E_C
    if EDGE:
        key_ok = n_ok
        if HAS_KPM:
            pad = tl.load(kpm_ptr + offs_n.to(tl.int64) * s_pn, mask=n_ok, other=1)
            key_ok = key_ok & (pad == 0)
        if TRANS:
            valid = key_ok[:, None]
            if LIVE:
                valid = valid & live[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + (Nk - Nq))
        else:
            valid = key_ok[None, :]
            if LIVE:
                valid = valid & live[:, None]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Nk - Nq))
        s = tl.where(valid, s, float("-inf"))
    elif HAS_KPM:
        key_ok = tl.load(kpm_ptr + offs_n.to(tl.int64) * s_pn) == 0
        if TRANS:
            valid = key_ok[:, None]
            if LIVE:
                valid = valid & live[None, :]
        else:
            valid = key_ok[None, :]
            if LIVE:
                valid = valid & live[:, None]
        s = tl.where(valid, s, float("-inf"))
    elif LIVE:
        if TRANS:
            s = tl.where(live[None, :], s, float("-inf"))
        else:
            s = tl.where(live[:, None], s, float("-inf"))
    return s


@triton.jit
def _aligned(s_b, s_h, s_r, VEC: tl.constexpr):
    """The batch, head and row strides of one tensor, known to the compiler as multiples of ``VEC``
    (the host's ``_stride_vec`` guarantees it on every dim of size > 1; on a dim of size 1 the
    index is 0 and the stride's value does not matter).

    ``(s // VEC) * VEC`` is the identity on those strides and gives Triton's axis analysis
    divisibility ``VEC``, so the tile loads of D = 40 / 72 rows (strides multiples of 8, not of the
    16 Triton specializes) become 128-bit loads and cp.async copies instead of one 16-bit load per
    element.  ``tl.multiple_of`` cannot say it: on a scalar kernel argument (a block argument with no
    defining op) triton 3.6 and 3.8 drop the hint (the gate's SASS shows scalar loads either way).
    """
    if VEC > 1:
        s_b = (s_b // VEC) * VEC
        s_h = (s_h // VEC) * VEC
        s_r = (s_r // VEC) * VEC
    return s_b, s_h, s_r


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``tl.load(ptrs)`` of a 2-D tile, masked (0 outside) by ``row_ok`` (axis 0) when ``ROWS`` and
    by ``col_ok`` (axis 1) when ``COLS``; neither: an unmasked load (interior tiles, even D)."""
    if ROWS:
        if COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _interior_keys(start_m, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the interior key blocks of the query block at ``start_m`` (a multiple of BLOCK_N):
    keys ``[0, end)`` are all ``< Nk`` and, with ``CAUSAL``, visible to every query of the block
    (its first row, ``start_m``, sees ``j <= start_m + Nk - Nq``)."""
    end = (Nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        end = tl.minimum(end, (tl.maximum(start_m + Nk - Nq + 1, 0) // BLOCK_N) * BLOCK_N)
    return end


@triton.jit
def _dropout_row_counters(offset, rows, Nk):
    """First Philox counter of each flattened row ``rows`` (int64 ``(b*H + h)*Nq + i``) of the
    dropout mask: ``offset + r * ceil(Nk / 8)`` (int64)."""
    return offset + rows.to(tl.int64) * ((Nk + 7) // 8)


@triton.jit
def _keep_mask(seed, row_ctr, start_n, threshold, BLOCK_N: tl.constexpr, TRANS: tl.constexpr):
    """The dropout keep-mask (True = kept) of the rows whose first counters are ``row_ctr`` by the
    keys ``start_n + [0, BLOCK_N)``.

    ``row_ctr``: ``_dropout_row_counters`` of the tile's ``M`` rows; ``start_n``: a multiple of 8;
    ``threshold``: ``t``, an int in [0, 65535].  One Philox4x32-10 call (``tl.randint4x``) per 8
    keys: key ``j`` (group ``g = j // 8``, lane ``l = j % 8``) of row ``r`` takes the 16-bit half
    ``l % 2`` (low half first) of word ``l // 2`` of counter ``offset + r * ceil(Nk / 8) + g`` and is
    kept iff that half is ``>= t``.  The counters depend on (r, j) only, never on the tile, so every
    kernel draws the same mask.  Returns ``[M, BLOCK_N]``, or ``[BLOCK_N, M]`` when ``TRANS``.
    """
    tl.static_assert(BLOCK_N % 8 == 0, "dropout mask: BLOCK_N must be a multiple of 8 (8 keys per Philox call)")
    G: tl.constexpr = BLOCK_N // 8
    groups = (start_n // 8 + tl.arange(0, G)).to(tl.int64)
    if TRANS:   # built transposed ([G, M] counters): cheaper than tl.trans of the [M, BLOCK_N] mask
        ctr = groups[:, None] + row_ctr[None, :]
    else:
        ctr = row_ctr[:, None] + groups[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, ctr)
    # lane l = 4*b2 + 2*b1 + b0 takes word 2*b2 + b1, half b0; each join appends one bit (as a
    # new last axis), so the row-major flattening below runs g, b2, b1, b0 = j, lane fastest
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))                      # [*ctr.shape, b2, b1]
    t = tl.full([], threshold, tl.uint32)                                  # (an int arg of 1 is a constexpr)
    keep = tl.join(words & 0xFFFF, words >> 16) >= t                       # [*ctr.shape, b2, b1, b0]
    if TRANS:
        keep = tl.reshape(tl.permute(keep, [0, 2, 3, 4, 1]), [BLOCK_N, row_ctr.shape[0]])
    else:
        keep = tl.reshape(keep, [row_ctr.shape[0], BLOCK_N])
    return keep


@triton.jit
def _dropout_mask_kernel(out_ptr, R, Nk, seed, offset, threshold,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # (b*H + h)*Nq + i
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = _keep_mask(seed, _dropout_row_counters(offset, rows, Nk), start_n, threshold, BLOCK_N, False)
    idx = rows[:, None] * Nk + offs_n.to(tl.int64)[None, :]
    tl.store(out_ptr + idx, keep.to(tl.int8), mask=(rows < R)[:, None] & (offs_n < Nk)[None, :])


@triton.jit
def _fwd_step(acc, m_i, l_i, q, start_n, offs_m, offs_n0, offs_d, m_ok, d_ok, k_base, v_base, s_kn, s_vn,
              bias_base, s_bm, s_bn, kpm_base, s_pn, Nq, Nk, qk_scale, seed, drop_rows, drop_thresh,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
              CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EDGE: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One key block of the forward's online softmax: ``(acc, m_i, l_i)`` updated.  ``EDGE`` False
    for interior blocks (``_interior_keys``): no key-bound or causal mask math."""
    offs_n = start_n + offs_n0
    n_ok = offs_n < Nk
    kv_off = tl.cast(start_n, tl.int64)
    k = _load_tile(k_base + kv_off * s_kn + offs_n0[:, None] * s_kn + offs_d[None, :], n_ok, d_ok,
                   EDGE, not EVEN_D)
    s = mma(q, tl.trans(k), None, DOT_PREC, UPCAST_DOT) * qk_scale
    s = _visible_scores(s, offs_m, offs_n, m_ok, n_ok, m_ok, bias_base + kv_off * s_bn, s_bm, s_bn,
                        kpm_base, s_pn, Nq, Nk, HAS_BIAS, HAS_KPM, CAUSAL, False, False, EDGE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = _keep_mask(seed, drop_rows, start_n, drop_thresh, BLOCK_N, False)
        p = tl.where(keep, p, 0.0)
    v = _load_tile(v_base + kv_off * s_vn + offs_n0[:, None] * s_vn + offs_d[None, :], n_ok, d_ok,
                   EDGE, not EVEN_D)
    acc = mma(p.to(q.dtype), v, acc, DOT_PREC, UPCAST_DOT)
    return acc, m_new, l_i


@triton.jit
def _dkdv_step(dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, n_ok, d_ok, q_base, do_base, s_qm, s_dm,
               lse_ptr, delta_ptr, row_base, bias_base, s_bm, s_bn, kpm_base, s_pn, Nq, Nk, qk_scale,
               seed, offset, drop_thresh, drop_scale, start_n,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EDGE: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One query block of the dk / dv loop (tiles ``[keys, queries]``): ``(dk, dv)`` updated.
    ``EDGE`` False for interior blocks: full query rows, every key of the block in range and
    visible to every query (no bound / causal mask math)."""
    offs_m = start_m + offs_m0
    m_ok = offs_m < Nq
    q_off = tl.cast(start_m, tl.int64)
    qT = _load_tile(q_base + q_off * s_qm + offs_m0[None, :] * s_qm + offs_d[:, None], d_ok, m_ok,
                    not EVEN_D, EDGE)
    if EDGE:
        lse = tl.load(lse_ptr + row_base + offs_m, mask=m_ok, other=float("-inf"))
    else:
        lse = tl.load(lse_ptr + row_base + offs_m)
    row_ok = lse != float("-inf")                      # rows that see no key get no gradient
    lse2 = tl.where(row_ok, lse * LOG2E_C, 0.0)
    sT = mma(k, qT, None, DOT_PREC, UPCAST_DOT) * qk_scale
    sT = _visible_scores(sT, offs_m, offs_n, m_ok, n_ok, row_ok, bias_base + q_off * s_bm, s_bm, s_bn,
                         kpm_base, s_pn, Nq, Nk, HAS_BIAS, HAS_KPM, CAUSAL, True, True, EDGE)
    pT = tl.exp2(sT - lse2[None, :])
    do = _load_tile(do_base + q_off * s_dm + offs_m0[:, None] * s_dm + offs_d[None, :], m_ok, d_ok,
                    EDGE, not EVEN_D)
    dpT = mma(v, tl.trans(do), None, DOT_PREC, UPCAST_DOT)
    if DROPOUT:
        keep = _keep_mask(seed, _dropout_row_counters(offset, row_base + offs_m, Nk), start_n,
                          drop_thresh, BLOCK_N, True)
        pdT = tl.where(keep, pT * drop_scale, 0.0)
        dpT = tl.where(keep, dpT * drop_scale, 0.0)
    else:
        pdT = pT
    dv = mma(pdT.to(k.dtype), do, dv, DOT_PREC, UPCAST_DOT)
    if EDGE:                                           # (loaded late: one row vector less live above)
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_ok, other=0.0)
    else:
        delta = tl.load(delta_ptr + row_base + offs_m)
    dsT = pT * (dpT - delta[None, :])
    dk = mma(dsT.to(k.dtype), tl.trans(qT), dk, DOT_PREC, UPCAST_DOT)
    return dk, dv


@triton.jit
def _dq_step(dq, q, do, lse2, delta, row_ok, start_n, offs_m, offs_n0, offs_d, m_ok, d_ok, k_base, v_base,
             s_kn, s_vn, bias_base, s_bm, s_bn, kpm_base, s_pn, g_base, s_gm, s_gn, Nq, Nk, qk_scale,
             seed, drop_rows, drop_thresh, drop_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DBIAS: tl.constexpr,
             REDUCE_M: tl.constexpr, REDUCE_N: tl.constexpr, EDGE: tl.constexpr,
             DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One key block of the dq loop (and its dS for the bias gradient): ``dq`` updated.  ``EDGE``
    False for interior blocks (``_interior_keys``): no key-bound or causal mask math."""
    offs_n = start_n + offs_n0
    n_ok = offs_n < Nk
    kv_off = tl.cast(start_n, tl.int64)
    k = _load_tile(k_base + kv_off * s_kn + offs_n0[:, None] * s_kn + offs_d[None, :], n_ok, d_ok,
                   EDGE, not EVEN_D)
    v = _load_tile(v_base + kv_off * s_vn + offs_n0[:, None] * s_vn + offs_d[None, :], n_ok, d_ok,
                   EDGE, not EVEN_D)
    s = mma(q, tl.trans(k), None, DOT_PREC, UPCAST_DOT) * qk_scale
    s = _visible_scores(s, offs_m, offs_n, m_ok, n_ok, row_ok, bias_base + kv_off * s_bn, s_bm, s_bn,
                        kpm_base, s_pn, Nq, Nk, HAS_BIAS, HAS_KPM, CAUSAL, True, False, EDGE)
    p = tl.exp2(s - lse2[:, None])
    dp = mma(do, tl.trans(v), None, DOT_PREC, UPCAST_DOT)
    if DROPOUT:
        keep = _keep_mask(seed, drop_rows, start_n, drop_thresh, BLOCK_N, False)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    dq = mma(ds.to(q.dtype), k, dq, DOT_PREC, UPCAST_DOT)
    if DBIAS == 1:
        tl.store(g_base + tl.arange(0, BLOCK_M)[:, None] * s_gm + kv_off * s_gn
                 + offs_n0[None, :] * s_gn, ds, mask=m_ok[:, None] & n_ok[None, :])
    elif DBIAS == 2:
        if REDUCE_M and REDUCE_N:
            tl.atomic_add(g_base, tl.sum(tl.sum(ds, 1), 0), sem="relaxed")
        elif REDUCE_M:
            tl.atomic_add(g_base + kv_off * s_gn + offs_n0 * s_gn, tl.sum(ds, 0), mask=n_ok, sem="relaxed")
        elif REDUCE_N:
            tl.atomic_add(g_base + tl.arange(0, BLOCK_M) * s_gm, tl.sum(ds, 1), mask=m_ok, sem="relaxed")
        else:
            tl.atomic_add(g_base + tl.arange(0, BLOCK_M)[:, None] * s_gm + kv_off * s_gn
                          + offs_n0[None, :] * s_gn, ds, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")
    return dq


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, kpm_ptr, out_ptr, lse_ptr,
    s_qb, s_qh, s_qm,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_bb, s_bh, s_bm, s_bn,
    s_pb, s_pn,
    H, Nq, Nk, num_m,
    qk_scale,                       # scale * log2(e)
    drop_thresh, drop_scale, seed, offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    OUT_BF16: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERIOR: tl.constexpr,
    VEC: tl.constexpr,
):
    s_qb, s_qh, s_qm = _aligned(s_qb, s_qh, s_qm, VEC)
    s_kb, s_kh, s_kn = _aligned(s_kb, s_kh, s_kn, VEC)
    s_vb, s_vh, s_vn = _aligned(s_vb, s_vh, s_vn, VEC)
    pid = tl.program_id(0)
    bh = pid // num_m
    blk = pid % num_m
    if CAUSAL:
        blk = num_m - 1 - blk          # heaviest (last) query blocks first
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_m = blk * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM

    q_base = q_ptr + b * s_qb + h * s_qh + start_m.to(tl.int64) * s_qm
    q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * s_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    bias_base = bias_ptr + b * s_bb + h * s_bh + start_m.to(tl.int64) * s_bm   # unused without a bias
    kpm_base = kpm_ptr + b * s_pb
    drop_rows = offset                                  # (unused without dropout)
    if DROPOUT:
        drop_rows = _dropout_row_counters(offset, bh.to(tl.int64) * Nq + offs_m, Nk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = Nk
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + Nk - Nq, 0))
    mid = 0                                             # INTERIOR False: every block masked
    if INTERIOR:
        mid = _interior_keys(start_m, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    if INTERIOR:
        for start_n in range(0, mid, BLOCK_N):              # interior blocks: no bound / causal masks
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, start_n, offs_m, offs_n0, offs_d, m_ok, d_ok, k_base, v_base,
                                      s_kn, s_vn, bias_base, s_bm, s_bn, kpm_base, s_pn, Nq, Nk, qk_scale, seed,
                                      drop_rows, drop_thresh, BLOCK_N, HEAD_DIM == BLOCK_D, HAS_BIAS, HAS_KPM,
                                      CAUSAL, DROPOUT, False, DOT_PREC, UPCAST_DOT)
    for start_n in range(mid, hi, BLOCK_N):             # the causal diagonal and the last partial block
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, start_n, offs_m, offs_n0, offs_d, m_ok, d_ok, k_base, v_base,
                                  s_kn, s_vn, bias_base, s_bm, s_bn, kpm_base, s_pn, Nq, Nk, qk_scale, seed,
                                  drop_rows, drop_thresh, BLOCK_N, HEAD_DIM == BLOCK_D, HAS_BIAS, HAS_KPM,
                                  CAUSAL, DROPOUT, True, DOT_PREC, UPCAST_DOT)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2_C)
    row = bh.to(tl.int64) * Nq + offs_m
    tl.store(lse_ptr + row, lse, mask=m_ok)
    tl.store(out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
             round_to(out, OUT_BF16, out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_preprocess_kernel(
    out_ptr, do_ptr, delta_ptr,
    s_ob, s_oh, s_om,
    s_db, s_dh, s_dm,
    H, Nq, num_m,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr,
):
    s_ob, s_oh, s_om = _aligned(s_ob, s_oh, s_om, VEC)
    s_db, s_dh, s_dm = _aligned(s_db, s_dh, s_dm, VEC)
    pid = tl.program_id(0)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < Nq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(out_ptr + b * s_ob + h * s_oh + rows * s_om + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(do_ptr + b * s_db + h * s_dh + rows * s_dm + offs_d[None, :], mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    s_qb, s_qh, s_qm,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_bb, s_bh, s_bm, s_bn,
    s_pb, s_pn,
    s_db, s_dh, s_dm,
    H, Nq, Nk, num_n,
    qk_scale, scale,
    drop_thresh, drop_scale, seed, offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    OUT_BF16: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERIOR: tl.constexpr,
    VEC: tl.constexpr,
):
    # Tiles are laid out transposed, [keys, queries], so that dv += p^T do and dk += dS^T q
    # need no transposed accumulators.
    s_qb, s_qh, s_qm = _aligned(s_qb, s_qh, s_qm, VEC)
    s_kb, s_kh, s_kn = _aligned(s_kb, s_kh, s_kn, VEC)
    s_vb, s_vh, s_vn = _aligned(s_vb, s_vh, s_vn, VEC)
    s_db, s_dh, s_dm = _aligned(s_db, s_dh, s_dm, VEC)
    pid = tl.program_id(0)
    bh = pid // num_n
    start_n = (pid % num_n) * BLOCK_N
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    n_ok = offs_n < Nk
    d_ok = offs_d < HEAD_DIM

    rows_n = offs_n.to(tl.int64)[:, None]
    k = tl.load(k_ptr + b * s_kb + h * s_kh + rows_n * s_kn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + rows_n * s_vn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    q_base = q_ptr + b * s_qb + h * s_qh
    do_base = do_ptr + b * s_db + h * s_dh
    bias_base = bias_ptr + b * s_bb + h * s_bh + tl.cast(start_n, tl.int64) * s_bn   # unused without a bias
    kpm_base = kpm_ptr + b * s_pb
    row_base = bh.to(tl.int64) * Nq

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(start_n + Nq - Nk, 0) // BLOCK_M) * BLOCK_M
    # Interior query blocks [mid_lo, mid_hi): full rows, this key block entirely < Nk and, causal,
    # visible to all of them (query start_m >= start_n + BLOCK_N - 1 + Nq - Nk).  The edge blocks,
    # [lo, mid_lo) (the causal diagonal) and [mid_hi, Nq) (the last partial rows), run apart.
    # INTERIOR False (the host's choice where the split costs registers): one masked loop.
    mid_lo = Nq
    mid_hi = Nq
    if INTERIOR:
        m_full = (Nq // BLOCK_M) * BLOCK_M
        mid_lo = lo
        if CAUSAL:
            first = tl.maximum(start_n + BLOCK_N - 1 + Nq - Nk, 0)
            mid_lo = tl.maximum(lo, ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        key_full = start_n + BLOCK_N <= Nk
        mid_lo = tl.where(key_full, tl.minimum(mid_lo, m_full), lo)
        mid_hi = tl.where(key_full, m_full, lo)
    for start_m in range(lo, mid_lo, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, n_ok, d_ok, q_base, do_base, s_qm,
                            s_dm, lse_ptr, delta_ptr, row_base, bias_base, s_bm, s_bn, kpm_base, s_pn, Nq, Nk,
                            qk_scale, seed, offset, drop_thresh, drop_scale, start_n, BLOCK_N,
                            HEAD_DIM == BLOCK_D, HAS_BIAS, HAS_KPM, CAUSAL, DROPOUT, True, DOT_PREC, UPCAST_DOT)
    if INTERIOR:
        for start_m in range(mid_hi, Nq, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, n_ok, d_ok, q_base, do_base, s_qm,
                                s_dm, lse_ptr, delta_ptr, row_base, bias_base, s_bm, s_bn, kpm_base, s_pn, Nq, Nk,
                                qk_scale, seed, offset, drop_thresh, drop_scale, start_n, BLOCK_N,
                                HEAD_DIM == BLOCK_D, HAS_BIAS, HAS_KPM, CAUSAL, DROPOUT, True, DOT_PREC, UPCAST_DOT)
    if INTERIOR:
        for start_m in range(mid_lo, mid_hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, n_ok, d_ok, q_base, do_base, s_qm,
                                s_dm, lse_ptr, delta_ptr, row_base, bias_base, s_bm, s_bn, kpm_base, s_pn, Nq, Nk,
                                qk_scale, seed, offset, drop_thresh, drop_scale, start_n, BLOCK_N,
                                HEAD_DIM == BLOCK_D, HAS_BIAS, HAS_KPM, CAUSAL, DROPOUT, False, DOT_PREC, UPCAST_DOT)

    dk = dk * scale
    out_rows = (bh.to(tl.int64) * Nk + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    msk = n_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + out_rows, round_to(dk, OUT_BF16, dk_ptr.dtype.element_ty), mask=msk)
    tl.store(dv_ptr + out_rows, round_to(dv, OUT_BF16, dv_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr,
    s_qb, s_qh, s_qm,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_bb, s_bh, s_bm, s_bn,
    s_pb, s_pn,
    s_db, s_dh, s_dm,
    s_gb, s_gh, s_gm, s_gn,           # dbias buffer strides (0 on broadcast dims)
    H, Nq, Nk, num_m,
    qk_scale, scale,
    drop_thresh, drop_scale, seed, offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    DBIAS: tl.constexpr,              # 0: none, 1: store dS, 2: atomic_add into a broadcast buffer
    REDUCE_M: tl.constexpr, REDUCE_N: tl.constexpr,   # (DBIAS == 2) sum the tile over queries / keys
    OUT_BF16: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERIOR: tl.constexpr,
    VEC: tl.constexpr,
):
    s_qb, s_qh, s_qm = _aligned(s_qb, s_qh, s_qm, VEC)
    s_kb, s_kh, s_kn = _aligned(s_kb, s_kh, s_kn, VEC)
    s_vb, s_vh, s_vn = _aligned(s_vb, s_vh, s_vn, VEC)
    s_db, s_dh, s_dm = _aligned(s_db, s_dh, s_dm, VEC)
    pid = tl.program_id(0)
    bh = pid // num_m
    blk = pid % num_m
    if CAUSAL:
        blk = num_m - 1 - blk
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_m = blk * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM
    m_off = start_m.to(tl.int64)

    qd_msk = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + m_off * s_qm + tl.arange(0, BLOCK_M)[:, None] * s_qm
                + offs_d[None, :], mask=qd_msk, other=0.0)
    do = tl.load(do_ptr + b * s_db + h * s_dh + m_off * s_dm + tl.arange(0, BLOCK_M)[:, None] * s_dm
                 + offs_d[None, :], mask=qd_msk, other=0.0)
    row = bh.to(tl.int64) * Nq + offs_m
    lse = tl.load(lse_ptr + row, mask=m_ok, other=float("-inf"))
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
    row_ok = lse != float("-inf")                      # rows that see no key get no gradient
    lse2 = tl.where(row_ok, lse * LOG2E_C, 0.0)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    bias_base = bias_ptr + b * s_bb + h * s_bh + m_off * s_bm   # unused without a bias
    kpm_base = kpm_ptr + b * s_pb
    g_base = dbias_ptr                                  # (unused without a bias gradient)
    if DBIAS != 0:
        g_base = dbias_ptr + b * s_gb + h * s_gh + m_off * s_gm
    drop_rows = offset                                  # (unused without dropout)
    if DROPOUT:
        drop_rows = _dropout_row_counters(offset, row, Nk)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Nk
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + Nk - Nq, 0))
    mid = 0                                             # INTERIOR False: every block masked
    if INTERIOR:
        mid = _interior_keys(start_m, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    if INTERIOR:
        for start_n in range(0, mid, BLOCK_N):              # interior blocks: no bound / causal masks
            dq = _dq_step(dq, q, do, lse2, delta, row_ok, start_n, offs_m, offs_n0, offs_d, m_ok, d_ok, k_base,
                          v_base, s_kn, s_vn, bias_base, s_bm, s_bn, kpm_base, s_pn, g_base, s_gm, s_gn, Nq, Nk,
                          qk_scale, seed, drop_rows, drop_thresh, drop_scale, BLOCK_M, BLOCK_N, HEAD_DIM == BLOCK_D,
                          HAS_BIAS, HAS_KPM, CAUSAL, DROPOUT, DBIAS, REDUCE_M, REDUCE_N, False, DOT_PREC, UPCAST_DOT)
    for start_n in range(mid, hi, BLOCK_N):             # the causal diagonal and the last partial block
        dq = _dq_step(dq, q, do, lse2, delta, row_ok, start_n, offs_m, offs_n0, offs_d, m_ok, d_ok, k_base,
                      v_base, s_kn, s_vn, bias_base, s_bm, s_bn, kpm_base, s_pn, g_base, s_gm, s_gn, Nq, Nk,
                      qk_scale, seed, drop_rows, drop_thresh, drop_scale, BLOCK_M, BLOCK_N, HEAD_DIM == BLOCK_D,
                      HAS_BIAS, HAS_KPM, CAUSAL, DROPOUT, DBIAS, REDUCE_M, REDUCE_N, True, DOT_PREC, UPCAST_DOT)

    dq = dq * scale
    tl.store(dq_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
             round_to(dq, OUT_BF16, dq_ptr.dtype.element_ty), mask=qd_msk)


# ----------------------------------------------------------------------------- host side
MAX_HEAD_DIM = 256               # the largest D the kernels (and TILES) cover
_DROP_GROUP = 8                  # keys per Philox call of the dropout mask (one randint4x: 8 x 16 bits)
_INT64_MAX = 2 ** 63 - 1


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


INTERIOR_ENV = "VLFAST_ATTENTION_INTERIOR"


def interior_split() -> bool:
    """Whether the kernels run interior blocks apart (``$VLFAST_ATTENTION_INTERIOR``, read at each
    launch: 1 / true / on; off by default).

    Measured by the sm_90a compile gate (no GPU, so not timed): the split frees the interior
    blocks of the key-bound and causal mask math but duplicates each loop body (+30-50% SASS) and
    raises the registers enough to cost 2 -> 1 CTAs per SM in 25 of the 198 bf16 configurations of
    the CI tier (D = 40, 64, 80, 128 with dropout, bias, padding or causal).  Off until a GPU times it;
    ``make gpu-check`` can run the attention benchmarks with it on and off.
    """
    return env_flag(INTERIOR_ENV)


def _dkdv_interior(D: int, block_d: int, has_bias: bool) -> bool:
    """Whether the dK/dV kernel may split its query loop (with ``interior_split()``): where its
    registers allow.  The compile gate's spill rule decided: at BLOCK_D = 256, at D = 72 (a
    padded head dim whose strides are not multiples of 16) and at BLOCK_D = 128 with a bias the
    split spilled 4-208 bytes."""
    return block_d <= 64 or (block_d <= 128 and D % 16 == 0 and not has_bias)


# the side of each kernel's MMAs that wgmma needs >= 64 rows on (bwd_kv's tiles are [keys, queries])
_WGMMA_SIDE = {"fwd": "BLOCK_M", "bwd_kv": "BLOCK_N", "bwd_q": "BLOCK_M"}


def _tuned(kind: str, D: int, dtype: torch.dtype, key: tuple, launch, device: torch.device):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of kernel ``kind`` (fwd, bwd_kv, bwd_q): ``TILES``'s, or with
    ``VLFAST_AUTOTUNE=1`` the fastest candidate around it (``_common.autotune`` over the table's rows
    of ``kind`` and their one-step neighbours, once per ``key``; ``launch(tiles)`` is repeatable: it
    overwrites its outputs, or zeroes what it accumulates first).  Tensor-core candidates (fp16 / bf16,
    and fp32 with TF32 dots) keep >= 64 rows on the MMA's M side, wgmma's minimum (the gate's rule)."""
    base = TILES.lookup(kind, dtype, BLOCK_D=_block_d(D))
    side = _WGMMA_SIDE[kind]
    prune = (lambda t: t[side] >= 64) if dot_precision(dtype) == "tf32" and not interpret() else None
    t = autotune(TILES, kind, dtype, key, base, lambda t: launch(*_tile_args(t)), device, prune=prune)
    return _tile_args(t)


def _tile_args(t):
    return t["BLOCK_M"], t["BLOCK_N"], t["num_warps"], t["num_stages"]


BIAS_PITCH = 16                  # elements: the row pitch of the bias the kernels read (see _pitched_bias)


def _pitched_bias(bias):
    """``bias`` as the kernels read it: rows starting at multiples of ``BIAS_PITCH`` elements.

    Triton specializes integer arguments divisible by 16 (and pointers 16-byte aligned), so a
    bias whose key stride is 1 and whose other strides and offset are multiples of 16 elements
    gets vectorized loads; a 197-key row pitch gets one scalar load per element.  Such a bias is
    used as is; any other (with unit or non-unit key strides) becomes a copy of its distinct
    elements (broadcast dims stay stride 0) with the row pitch rounded up to ``BIAS_PITCH``: one
    ``(B or 1, H or 1, Nq, ceil16(Nk))`` copy per launch (for a ViT-B relative-position bias
    12 x 197 x 208 elements).  A bias broadcast over its queries or keys (stride 0) is used as is:
    its loads are broadcast.  The forward and dQ kernels read this; the dK/dV kernel, which reads
    the bias transposed, the caller's layout.
    """
    st = bias.stride()
    if st[2] == 0 or st[3] == 0:
        return bias
    if st[3] == 1 and bias.storage_offset() % BIAS_PITCH == 0 and all(s % BIAS_PITCH == 0 for s in st[:3]):
        return bias
    distinct = [1 if s == 0 else n for n, s in zip(bias.shape, st)]
    Nk = bias.shape[3]
    pitch = -(-Nk // BIAS_PITCH) * BIAS_PITCH
    buf = torch.empty(*distinct[:3], pitch, dtype=bias.dtype, device=bias.device)[..., :Nk]
    buf.copy_(bias.as_strided(distinct, st, bias.storage_offset()))
    return buf.expand(bias.shape)


def _stride_vec(*tensors) -> int:
    """``VEC`` of the kernels (``_aligned``): the largest of 8, 4, 2, 1 that divides every stride
    but the last (which is 1) of each tensor, on its dims of size > 1.  Row strides of 40 / 72
    elements give 8: with the 16-byte aligned base pointers Triton specializes on, 128-bit loads."""
    vec = 8
    for t in tensors:
        for n, st in zip(t.shape[:-1], t.stride()[:-1]):
            if n > 1:
                vec = math.gcd(vec, st)
    return vec


def _tune_key(BH: int, Nq: int, Nk: int, D: int, flags: dict) -> tuple:
    """The autotune key of a launch: D, the power-of-two buckets of B * H, Nq and Nk, and the
    variant flags (bias, padding, causal, dropout) that change the compiled kernel."""
    b = triton.next_power_of_2
    return (D, b(BH), b(Nq), b(Nk), *(bool(flags[f]) for f in ("HAS_BIAS", "HAS_KPM", "CAUSAL", "DROPOUT")))


def _common_args(q, key_padding_mask, bias, pitch: bool = True):
    if bias is not None:
        if pitch:
            bias = _pitched_bias(bias)
        bias_arg, bias_strides = bias, bias.stride()
    else:
        bias_arg, bias_strides = q, (0, 0, 0, 0)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if kpm.dtype == torch.bool:
            kpm = kpm.view(torch.uint8)
        kpm_arg, kpm_strides = kpm, kpm.stride()
    else:
        kpm_arg, kpm_strides = q, (0, 0)
    return bias_arg, bias_strides, kpm_arg, kpm_strides


# ----------------------------------------------------------------------------- argument checks
def _check_qkv(q, k, v):
    """``(B, H, Nq, Nk, D)`` of q (B, H, Nq, D) and k, v (B, H, Nk, D) (TypeError / ValueError)."""
    q = check.tensor("q", q, ndim=4, dtypes=check.HALF_AND_FLOAT, shape_doc="(B, H, Nq, D)")
    k = check.tensor("k", k, ndim=4, dtypes=check.HALF_AND_FLOAT, shape_doc="(B, H, Nk, D)")
    v = check.tensor("v", v, ndim=4, dtypes=check.HALF_AND_FLOAT, shape_doc="(B, H, Nk, D)")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if tuple(t.shape) != (B, H, Nk, D):
            raise ValueError(f"{name} must have shape (B, H, Nk, D) = {(B, H, Nk, D)} (B, H, D of q, "
                             f"Nk of k), got {tuple(t.shape)}")
        check.same_device(name, t, q.device)
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: the head dim D must be <= {MAX_HEAD_DIM}, got {D}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    return B, H, Nq, Nk, D


def _check_masks(q, Nk, key_padding_mask, bias):
    B, H, Nq, _ = q.shape
    if key_padding_mask is not None:
        check.tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool, torch.uint8),
                     shape_doc="(B, Nk)")
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(B, Nk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        check.same_device("key_padding_mask", key_padding_mask, q.device)
    if bias is not None:
        check.tensor("bias", bias, ndim=4, dtypes=check.FLOATING, shape_doc="(B, H, Nq, Nk)")
        if tuple(bias.shape) != (B, H, Nq, Nk):
            raise ValueError(f"bias must have shape (B, H, Nq, Nk) = {(B, H, Nq, Nk)} (expand a broadcast "
                             f"bias first), got {tuple(bias.shape)}")
        check.same_device("bias", bias, q.device)


def _check_rng(dropout_p, seed, offset, B: int, H: int, Nq: int, Nk: int):
    """``(dropout_p, seed, offset)``: p in [0, 1), an int64 seed, offset >= 0 with
    ``offset + B * H * Nq * ceil(Nk / 8)`` (the Philox counters of the mask) in int64."""
    dropout_p = check.unit_interval("dropout_p", dropout_p, hi_open=True)
    seed = check.integer("seed", seed, -_INT64_MAX - 1, _INT64_MAX)
    offset = check.integer("offset", offset, 0, _INT64_MAX - B * H * Nq * triton.cdiv(Nk, _DROP_GROUP))
    return dropout_p, seed, offset


def _drop_threshold(dropout_p: float) -> int:
    """``t = round(dropout_p * 65536)`` (Python's round), at most 65535: a key is kept iff its 16
    random bits are ``>= t``, so the drop probability is ``t / 65536``."""
    return min(round(dropout_p * 65536), 65535)


def _drop_args(dropout_p: float, seed: int, offset: int):
    """The kernels' dropout arguments ``(drop_thresh, drop_scale, seed, offset)``; the scale is
    ``1 / (1 - dropout_p)`` (the probability asked for, not the quantized ``t / 65536``)."""
    return _drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p), seed, offset


def _check_like(name, t, like, shape_doc):
    t = check.tensor(name, t, ndim=like.dim(), dtypes=(like.dtype,), shape_doc=shape_doc)
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(like.shape)}, got {tuple(t.shape)}")
    check.same_device(name, t, like.device)
    return t


def _check_bias_grad_shape(bias_grad_shape, full):
    if bias_grad_shape is None:
        return None
    if isinstance(bias_grad_shape, (str, bytes, torch.Tensor)) or not hasattr(bias_grad_shape, "__len__"):
        raise TypeError(f"bias_grad_shape must be a sequence of 4 ints or None, got {type(bias_grad_shape).__name__}")
    shape = tuple(check.integer(f"bias_grad_shape[{i}]", s, 1) for i, s in enumerate(bias_grad_shape))
    if len(shape) != 4 or any(g != f and g != 1 for g, f in zip(shape, full)):
        raise ValueError(f"bias_grad_shape must be 4-D and broadcast to (B, H, Nq, Nk) = {full} "
                         f"(each dim equal or 1), got {shape}")
    return shape


# ----------------------------------------------------------------------------- launchers
def attention_forward(q, k, v, *, key_padding_mask=None, bias=None, causal=False, scale: float,
                      dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """Fused attention forward: ``(out, lse)``.

    ``s_ij = scale * <q_i, k_j> + bias_ij`` over the keys that query ``i`` sees (not padding and,
    with ``causal``, ``j <= i + Nk - Nq``), ``lse_i = log sum_j exp(s_ij)`` and
    ``out_i = sum_j drop_ij * exp(s_ij - lse_i) / (1 - dropout_p) * v_j`` (``drop`` as in
    ``dropout_mask``); a row that sees no key gets ``out_i = 0`` and ``lse_i = -inf``.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); one dtype of fp32 / fp16 / bf16, unit last stride
            (other strides free), D <= 256.
        key_padding_mask: (B, Nk) bool (or uint8), True / nonzero = padding; any strides.
        bias: (B, H, Nq, Nk) floating (an expanded view of a broadcast bias is fine).
        causal: bool, bottom-right aligned.  scale: the logit scale (a float).
        dropout_p: in [0, 1) (quantized to 1/65536); seed (int64), offset (>= 0): the Philox stream
            of the dropout mask (``dropout_mask``).

    Returns:
        out (B, H, Nq, D) contiguous in q's dtype; lse (B, H, Nq) fp32 (natural log, before dropout).

    Tiles: ``TILES`` kind ``fwd`` (one program per (b, h, BLOCK_M queries), BLOCK_N keys per step).
    """
    B, H, Nq, Nk, D = _check_qkv(q, k, v)
    _check_masks(q, Nk, key_padding_mask, bias)
    causal = check.flag("causal", causal)
    scale = check.real("scale", scale, finite=False)
    dropout_p, seed, offset = _check_rng(dropout_p, seed, offset, B, H, Nq, Nk)
    out = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    if B * H * Nq == 0 or D == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    bias_arg, bs, kpm_arg, ps = _common_args(q, key_padding_mask, bias)
    flags = dict(HAS_BIAS=bias is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=causal,
                 DROPOUT=dropout_p > 0)
    vec = _stride_vec(q, k, v)

    def launch(bm, bn, warps, stages):
        num_m = triton.cdiv(Nq, bm)
        _attn_fwd_kernel[(num_m * B * H,)](
            q, k, v, bias_arg, kpm_arg, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *bs, *ps,
            H, Nq, Nk, num_m,
            scale * LOG2E,
            *_drop_args(dropout_p, seed, offset),
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn, **flags,
            OUT_BF16=q.dtype == torch.bfloat16, DOT_PREC=dot_precision(q.dtype),
            UPCAST_DOT=upcast_dot(q.dtype), INTERIOR=interior_split(), VEC=vec,
            num_warps=warps, num_stages=stages,
        )

    launch(*_tuned("fwd", D, q.dtype, _tune_key(B * H, Nq, Nk, D, flags), launch, q.device))
    return out, lse


def attention_backward(do, q, k, v, out, lse, *, key_padding_mask=None, bias=None, causal=False,
                       scale: float, dropout_p: float = 0.0, seed: int = 0, offset: int = 0,
                       bias_grad_shape=None, deterministic: bool = False):
    """Fused attention backward: ``(dq, dk, dv, dbias)``.

    With ``p_ij = exp(s_ij - lse_i)`` recomputed from the forward's ``lse``,
    ``delta_i = <do_i, out_i>``, ``dp_ij = drop_ij <do_i, v_j> / (1 - dropout_p)`` and
    ``dS_ij = p_ij (dp_ij - delta_i)``: ``dq_i = scale sum_j dS_ij k_j``,
    ``dk_j = scale sum_i dS_ij q_i``, ``dv_j = sum_i drop_ij p_ij / (1 - dropout_p) do_i`` and
    ``dbias = dS`` summed over the dims where ``bias_grad_shape`` is 1.

    Args:
        do, out: (B, H, Nq, D) in q's dtype (any strides); lse: (B, H, Nq) fp32 from
            ``attention_forward``; q, k, v, key_padding_mask, bias, causal, scale, dropout_p, seed,
            offset: as given to ``attention_forward``.
        bias_grad_shape: None (no dbias) or 4 ints, each the (B, H, Nq, Nk) dim or 1.
        deterministic: reduce a broadcast dbias from a full fp32 (B, H, Nq, Nk) buffer with
            ``torch.sum`` instead of ``tl.atomic_add`` (bitwise reproducible, that much memory).

    Returns:
        dq, dk, dv in the inputs' shapes and dtype (contiguous); dbias fp32 of ``bias_grad_shape``
        (None when that is None).

    Tiles: ``TILES`` kinds ``bwd_preprocess`` (delta), ``bwd_kv`` (one program per (b, h, BLOCK_N
    keys), looping over BLOCK_M queries) and ``bwd_q`` (one per (b, h, BLOCK_M queries)).
    """
    B, H, Nq, Nk, D = _check_qkv(q, k, v)
    _check_masks(q, Nk, key_padding_mask, bias)
    do = _check_like("do", do, q, "(B, H, Nq, D)")
    out = _check_like("out", out, q, "(B, H, Nq, D)")
    lse = check.tensor("lse", lse, ndim=3, dtypes=(torch.float32,), shape_doc="(B, H, Nq)")
    if tuple(lse.shape) != (B, H, Nq):
        raise ValueError(f"lse must have shape (B, H, Nq) = {(B, H, Nq)}, got {tuple(lse.shape)}")
    check.same_device("lse", lse, q.device)
    causal = check.flag("causal", causal)
    deterministic = check.flag("deterministic", deterministic)
    scale = check.real("scale", scale, finite=False)
    dropout_p, seed, offset = _check_rng(dropout_p, seed, offset, B, H, Nq, Nk)
    full = (B, H, Nq, Nk)
    bias_grad_shape = _check_bias_grad_shape(bias_grad_shape, full)
    if do.stride(-1) != 1:
        do = do.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    lse = lse.contiguous()
    dq = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, Nk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, Nk, D, dtype=v.dtype, device=q.device)
    dbias = None
    if B * H * D == 0 or Nq == 0 or Nk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if bias_grad_shape is not None:
            dbias = torch.zeros(bias_grad_shape, dtype=torch.float32, device=q.device)
        return dq, dk, dv, dbias

    bias_arg, bs, kpm_arg, ps = _common_args(q, key_padding_mask, bias)
    block_d = _block_d(D)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, HAS_BIAS=bias is not None,
                  HAS_KPM=key_padding_mask is not None, CAUSAL=causal, DROPOUT=dropout_p > 0,
                  OUT_BF16=q.dtype == torch.bfloat16, DOT_PREC=dot_precision(q.dtype),
                  UPCAST_DOT=upcast_dot(q.dtype), VEC=_stride_vec(q, k, v, do))
    rng = _drop_args(dropout_p, seed, offset)
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2))

    # delta_i = <do_i, out_i>
    delta = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    pm = TILES.lookup("bwd_preprocess", q.dtype)["BLOCK_M"]
    pm = max(16, min(pm, 4096 // block_d))
    num_pm = triton.cdiv(Nq, pm)
    _attn_bwd_preprocess_kernel[(num_pm * B * H,)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), H, Nq, num_pm,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pm, VEC=_stride_vec(out, do))

    # dk, dv
    # the caller's bias layout: this kernel reads the bias tile transposed (keys down its rows), where an
    # aligned row pitch vectorizes nothing and, under triton 3.6, cost 20 B of spill at D = 72
    kv_bias, kv_bs, _, _ = _common_args(q, None, bias, pitch=False)

    def launch_kv(bm, bn, warps, stages):
        num_n = triton.cdiv(Nk, bn)
        _attn_bwd_dkdv_kernel[(num_n * B * H,)](
            q, k, v, kv_bias, kpm_arg, do, lse, delta, dk, dv,
            *qkv_strides, *kv_bs, *ps, do.stride(0), do.stride(1), do.stride(2),
            H, Nq, Nk, num_n, scale * LOG2E, scale, *rng,
            BLOCK_M=bm, BLOCK_N=bn, INTERIOR=interior_split() and _dkdv_interior(D, block_d, bias is not None),
            num_warps=warps, num_stages=stages, **common)

    tune_key = _tune_key(B * H, Nq, Nk, D, common)
    launch_kv(*_tuned("bwd_kv", D, q.dtype, tune_key, launch_kv, q.device))

    # dq (+ dbias)
    mode, reduce_m, reduce_n = 0, False, False
    gbuf, gstrides = q, (0, 0, 0, 0)
    if bias_grad_shape is not None:
        if bias_grad_shape == full or deterministic:
            mode = 1
            gbuf = torch.zeros(full, dtype=torch.float32, device=q.device)
            gstrides = gbuf.stride()
        else:
            mode = 2
            gbuf = torch.zeros(bias_grad_shape, dtype=torch.float32, device=q.device)
            gstrides = tuple(0 if g == 1 and f != 1 else s
                             for g, f, s in zip(bias_grad_shape, full, gbuf.stride()))
            reduce_m = bias_grad_shape[2] == 1 and Nq != 1
            reduce_n = bias_grad_shape[3] == 1 and Nk != 1

    def launch_q(bm, bn, warps, stages):
        if mode == 2:
            gbuf.zero_()                                # atomics accumulate: a tuning run starts from 0
        num_m = triton.cdiv(Nq, bm)
        _attn_bwd_dq_kernel[(num_m * B * H,)](
            q, k, v, bias_arg, kpm_arg, do, lse, delta, dq, gbuf,
            *qkv_strides, *bs, *ps, do.stride(0), do.stride(1), do.stride(2), *gstrides,
            H, Nq, Nk, num_m, scale * LOG2E, scale, *rng,
            BLOCK_M=bm, BLOCK_N=bn, DBIAS=mode, REDUCE_M=reduce_m, REDUCE_N=reduce_n, INTERIOR=interior_split(),
            num_warps=warps, num_stages=stages, **common)

    launch_q(*_tuned("bwd_q", D, q.dtype, tune_key + (mode, reduce_m, reduce_n), launch_q, q.device))
    if mode == 1:
        dims = [i for i in range(4) if bias_grad_shape[i] == 1 and full[i] != 1]
        dbias = gbuf.sum(dim=dims, keepdim=True) if dims else gbuf
    elif mode == 2:
        dbias = gbuf
    return dq, dk, dv, dbias


def dropout_mask(B, H, Nq, Nk, *, dropout_p, seed, offset, device):
    """The dropout keep-mask of the attention kernels, materialized (for tests and references).

    With the flattened row ``r = (b * H + h) * Nq + i``, key group ``g = j // 8`` and lane
    ``l = j % 8``: ``w0, w1, w2, w3 = tl.randint4x(seed, offset + r * ceil(Nk / 8) + g)`` (one
    Philox4x32-10 call per 8 keys, int64 counters) and ``keep[b, h, i, j] = u >= t`` where ``u`` is
    the 16-bit half ``l % 2`` (low half first) of word ``w_{l // 2}`` and
    ``t = min(round(dropout_p * 65536), 65535)`` (the drop probability ``t / 65536``, within 2^-17
    of ``dropout_p``; see the module docstring): exactly the mask ``attention_forward`` /
    ``attention_backward`` apply with the same ``(B, H, Nq, Nk, dropout_p, seed, offset)``, where
    kept values are scaled by ``1 / (1 - dropout_p)``.

    Args:
        B, H, Nq, Nk: ints >= 0 (batch, heads, queries, keys).
        dropout_p: float in [0, 1), the probability of dropping (quantized to 1/65536).
        seed: int64 Philox seed (its low / high 32-bit words are Philox's two keys).
        offset: int >= 0, the first Philox counter (``offset + B * H * Nq * ceil(Nk / 8)`` must
            fit in int64).
        device: ``torch.device`` or device string (a CPU device needs ``TRITON_INTERPRET=1``).

    Returns:
        (B, H, Nq, Nk) torch.bool on ``device``, True = kept.

    Tiles: ``TILES`` kind ``dropout_mask`` (BLOCK_M rows of the flattened (B * H * Nq, Nk) mask by
    BLOCK_N keys per program, BLOCK_N a multiple of 8).
    """
    B, H, Nq, Nk = (check.integer(n, x, 0) for n, x in (("B", B), ("H", H), ("Nq", Nq), ("Nk", Nk)))
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a device string, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from exc
    dropout_p, seed, offset = _check_rng(dropout_p, seed, offset, B, H, Nq, Nk)
    out = torch.empty(B, H, Nq, Nk, dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    R = B * H * Nq
    t = TILES.lookup("dropout_mask")
    bm = t["BLOCK_M"]
    bn = min(t["BLOCK_N"], max(16, triton.next_power_of_2(Nk)))
    grid = (triton.cdiv(R, bm), triton.cdiv(Nk, bn))
    _dropout_mask_kernel[grid](out, R, Nk, seed, offset, _drop_threshold(dropout_p), BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()
