"""The launch-plan account (vlfast.kernels.plan) against hand counts from the tile tables' GPU rows.

Host-side only: nothing is launched or compiled.
"""

import pytest
import torch
import triton

from vlfast.kernels import attention as A
from vlfast.kernels import contrastive as C
from vlfast.kernels import plan
from vlfast.kernels._common import override_tiles

BF16 = torch.bfloat16


def _gpu(table, kind, dtype, **query):
    return table.lookup(kind, dtype, gpu=True, **query)


@pytest.mark.parametrize("N,D", [(197, 64), (100, 80), (1, 40), (4096, 128)])
def test_attention_non_causal_counts(N, D):
    B, H = 3, 5
    fwd, bwd = plan.attention_account(B, H, N, N, D, BF16)
    bd = A._block_d(D)
    t = _gpu(A.TILES, "fwd", BF16, BLOCK_D=bd)
    tiles = triton.cdiv(N, t["BLOCK_M"]) * triton.cdiv(N, t["BLOCK_N"])
    assert fwd.issued == B * H * tiles * 2 * (2 * t["BLOCK_M"] * t["BLOCK_N"] * bd)   # QK^T and PV per tile
    assert fwd.useful == B * H * 4 * N * N * D
    kv, qq = _gpu(A.TILES, "bwd_kv", BF16, BLOCK_D=bd), _gpu(A.TILES, "bwd_q", BF16, BLOCK_D=bd)
    kv_tiles = triton.cdiv(N, kv["BLOCK_M"]) * triton.cdiv(N, kv["BLOCK_N"])
    q_tiles = triton.cdiv(N, qq["BLOCK_M"]) * triton.cdiv(N, qq["BLOCK_N"])
    assert bwd.issued == B * H * 2 * bd * (4 * kv_tiles * kv["BLOCK_M"] * kv["BLOCK_N"]
                                           + 3 * q_tiles * qq["BLOCK_M"] * qq["BLOCK_N"])
    assert bwd.useful == B * H * 10 * N * N * D
    # two dots issued per useful pair at least: the backward's seven products vs FlashAttention-2's five
    assert bwd.flop_ratio >= 7 / 5 - 1e-12 and fwd.flop_ratio >= 1.0
    # the forward reads q, k, v and writes out, lse at least once
    es = 2
    assert fwd.min_bytes == B * H * (4 * N * D * es + 4 * N)
    assert fwd.bytes >= fwd.min_bytes and bwd.bytes >= bwd.min_bytes


def test_attention_causal_skips_blocks():
    N, D = 1000, 64
    plain = plan.attention_account(1, 1, N, N, D, BF16)
    causal = plan.attention_account(1, 1, N, N, D, BF16, causal=True)
    assert causal[0].useful == 4 * D * N * (N + 1) // 2
    assert causal[1].useful == 10 * D * N * (N + 1) // 2
    for c, p in zip(causal, plain):       # about half the tiles, never fewer than the useful work
        assert c.useful <= c.issued < 0.6 * p.issued
    # cross-attention, bottom-right aligned: query i sees min(Nk, i + Nk - Nq + 1) keys
    fwd, _ = plan.attention_account(1, 1, 10, 30, D, BF16, causal=True)
    assert fwd.useful == 4 * D * sum(min(30, i + 21) for i in range(10))


def test_attention_bias_and_padding_bytes():
    base = plan.attention_account(2, 2, 197, 197, 64, BF16)
    bias = plan.attention_account(2, 2, 197, 197, 64, BF16, bias=True)
    pad = plan.attention_account(2, 2, 197, 197, 64, BF16, padding=True)
    for b, x, p in zip(base, bias, pad):
        assert b.issued == x.issued == p.issued
        assert x.min_bytes - b.min_bytes == 2 * 2 * 197 * 197 * 2      # the bias read once
        assert x.bytes - b.bytes >= x.min_bytes - b.min_bytes and p.bytes > b.bytes


@pytest.mark.parametrize("soft", [0, 256])
def test_contrastive_one_pass_is_the_minimum(soft):
    """Tile-aligned shapes whose G fits the workspace: every FLOP issued is useful (scores once, dq, dk)."""
    t = _gpu(C.TILES, "bwd", BF16, soft=bool(soft))
    f = _gpu(C.TILES, "fwd", BF16, soft=bool(soft))
    Nq = t["BLOCK_M"] * f["BLOCK_M"]
    Nk = t["BLOCK_N"] * f["BLOCK_N"]
    fwd, bwd = plan.contrastive_account(Nq, Nk, 512, BF16, DS=soft)
    assert "passes=1" in bwd.shape
    assert fwd.issued == fwd.useful == 2 * Nq * Nk * (512 + soft)
    assert bwd.issued == bwd.useful == 2 * Nq * Nk * (3 * 512 + soft)
    assert bwd.launches == 3                 # the G kernel, dq and dk GEMMs


def test_contrastive_two_passes_and_the_old_plan():
    """N = 32k, D = 768 at the default workspace: G in key and query chunks, each score tile twice:
    4/3 of the minimum, where the old backward (each 128-wide output chunk recomputing the score
    tile, in two launches) issued 14 passes, 14/3 of it."""
    N, D = 32768, 768
    fwd, bwd = plan.contrastive_account(N, N, D, BF16)
    assert "passes=2" in bwd.shape
    assert bwd.flop_ratio == pytest.approx(4 / 3)
    old = 2 * (triton.cdiv(D, 128) + 1) * 2 * N * N * D
    assert old / bwd.useful == pytest.approx(14 / 3)
    soft_bwd = plan.contrastive_account(N, N, D, BF16, DS=D)[1]
    assert soft_bwd.flop_ratio <= 1.5
    # a bigger workspace makes it one pass
    assert plan.contrastive_account(N, N, D, BF16, workspace_bytes=N * N * 2)[1].flop_ratio == pytest.approx(1.0)


def test_contrastive_splits_in_the_account():
    """One CLIP rank's 4096 queries against 32k gathered keys: split over the keys (the forward's
    grid reaches two waves of 132 SMs); 32k queries fill them without a split at 4 SMs."""
    fwd, _ = plan.contrastive_account(4096, 32768, 768, BF16)
    bm = _gpu(C.TILES, "fwd", BF16, soft=False)["BLOCK_M"]
    S = C.plan_key_splits(triton.cdiv(4096, bm), 32768, _gpu(C.TILES, "fwd", BF16, soft=False)["BLOCK_N"],
                          torch.device("meta"))[0]
    assert S > 1 and f"splits={S}" in fwd.shape and fwd.launches == 2
    assert triton.cdiv(4096, bm) * S >= 2 * C.H200_SMS or S == C.MAX_SPLITS
    few, _ = plan.contrastive_account(32768, 32768, 768, BF16, sms=4)
    assert "splits" not in few.shape and few.launches == 1


def test_account_uses_gpu_rows_under_the_interpreter(monkeypatch):
    """The plan is the GPU's even where the interpreter runs the kernels (its own tiny tiles)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gpu = plan.account_table()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert [a.as_dict() for a in plan.account_table()] == [a.as_dict() for a in gpu]
    odd = dict(DS=40, workspace_bytes=100 * 300)         # feature widths the interpreter's chunks split otherwise
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gpu_odd = [a.as_dict() for a in plan.contrastive_account(100, 300, 257, BF16, **odd)]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert [a.as_dict() for a in plan.contrastive_account(100, 300, 257, BF16, **odd)] == gpu_odd
    with override_tiles("attention", fwd=dict(BLOCK_N=16)):         # overrides do count (tuning)
        assert plan.attention_account(1, 1, 197, 197, 64)[0].issued != gpu[0].issued / (256 * 12)


def test_table_and_format():
    rows = plan.account_table()
    lines = plan.format_accounts(rows)
    assert len(lines) == len(rows) + 1 and "issued/useful" in lines[0]
    assert {a.op for a in rows} == {"attention", "infonce", "siglip"}
    for a in rows:
        assert a.issued >= a.useful > 0 and a.bytes >= a.min_bytes > 0
