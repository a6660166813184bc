"""Tiled contrastive-loss kernels (InfoNCE log-sum-exp with soft targets, SigLIP) in Triton.

The ``Nq x Nk`` logits are never materialized: every kernel recomputes score tiles
``x_ij = <q_i, k_j>`` (fp32 accumulation, ``tl.dot``; fp16/bf16 inputs use tensor cores,
fp32 inputs IEEE fp32 dots, no TF32) from the features, looping over the feature dim in
``BLOCK_D`` chunks, so any ``D`` (1..1024 and beyond) works and only ``O((Nq + Nk) D)``
memory is touched.

InfoNCE (``s_ij = scale * x_ij``, soft scores ``ŝ_ij = soft_scale * <sq_i, sk_j>``):

* ``_lse_fwd_kernel``: one program per query block, loops over key blocks with an online
  max / sum (base-2 exponentials, ``scale * log2(e)`` folded in, never a raw ``exp(s)``,
  so ``scale = 100`` cannot overflow): ``lse``; with soft targets a second dot per tile,
  its own online max / sum (``soft_lse``) and an accumulator ``sum_j exp(ŝ_ij - m̂_i) x_ij``
  rescaled whenever ``m̂`` grows (``soft_dot = scale * acc / l̂``).
* ``_bwd_kernel`` (shared by InfoNCE and SigLIP): rows of "A" against columns of "B".
  With A = queries it writes ``dq = scale * G @ k``, with A = keys ``dk = scale * G^T @ q``
  (tiles laid out ``[A, B]``, so no transposed accumulators).  Each program owns one
  A block and one ``BLOCK_DO``-wide chunk of the output features (the grid is
  ``num_blocks * cdiv(D, BLOCK_DO)``, 1-D); it recomputes every score tile, so feature
  dims above ``BLOCK_DO`` (128 / 64 on GPUs) redo the score dots ``cdiv(D, BLOCK_DO)`` times.
  No atomics: dq / dk are deterministic.  The A = queries launch also writes one partial
  ``sum G * x`` (dscale) and ``sum G`` (SigLIP dbias) per block (chunk 0 only) into a small
  fp32 buffer that torch sums (deterministic).

SigLIP (``u_ij = scale * x_ij + bias``, ``z_ij = +1`` iff ``j == i + pos_offset`` else -1):

* ``_siglip_fwd_kernel``: ``r_i = sum_j softplus(-z_ij u_ij)``, softplus computed as
  ``max(v, 0) + log1p(exp(-|v|))`` with an accurate log1p (Goldberg's
  ``log(w) * e / (w - 1)``, ``w = 1 + e``), so the tiny negative-pair terms of a
  ``bias = -10`` model keep their relative precision.
* backward: ``_bwd_kernel`` with ``G_ij = -g_i z_ij sigmoid(-z_ij u_ij)``.

``EXCLUDE_DIAG`` (constexpr, SimCLR's NT-Xent): key i leaves query i's softmax.  The forward
sets ``s_ii = -inf`` (and ``ŝ_ii``) in the tiles that cross the diagonal, so ``lse_i = log
sum_{j != i} exp(s_ij)``; the backward gives those elements zero probability (``G_ii = 0``,
in both launches: the diagonal is ``offs_a == offs_b`` either way).  With the flag off the
kernels compile exactly as before.

Rows / columns beyond ``Nq`` / ``Nk`` are masked (zero features, ``-inf`` in the max / sum,
zero in the gradients).  All row offsets are int64; every grid is 1-D.
Outputs in bf16 are rounded with ``round_to`` (round-to-nearest-even also in the interpreter).
Tiles: the table ``TILES`` below (``vlfast info`` prints it; the interpreter's tiles are in
``_common.INTERPRETER_TILES``; tests force tiles with ``_common.override_tiles``).
"""

import torch
import triton
import triton.language as tl

from vlfast import _validation as check

from ._common import LN2_C, LOG2E, LOG2E_C, TileTable, dot_precision, mma, round_to, upcast_dot

# ----------------------------------------------------------------------------- tiles
TILES = TileTable(
    "contrastive",
    doc="InfoNCE / SigLIP tiles, UNTUNED (never timed on a GPU), only checked by compiling for sm_90 "
        "without a GPU (cuobjdump resource usage): fp16/bf16 use wgmma with no register spills for D in "
        "{64, 257, 512, 768}, with and without soft targets; fp32 (IEEE FMA dots, no tensor cores) spills "
        "<= 32 bytes of stack (D = 64 with soft targets, D = 768).  fwd BLOCK_M x BLOCK_N score tiles "
        "(bwd: BLOCK_M rows of the output side A x BLOCK_N rows of B), BLOCK_D-wide feature chunks "
        "(capped at next_pow2(D), and next_pow2(DS) for the soft features), BLOCK_DO output features per "
        "bwd program (capped at next_pow2(D)).  soft: with soft targets.",
    kernels={"fwd": ("_lse_fwd_kernel", "_siglip_fwd_kernel"), "bwd": ("_bwd_kernel",)},
    keys=("kind", "dtype", "soft"),
    values=("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO", "num_warps", "num_stages"),
    rows=(
        # kind  dtype        soft   BLOCK_M  BLOCK_N  BLOCK_D  BLOCK_DO  num_warps  num_stages
        ("fwd", "fp16/bf16", None,  128,     64,      32,      None,     8,         3),
        ("fwd", "fp32",      None,  64,      32,      32,      None,     4,         2),
        ("bwd", "fp16/bf16", True,  64,      32,      64,      128,      8,         2),
        ("bwd", "fp16/bf16", False, 64,      64,      64,      128,      8,         2),
        ("bwd", "fp32",      None,  64,      32,      32,      64,       8,         2),
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
    q_ptr, k_ptr, sq_ptr, sk_ptr, lse_ptr, sdot_ptr, slse_ptr,
    s_q, s_k, s_sq, s_sk,
    Nq, Nk,
    c_main, c_soft, scale,          # scale * log2(e), soft_scale * log2(e), scale
    D: tl.constexpr, DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
    SOFT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, EXCLUDE_DIAG: tl.constexpr = False,
):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nq
    offs_n0 = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mh_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lh_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = tl.cast(start_n, tl.int64) + offs_n0
        n_ok = offs_n < Nk
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

    lse = (m_i + tl.log2(l_i)) * LN2_C
    tl.store(lse_ptr + offs_m, lse, mask=m_ok)
    if SOFT:
        tl.store(slse_ptr + offs_m, (mh_i + tl.log2(lh_i)) * LN2_C, mask=m_ok)
        tl.store(sdot_ptr + offs_m, acc * (scale / lh_i), mask=m_ok)


@triton.jit
def _siglip_fwd_kernel(
    x_ptr, y_ptr, r_ptr, s_x, s_y, Nx, Ny, scale, bias, pos_offset,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nx
    offs_n0 = tl.arange(0, BLOCK_N)
    target = offs_m + pos_offset
    r = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, Ny, BLOCK_N):
        offs_n = tl.cast(start_n, tl.int64) + offs_n0
        n_ok = offs_n < Ny
        x = _sdot(x_ptr, offs_m, m_ok, s_x, y_ptr, offs_n, n_ok, s_y,
                  D, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST)
        u = x * scale + bias
        v = tl.where(offs_n[None, :] == target[:, None], -u, u)      # -z * u
        sp = tl.maximum(v, 0.0) + _log1p(tl.exp(-tl.abs(v)))
        r += tl.sum(tl.where(n_ok[None, :], sp, 0.0), 1)
    tl.store(r_ptr + offs_m, r, mask=m_ok)


@triton.jit
def _bwd_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr,                   # A rows (output side), B rows; soft features
    lse_ptr, g_ptr, slse_ptr, gs_ptr,               # per-query stats (indexed by query)
    out_ptr, part_ptr,
    s_a, s_b, s_sa, s_sb,
    Na, Nb, n_dout,
    c_main, c_soft, scale, bias, pos_offset,
    D: tl.constexpr, DS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    SIGLIP: tl.constexpr, SOFT: tl.constexpr, A_IS_Q: tl.constexpr, PARTIALS: tl.constexpr,
    OUT_BF16: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, EXCLUDE_DIAG: tl.constexpr = False,
):
    pid = tl.program_id(0)
    blk = pid // n_dout
    dc = pid % n_dout
    offs_a = blk.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = offs_a < Na
    offs_o = dc * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    offs_b0 = tl.arange(0, BLOCK_B)
    dtype = b_ptr.dtype.element_ty

    if A_IS_Q:
        g_a = tl.load(g_ptr + offs_a, mask=a_ok, other=0.0)
        if not SIGLIP:
            lse_a = tl.load(lse_ptr + offs_a, mask=a_ok, other=0.0) * LOG2E_C
            if SOFT:
                slse_a = tl.load(slse_ptr + offs_a, mask=a_ok, other=0.0) * LOG2E_C
                gs_a = tl.load(gs_ptr + offs_a, mask=a_ok, other=0.0)

    acc = tl.zeros([BLOCK_A, BLOCK_DO], tl.float32)
    ds_acc = tl.zeros([BLOCK_A], tl.float32)
    db_acc = tl.zeros([BLOCK_A], tl.float32)
    for start_b in range(0, Nb, BLOCK_B):
        offs_b = tl.cast(start_b, tl.int64) + offs_b0
        b_ok = offs_b < Nb
        valid = a_ok[:, None] & b_ok[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (offs_a[:, None] != offs_b[None, :])
        x = _sdot(a_ptr, offs_a, a_ok, s_a, b_ptr, offs_b, b_ok, s_b,
                  D, BLOCK_D, BLOCK_A, BLOCK_B, DOT_PREC, UPCAST)
        if A_IS_Q:
            g = g_a[:, None]
        else:
            g = tl.load(g_ptr + offs_b, mask=b_ok, other=0.0)[None, :]
        if SIGLIP:
            u = x * scale + bias
            if A_IS_Q:
                pos = offs_b[None, :] == offs_a[:, None] + pos_offset
            else:
                pos = offs_a[:, None] == offs_b[None, :] + pos_offset
            v = tl.where(pos, -u, u)                      # -z * u
            e = tl.exp(-tl.abs(v))
            sig = tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            G = tl.where(pos, -g * sig, g * sig)
        else:
            if A_IS_Q:
                lse = lse_a[:, None]
            else:
                lse = (tl.load(lse_ptr + offs_b, mask=b_ok, other=0.0) * LOG2E_C)[None, :]
            G = g * tl.exp2(x * c_main - lse)
            if SOFT:
                xh = _sdot(sa_ptr, offs_a, a_ok, s_sa, sb_ptr, offs_b, b_ok, s_sb,
                           DS, BLOCK_DS, BLOCK_A, BLOCK_B, DOT_PREC, UPCAST)
                if A_IS_Q:
                    slse = slse_a[:, None]
                    gs = gs_a[:, None]
                else:
                    slse = (tl.load(slse_ptr + offs_b, mask=b_ok, other=0.0) * LOG2E_C)[None, :]
                    gs = tl.load(gs_ptr + offs_b, mask=b_ok, other=0.0)[None, :]
                G += gs * tl.exp2(xh * c_soft - slse)
        G = tl.where(valid, G, 0.0)
        bo = tl.load(b_ptr + offs_b[:, None] * s_b + offs_o[None, :],
                     mask=b_ok[:, None] & o_ok[None, :], other=0.0)
        acc = mma(G.to(dtype), bo, acc, DOT_PREC, UPCAST)
        if PARTIALS:
            ds_acc += tl.sum(G * x, 1)
            if SIGLIP:
                db_acc += tl.sum(G, 1)

    acc = acc * scale
    tl.store(out_ptr + offs_a[:, None] * D + offs_o[None, :],
             round_to(acc, OUT_BF16, out_ptr.dtype.element_ty), mask=a_ok[:, None] & o_ok[None, :])
    if PARTIALS:
        first = dc == 0
        tl.store(part_ptr + pid, tl.where(first, tl.sum(ds_acc, 0), 0.0))
        tl.store(part_ptr + tl.num_programs(0) + pid, tl.where(first, tl.sum(db_acc, 0), 0.0))


# ----------------------------------------------------------------------------- host side
_INT64_MAX = 2 ** 63 - 1


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _config(kind: str, dtype: torch.dtype, D: int, DS: int = 0):
    """Tiles of ``kind`` (fwd, bwd) from ``TILES``; feature chunks capped at the feature dims."""
    t = TILES.lookup(kind, dtype, soft=DS > 0)
    bdo = None if kind == "fwd" else min(t["BLOCK_DO"], _pow2(D))
    return dict(bm=t["BLOCK_M"], bn=t["BLOCK_N"], bd=min(t["BLOCK_D"], _pow2(D)),
                bds=min(t["BLOCK_D"], _pow2(DS)), bdo=bdo,
                num_warps=t["num_warps"], num_stages=t["num_stages"])


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
                                 exclude_diagonal: bool = False):
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

    Returns: ``(lse, soft_dot, soft_lse)``; the soft ones are None without ``sq`` / ``sk``.
    Tiles: ``TILES`` kind ``fwd`` (one program per BLOCK_M queries, BLOCK_N keys per step).
    """
    q, k = _check_pair("q", q, "k", k)
    sq, sk = _check_soft(q, k, sq, sk)
    scale = check.real("scale", scale, finite=False)
    soft_scale = check.real("soft_scale", soft_scale, finite=False)
    exclude_diagonal = check.flag("exclude_diagonal", exclude_diagonal)
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
    cfg = _config("fwd", q.dtype, D, DS)
    grid = (triton.cdiv(Nq, cfg["bm"]),)
    extra = dict(EXCLUDE_DIAG=True) if exclude_diagonal else {}  # flag off: the launch of before, unchanged
    _lse_fwd_kernel[grid](
        q, k, sq if soft else q, sk if soft else k, lse, sdot if soft else lse, slse if soft else lse,
        q.stride(0), k.stride(0), sq.stride(0) if soft else 0, sk.stride(0) if soft else 0,
        Nq, Nk, scale * LOG2E, soft_scale * LOG2E, scale,
        D=D, DS=DS, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_D=cfg["bd"], BLOCK_DS=cfg["bds"],
        SOFT=soft, DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    return lse, sdot, slse


def _launch_bwd(a, b, sa, sb, lse, g, slse, gs, *, scale, soft_scale=1.0, bias=0.0, pos_offset=0,
                siglip, a_is_q, partials, exclude_diagonal=False):
    """``scale * G @ b`` (A = queries) or ``scale * G^T @ b`` (A = keys), G over A x B, and
    (partials) the fp32 partial sums of ``G * x`` and ``G``, shape (2, n_programs).
    Arguments are checked by the callers."""
    Na, D = a.shape
    Nb = b.shape[0]
    soft = sa is not None
    DS = sa.shape[1] if soft else 0
    out = torch.empty(Na, D, dtype=a.dtype, device=a.device)
    cfg = _config("bwd", a.dtype, D, DS)
    n_dout = max(1, triton.cdiv(D, cfg["bdo"]))
    n_prog = triton.cdiv(Na, cfg["bm"]) * n_dout
    part = torch.empty(2, n_prog, dtype=torch.float32, device=a.device) if partials else g
    dummy = lse if lse is not None else g
    extra = dict(EXCLUDE_DIAG=True) if exclude_diagonal else {}  # flag off: the launch of before, unchanged
    _bwd_kernel[(n_prog,)](
        a, b, sa if soft else a, sb if soft else b,
        dummy, g, slse if soft else dummy, gs if soft else dummy,
        out, part,
        a.stride(0), b.stride(0), sa.stride(0) if soft else 0, sb.stride(0) if soft else 0,
        Na, Nb, n_dout,
        scale * LOG2E, soft_scale * LOG2E, scale, bias, pos_offset,
        D=D, DS=DS, BLOCK_A=cfg["bm"], BLOCK_B=cfg["bn"], BLOCK_D=cfg["bd"], BLOCK_DS=cfg["bds"],
        BLOCK_DO=cfg["bdo"], SIGLIP=siglip, SOFT=soft, A_IS_Q=a_is_q, PARTIALS=partials,
        OUT_BF16=a.dtype == torch.bfloat16, DOT_PREC=dot_precision(a.dtype), UPCAST=upcast_dot(a.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    return out, (part if partials else None)


def contrastive_loss_lse_backward(q, k, scale: float, lse, g_lse, sq=None, sk=None, soft_scale: float = 1.0,
                                  soft_lse=None, g_soft=None, exclude_diagonal: bool = False):
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

    Tiles: ``TILES`` kind ``bwd``, launched twice (A = queries for dq and the dscale partials,
    A = keys for dk): one program per BLOCK_M rows of A and BLOCK_DO output features.
    """
    q, k = _check_pair("q", q, "k", k)
    scale = check.real("scale", scale, finite=False)
    soft_scale = check.real("soft_scale", soft_scale, finite=False)
    exclude_diagonal = check.flag("exclude_diagonal", exclude_diagonal)
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
    kw = dict(scale=scale, soft_scale=soft_scale, siglip=False, exclude_diagonal=exclude_diagonal)
    dq, part = _launch_bwd(q, k, sq, sk, lse, g_lse, soft_lse, g_soft, a_is_q=True, partials=True, **kw)
    dk, _ = _launch_bwd(k, q, sk, sq, lse, g_lse, soft_lse, g_soft, a_is_q=False, partials=False, **kw)
    return dq, dk, part[0].sum()


def siglip_rows_forward(x, y, scale: float, bias: float, pos_offset: int = 0):
    """Per-row SigLIP loss, fp32 (Nx,): ``r_i = sum_j softplus(-z_ij (scale <x_i, y_j> + bias))``.

    ``z_ij = +1`` iff ``j == i + pos_offset`` else -1.  x: (Nx, D), y: (Ny, D), one dtype of
    fp32 / fp16 / bf16 and one device; scale, bias: floats; pos_offset: int (the global index
    of x's first row among y's rows).
    Tiles: ``TILES`` kind ``fwd`` (one program per BLOCK_M rows of x, BLOCK_N rows of y per step).
    """
    x, y = _check_pair("x", x, "y", y)
    scale = check.real("scale", scale, finite=False)
    bias = check.real("bias", bias, finite=False)
    pos_offset = check.integer("pos_offset", pos_offset, -_INT64_MAX - 1, _INT64_MAX)
    Nx, D = x.shape
    Ny = y.shape[0]
    r = torch.zeros(Nx, dtype=torch.float32, device=x.device)
    if Nx == 0 or Ny == 0:
        return r
    cfg = _config("fwd", x.dtype, D)
    grid = (triton.cdiv(Nx, cfg["bm"]),)
    _siglip_fwd_kernel[grid](
        x, y, r, x.stride(0), y.stride(0), Nx, Ny, scale, bias, pos_offset,
        D=D, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_D=cfg["bd"],
        DOT_PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return r


def siglip_rows_backward(x, y, scale: float, bias: float, g_row, pos_offset: int = 0):
    """Gradients of ``sum_i g_row_i r_i``: ``G_ij = -g_row_i z_ij sigmoid(-z_ij u_ij)``,
    ``u_ij = scale <x_i, y_j> + bias``.

    Returns ``(dx, dy, dscale, dbias)``: ``dx = scale G @ y``, ``dy = scale G^T @ x`` (input
    dtypes), ``dscale = sum G_ij <x_i, y_j>``, ``dbias = sum G_ij`` (0-dim fp32).  x, y, scale,
    bias, pos_offset as for ``siglip_rows_forward``; g_row: (Nx,) floating.
    Tiles: ``TILES`` kind ``bwd`` (A = x for dx and the partial sums, then A = y for dy).
    """
    x, y = _check_pair("x", x, "y", y)
    scale = check.real("scale", scale, finite=False)
    bias = check.real("bias", bias, finite=False)
    pos_offset = check.integer("pos_offset", pos_offset, -_INT64_MAX - 1, _INT64_MAX)
    Nx = x.shape[0]
    Ny = y.shape[0]
    dev = x.device
    if Nx == 0 or Ny == 0:
        z = torch.zeros((), dtype=torch.float32, device=dev)
        return torch.zeros_like(x), torch.zeros_like(y), z, z.clone()
    g_row = _vec("g_row", g_row, Nx, dev)
    kw = dict(scale=scale, bias=bias, pos_offset=pos_offset, siglip=True)
    dx, part = _launch_bwd(x, y, None, None, None, g_row, None, None, a_is_q=True, partials=True, **kw)
    dy, _ = _launch_bwd(y, x, None, None, None, g_row, None, None, a_is_q=False, partials=False, **kw)
    sums = part.sum(1)
    return dx, dy, sums[0], sums[1]
