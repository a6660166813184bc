"""The launch-plan account: MMA FLOPs issued vs useful and bytes moved vs the minimum, per launch plan.

For a shape, this module walks the launches the host code makes on a GPU, with the GPU rows of the
tile tables (``TileTable.lookup(..., gpu=True)``) and the launchers' own planning functions
(``contrastive.plan_key_splits``, ``contrastive.grad_plan``), and counts, without running anything:

* ``issued``: the MMA FLOPs the programs issue (2 per multiply-add of every ``tl.dot`` at its
  padded tile shape: partial edge tiles, head dims padded to ``BLOCK_D``, recomputed score tiles)
  plus, for the contrastive backward, the GEMMs torch runs on G (counted at their exact shape);
* ``useful``: the minimum for the math: attention forward ``2 * 2 * D`` per visible (query, key)
  pair (scores, P @ V), backward ``5 * 2 * D`` (scores once, dP, dV, dK, dQ: FlashAttention-2's
  five products); contrastive forward ``2 * Nq * Nk * (D + DS)``, backward the score tile once
  plus the two gradient GEMMs, ``2 * Nq * Nk * (3 D + DS)``;
* ``bytes``: the global-memory traffic the programs ask for (each tile load and store at the rows
  in range and the real feature width; L2 hits are counted as traffic, so this is an upper bound
  on HBM traffic), ``min_bytes`` every input read once and every output written once.

``ratio`` columns are issued / useful and bytes / min_bytes.  ``vlfast bench`` prints
``account_table()`` on any device (the plan is the H200's, whatever runs the benchmark).
A model of the host code: ``tests/kernels/test_plan.py`` checks it against hand counts.
"""

import dataclasses
from typing import List, Optional, Sequence

import torch
import triton

__all__ = ["Account", "attention_account", "contrastive_account", "account_table", "format_accounts",
           "DEFAULT_ATTENTION", "DEFAULT_CONTRASTIVE"]


@dataclasses.dataclass
class Account:
    """One launch plan's account (see the module docstring); FLOPs and bytes as floats."""
    op: str
    phase: str           # "fwd" or "bwd"
    shape: str
    dtype: str
    issued: float
    useful: float
    bytes: float
    min_bytes: float
    launches: int

    @property
    def flop_ratio(self) -> float:
        return self.issued / self.useful if self.useful else float("nan")

    @property
    def byte_ratio(self) -> float:
        return self.bytes / self.min_bytes if self.min_bytes else float("nan")

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), flop_ratio=self.flop_ratio, byte_ratio=self.byte_ratio)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rows(lo: int, hi: int, block: int):
    """``(start, rows in range)`` of the blocks covering [lo, hi)."""
    return [(s, min(block, hi - s)) for s in range(lo, hi, block)]


# ----------------------------------------------------------------------------- attention
def _attn_hi(start_m: int, bm: int, Nq: int, Nk: int, causal: bool) -> int:
    return min(Nk, max(start_m + bm + Nk - Nq, 0)) if causal else Nk


def _visible_pairs(Nq: int, Nk: int, causal: bool) -> int:
    if not causal:
        return Nq * Nk
    return sum(min(Nk, max(0, i + Nk - Nq + 1)) for i in range(Nq))


def attention_account(B: int, H: int, Nq: int, Nk: int, D: int, dtype: torch.dtype = torch.bfloat16, *,
                      causal: bool = False, bias: bool = False, padding: bool = False) -> List[Account]:
    """``[forward, backward]`` accounts of ``attention_forward`` / ``attention_backward`` (no dbias).

    Mirrors the launchers: ``_attn_fwd_kernel`` (one program per query block, key blocks up to the
    causal bound, 2 dots per key block), ``_attn_bwd_preprocess_kernel``, ``_attn_bwd_dkdv_kernel``
    (per key block, query blocks from the causal start, 4 dots) and ``_attn_bwd_dq_kernel`` (per
    query block, 3 dots).  ``bias`` adds the bias tile loads, ``padding`` the key-padding mask.
    """
    from . import attention as A

    es = torch.empty((), dtype=dtype).element_size()
    bd = A._block_d(D)
    bh = B * H
    dot = 2 * bd                                       # FLOPs per (row, col) of one dot at BLOCK_D
    shape = f"B={B} H={H} Nq={Nq} Nk={Nk} D={D}" + (" causal" if causal else "") + (" bias" if bias else "") \
        + (" padding" if padding else "")
    pairs = _visible_pairs(Nq, Nk, causal)
    extra_in = (Nq * Nk * es if bias else 0) + (Nk if padding else 0)   # per (b, h): bias tile, mask row

    def tile_extra(rows_m: int, rows_n: int) -> int:
        return (rows_m * rows_n * es if bias else 0) + (rows_n if padding else 0)

    # forward
    t = A.TILES.lookup("fwd", dtype, gpu=True, BLOCK_D=bd)
    bm, bn = t["BLOCK_M"], t["BLOCK_N"]
    flops = moved = 0
    for start_m, rows_m in _rows(0, Nq, bm):
        moved += rows_m * D * es * 2 + rows_m * 4      # q in, out and lse out
        for _, rows_n in _rows(0, _attn_hi(start_m, bm, Nq, Nk, causal), bn):
            flops += 2 * bm * bn * dot
            moved += 2 * rows_n * D * es + tile_extra(rows_m, rows_n)
    fwd = Account("attention", "fwd", shape, _dtype_name(dtype), bh * flops, bh * 2 * 2 * D * pairs,
                  bh * moved, bh * ((2 * Nq + 2 * Nk) * D * es + Nq * 4 + extra_in), 1)

    # backward: preprocess, dk/dv, dq
    moved = 2 * Nq * D * es + Nq * 4                   # delta = rowsum(do * out)
    flops = 0
    t = A.TILES.lookup("bwd_kv", dtype, gpu=True, BLOCK_D=bd)
    bm, bn = t["BLOCK_M"], t["BLOCK_N"]
    for start_n, rows_n in _rows(0, Nk, bn):
        moved += 2 * rows_n * D * es * 2                # k, v in; dk, dv out
        lo = (max(start_n + Nq - Nk, 0) // bm) * bm if causal else 0
        for _, rows_m in _rows(lo, Nq, bm):
            flops += 4 * bm * bn * dot
            moved += 2 * rows_m * D * es + 2 * rows_m * 4 + tile_extra(rows_m, rows_n)   # q, do, lse, delta
    t = A.TILES.lookup("bwd_q", dtype, gpu=True, BLOCK_D=bd)
    bm, bn = t["BLOCK_M"], t["BLOCK_N"]
    for start_m, rows_m in _rows(0, Nq, bm):
        moved += 3 * rows_m * D * es + 2 * rows_m * 4   # q, do in; dq out; lse, delta
        for _, rows_n in _rows(0, _attn_hi(start_m, bm, Nq, Nk, causal), bn):
            flops += 3 * bm * bn * dot
            moved += 2 * rows_n * D * es + tile_extra(rows_m, rows_n)
    min_bwd = (3 * Nq + 2 * Nk) * D * es + Nq * 4 + extra_in + (Nq + 2 * Nk) * D * es   # q k v do out lse; dq dk dv
    bwd = Account("attention", "bwd", shape, _dtype_name(dtype), bh * flops, bh * 5 * 2 * D * pairs,
                  bh * moved, bh * min_bwd, 3)
    return [fwd, bwd]


# ----------------------------------------------------------------------------- contrastive
def contrastive_account(Nq: int, Nk: int, D: int, dtype: torch.dtype = torch.bfloat16, *, DS: int = 0,
                        siglip: bool = False, sms: Optional[int] = None,
                        workspace_bytes: Optional[int] = None) -> List[Account]:
    """``[forward, backward]`` accounts of the InfoNCE (``DS``: soft-target width, 0 = hard) or
    SigLIP launchers at ``Nq`` queries x ``Nk`` keys of width ``D``.

    Forward: ``_lse_fwd_kernel`` / ``_siglip_fwd_kernel`` over ``plan_key_splits`` (``sms``: the
    SM count it assumes, default ``contrastive.H200_SMS``) and the combine.  Backward: the
    rectangles of ``grad_plan`` (``workspace_bytes``: default ``WORKSPACE_BYTES``), each G tile's
    score dots, the G store, and torch's dq / dk GEMMs on G (G and the other side read, the
    gradient rows written).
    """
    from . import contrastive as C

    es = torch.empty((), dtype=dtype).element_size()
    soft = DS > 0 and not siglip
    name = "siglip" if siglip else "infonce"
    shape = f"Nq={Nq} Nk={Nk} D={D}" + (f" DS={DS}" if soft else "")
    feat = D + (DS if soft else 0)
    fields = 1 if siglip else (5 if soft else 2)        # partials per row and split
    outs = 3 if soft else 1                              # fp32 outputs per row (lse, soft_dot, soft_lse / r)
    stats = 1 if siglip else (4 if soft else 2)          # fp32 per-query stats the backward reads

    def rect(M: int, N: int, bm: int, bn: int, cfg: dict):
        """(score FLOPs, feature bytes) of the score tiles over an M x N rectangle: every tile a
        full bm x bn dot over the padded feature chunks; the rows of A and B read per tile."""
        cm, cn = triton.cdiv(M, bm), triton.cdiv(N, bn)
        per_tile = 2 * bm * bn * triton.cdiv(D, cfg["bd"]) * cfg["bd"]
        if soft:
            per_tile += 2 * bm * bn * triton.cdiv(DS, cfg["bds"]) * cfg["bds"]
        return cm * cn * per_tile, (cn * M + cm * N) * feat * es

    # forward: splits hold whole key blocks, so the tiles are those of the whole rectangle
    cfg = C._config("fwd", dtype, D, DS if soft else 0, C.TILES.lookup("fwd", dtype, gpu=True, soft=soft))
    n_m = triton.cdiv(Nq, cfg["bm"])
    S, _ = C.plan_key_splits(n_m, Nk, cfg["bn"], torch.device("meta"), sms=sms)
    flops, moved = rect(Nq, Nk, cfg["bm"], cfg["bn"], cfg)
    moved += S * Nq * 4 * (fields if S > 1 else outs)
    if S > 1:
        moved += S * Nq * 4 * fields + Nq * 4 * outs     # the combine (SigLIP: torch's sum)
    fwd = Account(name, "fwd", shape + (f" splits={S}" if S > 1 else ""), _dtype_name(dtype), flops,
                  2 * Nq * Nk * feat, moved, (Nq + Nk) * feat * es + Nq * 4 * outs, 2 if S > 1 else 1)

    # backward: the G tiles of each rectangle, then torch's GEMMs on G
    cfg = C._config("bwd", dtype, D, DS if soft else 0, C.TILES.lookup("bwd", dtype, gpu=True, soft=soft))
    ws = C.WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    plan = C.grad_plan(Nq, Nk, es, cfg["bm"], cfg["bn"], ws)
    flops = moved = 0
    n_gemm = 0
    for _, mq, _, mk, role in plan:
        f, b = rect(mq, mk, cfg["bm"], cfg["bn"], cfg)
        gemms = (role != "dk") + (role != "dq")       # dq rows = G @ k chunk, dk rows = G^T @ q chunk
        n_gemm += gemms
        flops += f + gemms * 2 * mq * mk * D
        moved += b + mq * mk * es + mq * 4 * stats                          # + the G store, the stats
        moved += gemms * (mq * mk * es + (mq + mk) * D * es)                 # G and the other side in, rows out
    min_bwd = (Nq + Nk) * feat * es + (Nq + Nk) * D * es + Nq * 4 * stats
    passes = 1 if plan[0][4] == "both" else 2
    bwd = Account(name, "bwd", shape + f" passes={passes}", _dtype_name(dtype), flops,
                  2 * Nq * Nk * (3 * D + (DS if soft else 0)), moved, min_bwd, len(plan) + n_gemm)
    return [fwd, bwd]


# ----------------------------------------------------------------------------- the table
# (B, H, N, D, causal) and (N, D, DS, siglip): the README's benchmark sizes and the gate's shapes
DEFAULT_ATTENTION = ((256, 12, 197, 64, False), (64, 16, 257, 80, False), (256, 16, 577, 72, False),
                     (4, 16, 4096, 128, False), (4, 16, 4096, 128, True))
DEFAULT_CONTRASTIVE = ((4096, 32768, 768, 0, False), (32768, 32768, 512, 0, False), (32768, 32768, 768, 0, False),
                       (32768, 32768, 768, 768, False), (32768, 32768, 768, 0, True), (262144, 262144, 512, 0, False))


def account_table(dtype: torch.dtype = torch.bfloat16, attention: Sequence[tuple] = DEFAULT_ATTENTION,
                  contrastive: Sequence[tuple] = DEFAULT_CONTRASTIVE) -> List[Account]:
    """The accounts of the default shapes (attention ``(B, H, N, D, causal)``, contrastive
    ``(Nq, Nk, D, DS, siglip)``), forward and backward of each."""
    out: List[Account] = []
    for B, H, N, D, causal in attention:
        out += attention_account(B, H, N, N, D, dtype, causal=causal)
    for Nq, Nk, D, DS, siglip in contrastive:
        out += contrastive_account(Nq, Nk, D, dtype, DS=DS, siglip=siglip)
    return out


def format_accounts(accounts: Sequence[Account]) -> List[str]:
    """Aligned text lines: op, phase, shape, dtype, issued / useful TFLOP and ratio, GB moved /
    minimum and ratio, launches."""
    head = ["op", "phase", "shape", "dtype", "MMA TFLOP issued", "useful", "issued/useful", "GB moved",
            "minimum", "moved/min", "launches"]
    rows = [head] + [[a.op, a.phase, a.shape, a.dtype, f"{a.issued / 1e12:.3f}", f"{a.useful / 1e12:.3f}",
                      f"x{a.flop_ratio:.2f}", f"{a.bytes / 1e9:.3f}", f"{a.min_bytes / 1e9:.3f}",
                      f"x{a.byte_ratio:.1f}", str(a.launches)] for a in accounts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
