"""Triton flash-attention kernels (vlfast.kernels.attention) against a float64 eager reference.

Without CUDA the kernels run in the Triton CPU interpreter (conftest sets TRITON_INTERPRET=1
before the kernel module is imported), at small sizes.  Accuracy rule (FlashAttention's):
fp16/bf16 kernel error vs the fp64 reference <= 2x (forward) / 3x (gradients) the error of
eager PyTorch math in the same dtype, plus 1e-5; fp32: error / max|ref| < 1e-3.
"""

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vlfast.kernels.attention as A  # noqa: E402  (a core module: a broken import fails, never skips)
from vlfast.kernels._common import override_tiles  # noqa: E402
from vlfast.testing import assert_within_eager_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- reference
def reference(q, k, v, *, kpm=None, bias=None, causal=False, scale=1.0, keep=None, p=0.0):
    """Eager attention in q's dtype (out, lse); fully excluded rows -> zeros, lse -inf."""
    s = scale * (q @ k.transpose(-1, -2))
    if bias is not None:
        s = s + bias.to(s.dtype)
    Nq, Nk = s.shape[-2:]
    valid = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if kpm is not None:
        valid = valid & ~kpm[:, None, None, :]
    if causal:
        i = torch.arange(Nq, device=s.device)[:, None]
        j = torch.arange(Nk, device=s.device)[None, :]
        valid = valid & (j <= i + Nk - Nq)
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    P = e / torch.where(l == 0, torch.ones_like(l), l)
    lse = (m + torch.log(l.float())).squeeze(-1)
    if keep is not None:
        P = P * keep.to(P.dtype) / (1 - p)
    return P @ v, lse


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close(name, got, ref64, eager, dtype, factor):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = _err(got, ref64)
    if dtype == torch.float32:
        rel = err / max(ref64.abs().max().item(), 1e-2)   # floor: gradients that are exactly 0
        assert rel < 1e-3, f"{name}: relative error {rel:.3g}"
    else:
        assert_within_eager_error(got, eager, ref64, factor, atol=1e-5, what=name)


def make_qkv(B, H, Nq, Nk, D, dtype, transposed=False):
    if transposed:   # (B, N, H, D) storage viewed as (B, H, N, D)
        q = torch.randn(B, Nq, H, D, device=DEVICE).transpose(1, 2)
        k = torch.randn(B, Nk, H, D, device=DEVICE).transpose(1, 2)
        v = torch.randn(B, Nk, H, D, device=DEVICE).transpose(1, 2)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return tuple(torch.randn(B, H, n, D, device=DEVICE).to(dtype) for n in (Nq, Nk, Nk))


def check(B, H, Nq, Nk, D, dtype, *, causal=False, kpm=None, bias_shape=None, deterministic=False,
          dropout_p=0.0, seed=0, offset=0, transposed=False, backward=True, bias_override=None):
    """Runs forward + backward, compares with the fp64 (and same-dtype eager) reference
    (``bias_override``: the bias tensor itself, of ``bias_shape``, in any layout)."""
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype, transposed)
    scale = D ** -0.5
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, device=DEVICE).to(dtype) if bias_override is None else bias_override.to(dtype)
    keep = None
    if dropout_p > 0:
        keep = A.dropout_mask(B, H, Nq, Nk, dropout_p=dropout_p, seed=seed, offset=offset, device=DEVICE)
    bias_full = bias.expand(B, H, Nq, Nk) if bias is not None else None
    out, lse = A.attention_forward(q, k, v, key_padding_mask=kpm, bias=bias_full, causal=causal,
                                   scale=scale, dropout_p=dropout_p, seed=seed, offset=offset)
    assert out.shape == (B, H, Nq, D) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32

    def run_ref(cast):
        ins = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        b = bias.detach().to(cast).requires_grad_(True) if bias is not None else None
        o, l = reference(*ins, kpm=kpm, bias=b, causal=causal, scale=scale, keep=keep, p=dropout_p)
        return ins, b, o, l

    (q64, k64, v64), b64, o64, l64 = run_ref(torch.float64)
    (qe, ke, ve), be, oe, _ = run_ref(dtype)
    _assert_close("out", out, o64, oe, dtype, 2)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "lse: -inf rows differ"
    fin = torch.isfinite(l64)
    assert _err(lse[fin], l64[fin]) < 1e-3 * max(1.0, l64[fin].abs().max().item() if fin.any() else 1.0)
    if not backward:
        return out, lse
    do = torch.randn(B, H, Nq, D, device=DEVICE).to(dtype)
    grad_shape = tuple(bias_shape) if bias is not None else None
    dq, dk, dv, db = A.attention_backward(
        do, q, k, v, out, lse, key_padding_mask=kpm, bias=bias_full, causal=causal, scale=scale,
        dropout_p=dropout_p, seed=seed, offset=offset, bias_grad_shape=grad_shape,
        deterministic=deterministic)
    g64 = torch.autograd.grad(o64, [q64, k64, v64] + ([b64] if b64 is not None else []), do.double())
    ge = torch.autograd.grad(oe, [qe, ke, ve] + ([be] if be is not None else []), do)
    for name, got, r, e, t in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, ge, (q, k, v)):
        assert got.shape == t.shape and got.dtype == dtype
        _assert_close(name, got, r, e, dtype, 3)
    if bias is not None:
        assert db.shape == tuple(bias_shape) and db.dtype == torch.float32
        _assert_close("dbias", db, g64[3], ge[3], dtype, 3)
    else:
        assert db is None
    return out, lse, dq, dk, dv, db


def tiles(**kinds):
    """``override_tiles`` for the attention kernels from ``kind=(BLOCK_M, BLOCK_N)`` pairs."""
    return override_tiles("attention", **{kind: dict(BLOCK_M=m, BLOCK_N=n) for kind, (m, n) in kinds.items()})


# ----------------------------------------------------------------------------- head dims / lengths
@pytest.mark.parametrize("D,dtype", [
    (32, torch.float16), (40, torch.bfloat16), (64, torch.float32), (72, torch.float16),
    (80, torch.bfloat16), (96, torch.float32), (128, torch.float16), (256, torch.bfloat16),
])
def test_head_dims(D, dtype):
    check(1, 2, 20, 24, D, dtype)


@pytest.mark.parametrize("D", [40, 256])
def test_head_dims_fp32(D):
    check(1, 1, 19, 21, D, torch.float32)


@pytest.mark.parametrize("N,dtype", [(1, torch.float32), (1, torch.bfloat16), (17, torch.float16),
                                     (17, torch.float32), (197, torch.float32)])
def test_seq_lens(N, dtype):
    B, H = (1, 1) if N > 100 else (2, 3)
    check(B, H, N, N, 64, dtype)


@pytest.mark.parametrize("N", [257, pytest.param(577, marks=pytest.mark.slow),
                               pytest.param(1023, marks=pytest.mark.slow)])
def test_long_sequences(N):
    # bigger blocks keep the interpreter fast; BLOCK_M != BLOCK_N on purpose
    with tiles(fwd=(64, 32), bwd_kv=(32, 64), bwd_q=(64, 32)):
        check(1, 1, N, N, 32, torch.float32, causal=(N == 577))


# ----------------------------------------------------------------------------- cross / causal
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_attention(dtype):
    check(2, 2, 17, 45, 64, dtype)


@pytest.mark.parametrize("Nq,Nk,dtype", [(33, 33, torch.float32), (17, 45, torch.float16),
                                         (40, 23, torch.float32), (50, 50, torch.bfloat16)])
def test_causal(Nq, Nk, dtype):
    # Nq > Nk: the first Nq - Nk query rows see no key -> zero output / gradients
    res = check(2, 2, Nq, Nk, 32, dtype, causal=True)
    if Nq > Nk:
        out, lse, dq = res[0], res[1], res[2]
        assert torch.isinf(lse[:, :, :Nq - Nk]).all()
        assert (out[:, :, :Nq - Nk] == 0).all() and (dq[:, :, :Nq - Nk] == 0).all()


def test_causal_uneven_blocks():
    with tiles(fwd=(32, 16), bwd_kv=(16, 32), bwd_q=(32, 16)):
        check(1, 2, 37, 53, 32, torch.float32, causal=True, bias_shape=(1, 2, 37, 53))
        check(1, 1, 53, 37, 32, torch.float32, causal=True)


@pytest.mark.parametrize("split", ["1", "0"], ids=["interior-split", "one-masked-loop"])
@pytest.mark.parametrize("D", [32, 72])
def test_interior_and_edge_blocks(monkeypatch, D, split):
    """With VLFAST_ATTENTION_INTERIOR=1 every kernel runs interior blocks (no bound / causal mask
    math) and edge blocks (the causal diagonal, the last partial block) apart; the dK/dV kernel
    splits at D = 32 and keeps one masked loop at D = 72 (``_dkdv_interior``).  Shapes put interior
    blocks before, between and after the edge ones: Nq != Nk both ways, causal, a padding mask, a
    broadcast bias with its gradient.  Off (the default): one masked loop everywhere."""
    monkeypatch.setenv("VLFAST_ATTENTION_INTERIOR", split)
    assert A.interior_split() == (split == "1")
    assert A._dkdv_interior(D, A._block_d(D), True) == (D == 32)
    kpm = torch.zeros(2, 70, dtype=torch.bool, device=DEVICE)
    kpm[1, 60:] = True
    with tiles(fwd=(16, 16), bwd_kv=(16, 16), bwd_q=(16, 16)):
        check(2, 1, 50, 70, D, torch.float32, causal=True, kpm=kpm, bias_shape=(1, 1, 50, 70))
        check(1, 2, 70, 50, D, torch.float32, causal=True)
        check(1, 1, 64, 64, D, torch.float32, bias_shape=(1, 1, 64, 64))     # every block interior but none causal


def test_interior_split_env(monkeypatch):
    monkeypatch.delenv("VLFAST_ATTENTION_INTERIOR", raising=False)
    assert A.interior_split() is False
    monkeypatch.setenv("VLFAST_ATTENTION_INTERIOR", "sometimes")
    with pytest.raises(ValueError, match="VLFAST_ATTENTION_INTERIOR"):
        A.attention_forward(*make_qkv(1, 1, 4, 4, 16, torch.float32, False), scale=1.0)


# ----------------------------------------------------------------------------- key padding
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_padding_fully_padded_row(dtype):
    B, H, Nq, Nk, D = 3, 2, 19, 26, 32
    kpm = torch.zeros(B, Nk, dtype=torch.bool, device=DEVICE)
    kpm[0, 20:] = True
    kpm[1] = True               # batch element 1: every key is padding
    kpm[2, ::3] = True
    out, lse, dq, dk, dv, _ = check(B, H, Nq, Nk, D, dtype, kpm=kpm)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    # padded keys get no gradient
    assert (dk[0, :, 20:] == 0).all() and (dv[0, :, 20:] == 0).all()


def test_key_padding_with_causal_bias_dropout():
    B, H, Nq, Nk = 2, 2, 21, 21
    kpm = torch.zeros(B, Nk, dtype=torch.bool, device=DEVICE)
    kpm[0, :4] = True           # causal + padding of the first keys: rows 0..3 of b=0 are empty
    kpm[1, 15:] = True
    out, lse, dq, dk, dv, db = check(B, H, Nq, Nk, 32, torch.float32, kpm=kpm, causal=True,
                                     bias_shape=(B, 1, 1, Nk), dropout_p=0.2, seed=5, offset=11)
    assert (out[0, :, :4] == 0).all() and (dq[0, :, :4] == 0).all()
    assert (db[0, ..., :4] == 0).all()


# ----------------------------------------------------------------------------- bias / dbias
BIAS_SHAPES = [(1, 2, 13, 29), (2, 1, 1, 29), (2, 2, 13, 29), (1, 1, 13, 1), (1, 1, 1, 1), (2, 2, 1, 29)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", BIAS_SHAPES)
def test_bias_grad(shape, deterministic):
    check(2, 2, 13, 29, 32, torch.float32, bias_shape=shape, deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_grad_low_precision(dtype):
    check(2, 2, 24, 24, 64, dtype, bias_shape=(1, 2, 24, 24), causal=True)


def test_bias_grad_deterministic_bitwise():
    torch.manual_seed(1)
    r1 = check(2, 2, 13, 29, 32, torch.float32, bias_shape=(2, 1, 1, 29), deterministic=True)
    torch.manual_seed(1)
    r2 = check(2, 2, 13, 29, 32, torch.float32, bias_shape=(2, 1, 1, 29), deterministic=True)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


def test_bias_minus_inf_masks_keys():
    # -inf in the bias (an additive mask) behaves like a padding mask, full -inf rows give zeros
    B, H, Nq, Nk, D = 1, 2, 9, 18, 32
    q, k, v = make_qkv(B, H, Nq, Nk, D, torch.float32)
    bias = torch.zeros(B, H, Nq, Nk, device=DEVICE)
    bias[..., 10:] = float("-inf")
    bias[:, :, 3] = float("-inf")
    out, lse = A.attention_forward(q, k, v, bias=bias, scale=0.3)
    ref, _ = reference(q.double(), k[:, :, :10].double(), v[:, :, :10].double(),
                       bias=bias[..., :10].double(), scale=0.3)
    assert torch.isfinite(out).all() and (out[:, :, 3] == 0).all()
    assert _err(out, ref) < 1e-5
    do = torch.randn_like(out)
    dq, dk, dv, db = A.attention_backward(do, q, k, v, out, lse, bias=bias, scale=0.3,
                                          bias_grad_shape=(B, H, Nq, Nk))
    for t in (dq, dk, dv, db):
        assert torch.isfinite(t).all()
    assert (dk[:, :, 10:] == 0).all() and (db[..., 10:] == 0).all() and (dq[:, :, 3] == 0).all()


# ----------------------------------------------------------------------------- dropout
def test_dropout_mask_properties():
    kw = dict(device=DEVICE)
    m1 = A.dropout_mask(2, 3, 17, 45, dropout_p=0.3, seed=42, offset=0, **kw)
    m2 = A.dropout_mask(2, 3, 17, 45, dropout_p=0.3, seed=42, offset=0, **kw)
    m3 = A.dropout_mask(2, 3, 17, 45, dropout_p=0.3, seed=43, offset=0, **kw)
    m4 = A.dropout_mask(2, 3, 17, 45, dropout_p=0.3, seed=42, offset=17 * 45, **kw)
    assert m1.dtype == torch.bool and m1.shape == (2, 3, 17, 45)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    assert not torch.equal(m1, m4)
    m4 = A.dropout_mask(2, 3, 17, 45, dropout_p=0.3, seed=42, offset=17 * 6, **kw)
    # offset shifts the Philox counter, ceil(Nk / 8) = 6 per row: offset = one (b, h) slice of
    # counters gives the next slice's mask
    assert torch.equal(m4.flatten()[: 2 * 3 * 17 * 45 - 17 * 45], m1.flatten()[17 * 45:])
    for p in (0.1, 0.5):
        m = A.dropout_mask(4, 4, 32, 64, dropout_p=p, seed=7, offset=3, **kw)
        rate = m.float().mean().item()
        assert abs(rate - (1 - p)) < 0.02, rate
    # very large offsets (int64 Philox counters) still work and differ
    big = A.dropout_mask(1, 1, 4, 16, dropout_p=0.5, seed=1, offset=2 ** 40, **kw)
    small = A.dropout_mask(1, 1, 4, 16, dropout_p=0.5, seed=1, offset=0, **kw)
    assert not torch.equal(big, small)


# The mask's definition (kernels/attention.py), reimplemented in numpy from Triton's Philox4x32-10
# (triton/language/random.py: counter (lo, hi, 0, 0) of the int64 offset, key (lo, hi) of the
# int64 seed, 10 rounds, these constants), independent of the kernels' tiles and joins.
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def philox4x32_10(counter, seed):
    """The four uint32 words of Philox4x32-10 at int64 counters ``counter`` (any shape), int64 ``seed``."""
    c = np.asarray(counter, dtype=np.int64).view(np.uint64)
    lo32 = np.uint64(0xFFFFFFFF)
    c0, c1 = c & lo32, c >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF        # the seed's two's complement words
    for _ in range(10):
        prod_a, prod_b = np.uint64(PHILOX_ROUND_A) * c0, np.uint64(PHILOX_ROUND_B) * c2   # exact in 64 bits
        c0, c1, c2, c3 = ((prod_b >> np.uint64(32)) ^ c1 ^ np.uint64(k0), prod_b & lo32,
                          (prod_a >> np.uint64(32)) ^ c3 ^ np.uint64(k1), prod_a & lo32)
        k0, k1 = (k0 + PHILOX_KEY_A) & 0xFFFFFFFF, (k1 + PHILOX_KEY_B) & 0xFFFFFFFF
    return c0, c1, c2, c3


def reference_dropout_mask(B, H, Nq, Nk, p, seed, offset):
    """keep[b, h, i, j] (numpy bool): the 16-bit half j % 2 of word (j % 8) // 2 of Philox at counter
    offset + r * ceil(Nk / 8) + j // 8 (r = (b*H + h)*Nq + i), kept iff >= min(round(p * 65536), 65535)."""
    t = min(round(p * 65536), 65535)
    r = np.arange(B * H * Nq, dtype=np.int64)[:, None]
    j = np.arange(Nk, dtype=np.int64)[None, :]
    words = np.stack(philox4x32_10(offset + r * (-(-Nk // 8)) + j // 8, seed))       # (4, R, Nk)
    lane = np.broadcast_to(j % 8, words.shape[1:])
    word = np.take_along_axis(words, (lane // 2)[None], 0)[0]
    half = np.where(lane % 2 == 0, word & np.uint64(0xFFFF), word >> np.uint64(16))
    return (half >= t).reshape(B, H, Nq, Nk)


def test_philox_reference_matches_tl_randint4x():
    # the numpy Philox: Random123's known-answer vector (counter 0, key 0), then tl.randint4x
    # itself (interpreted) at int64 counters and seeds: the reference's premises
    words = [int(w[0]) for w in philox4x32_10(np.zeros(1, np.int64), 0)]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    import triton
    import triton.language as tl

    @triton.jit
    def words_kernel(out_ptr, seed, offset, N: tl.constexpr):
        ctr = offset + tl.arange(0, N).to(tl.int64)
        w0, w1, w2, w3 = tl.randint4x(seed, ctr)
        i = tl.arange(0, N)
        tl.store(out_ptr + i * 4, w0.to(tl.int64))
        tl.store(out_ptr + i * 4 + 1, w1.to(tl.int64))
        tl.store(out_ptr + i * 4 + 2, w2.to(tl.int64))
        tl.store(out_ptr + i * 4 + 3, w3.to(tl.int64))

    for seed, offset in ((0, 0), (-5, 2 ** 32 - 3), (2 ** 40 + 7, 11)):
        out = torch.empty(16, 4, dtype=torch.int64, device=DEVICE)
        words_kernel[(1,)](out, seed, offset, N=16)
        ref = np.stack(philox4x32_10(offset + np.arange(16), seed), axis=1).astype(np.int64)
        assert np.array_equal(out.cpu().numpy() & 0xFFFFFFFF, ref), (seed, offset)


@pytest.mark.parametrize("Nk", [1, 7, 9, 17, 45])
@pytest.mark.parametrize("seed,offset", [(1234, 0), (-7, 13), (2 ** 40 + 3, 0), (-2 ** 63, 2 ** 33 + 1)])
def test_dropout_mask_matches_definition(Nk, seed, offset):
    B, H, Nq, p = 2, 3, 5, 0.3
    # 4 x 16 mask tiles: several row and key blocks (start_n > 0 where Nk > 16)
    with override_tiles("attention", dropout_mask=dict(BLOCK_M=4, BLOCK_N=16)):
        got = A.dropout_mask(B, H, Nq, Nk, dropout_p=p, seed=seed, offset=offset, device=DEVICE)
    ref = reference_dropout_mask(B, H, Nq, Nk, p, seed, offset)
    assert np.array_equal(got.cpu().numpy(), ref)
    # the default tiles draw the same mask
    assert torch.equal(got, A.dropout_mask(B, H, Nq, Nk, dropout_p=p, seed=seed, offset=offset, device=DEVICE))


def test_dropout_threshold_quantization():
    assert A._drop_threshold(0.0) == 0 and A._drop_threshold(0.5) == 32768
    assert A._drop_threshold(0.1) == round(0.1 * 65536) == 6554
    assert A._drop_threshold(1 - 2 ** -20) == 65535                 # clamped: a 16-bit value can reach it
    for p in (1e-6, 0.1, 0.37, 0.5, 0.9, 1 - 2 ** -17):
        assert abs(A._drop_threshold(p) / 65536 - p) <= 2 ** -17
    # p's that quantize to one threshold draw one mask; the next threshold drops more
    kw = dict(seed=3, offset=0, device=DEVICE)
    t = A._drop_threshold(0.25)
    m1 = A.dropout_mask(2, 2, 16, 40, dropout_p=t / 65536, **kw)
    m2 = A.dropout_mask(2, 2, 16, 40, dropout_p=(t + 0.4) / 65536, **kw)
    assert torch.equal(m1, m2)
    assert torch.equal(A.dropout_mask(1, 1, 3, 9, dropout_p=0.0, **kw), torch.ones(1, 1, 3, 9, dtype=torch.bool))


def _dropout_tiles():
    """fwd, bwd_kv, bwd_q and dropout_mask tiles that all differ (BLOCK_N 32 / 64 / 16 / 16)."""
    return override_tiles("attention", fwd=dict(BLOCK_M=16, BLOCK_N=32), bwd_kv=dict(BLOCK_M=32, BLOCK_N=64),
                          bwd_q=dict(BLOCK_M=32, BLOCK_N=16), dropout_mask=dict(BLOCK_M=8, BLOCK_N=16))


@pytest.mark.parametrize("Nk", [45, 17])
def test_dropout_each_kernel_applies_the_mask_exactly(Nk):
    # q = 0: uniform probabilities 1/Nk, so identity v / do / k read the applied mask back exactly:
    # out[i, j] = keep_ij s / Nk (fwd), dv[j, i] = keep_ij s / Nk (bwd_kv, transposed tiles) and
    # dq[i, j] = scale dS_ij, positive iff kept (bwd_q); s = 1 / (1 - p)
    B, H, Nq, D, p, seed, offset = 1, 2, 19, 64, 0.4, -99, 5
    keep = A.dropout_mask(B, H, Nq, Nk, dropout_p=p, seed=seed, offset=offset, device=DEVICE)
    eye_k = torch.eye(Nk, D, device=DEVICE).expand(B, H, Nk, D).contiguous()
    eye_q = torch.eye(Nq, D, device=DEVICE).expand(B, H, Nq, D).contiguous()
    q = torch.zeros(B, H, Nq, D, device=DEVICE)
    rng = dict(scale=0.5, dropout_p=p, seed=seed, offset=offset)
    with _dropout_tiles():
        out, lse = A.attention_forward(q, torch.randn(B, H, Nk, D, device=DEVICE), eye_k, **rng)
        _, _, dv, _ = A.attention_backward(eye_q, q, torch.randn(B, H, Nk, D, device=DEVICE), eye_k, out, lse, **rng)
        e0_k = torch.zeros(B, H, Nk, D, device=DEVICE)
        e0_k[..., 0] = 1.0
        e0_q = torch.zeros(B, H, Nq, D, device=DEVICE)
        e0_q[..., 0] = 1.0
        out2, lse2 = A.attention_forward(q, eye_k, e0_k, **rng)
        dq, _, _, _ = A.attention_backward(e0_q, q, eye_k, e0_k, out2, lse2, **rng)
    s = 1 / (1 - p)
    torch.testing.assert_close(out[..., :Nk], keep.float() * s / Nk)
    torch.testing.assert_close(dv[..., :Nq], keep.transpose(-1, -2).float() * s / Nk)
    kept = keep.sum(-1, keepdim=True)
    mixed = ((kept > 0) & (kept < Nk)).expand_as(keep)        # rows with a kept and a dropped key
    assert mixed.float().mean() > 0.9
    assert torch.equal((dq[..., :Nk] > 0)[mixed], keep[mixed])


@pytest.mark.parametrize("p,dtype", [(0.1, torch.float32), (0.5, torch.float32), (0.1, torch.float16)])
def test_dropout_forward_backward(p, dtype):
    check(2, 2, 17, 45, 32, dtype, dropout_p=p, seed=1234, offset=77)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_different_tiles_against_float64(causal):
    # fwd / bwd_kv / bwd_q / dropout_mask on different tiles: out and every gradient match the float64
    # reference that replays dropout_mask; odd sizes, a negative seed and an odd offset
    with _dropout_tiles():
        check(2, 2, 19, 45, 32, torch.float32, causal=causal, dropout_p=0.3, seed=-12345, offset=7,
              bias_shape=(1, 2, 19, 45))


def test_dropout_reproducible_and_seed_dependent():
    q, k, v = make_qkv(1, 2, 16, 16, 32, torch.float32)
    o1, _ = A.attention_forward(q, k, v, scale=0.2, dropout_p=0.5, seed=9, offset=0)
    o2, _ = A.attention_forward(q, k, v, scale=0.2, dropout_p=0.5, seed=9, offset=0)
    o3, _ = A.attention_forward(q, k, v, scale=0.2, dropout_p=0.5, seed=10, offset=0)
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype):
    check(2, 3, 21, 21, 40, dtype, transposed=True, bias_shape=(2, 1, 1, 21), causal=True)


def test_non_contiguous_grad_output_and_kpm():
    B, H, N, D = 2, 2, 18, 32
    q, k, v = make_qkv(B, H, N, N, D, torch.float32, transposed=True)
    kpm_full = torch.zeros(B, 2 * N, dtype=torch.bool, device=DEVICE)
    kpm_full[0, 2 * 5:] = True
    kpm = kpm_full[:, ::2]          # non-unit stride
    out, lse = A.attention_forward(q, k, v, key_padding_mask=kpm, scale=0.25)
    do = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)
    grads = A.attention_backward(do, q, k, v, out, lse, key_padding_mask=kpm, scale=0.25)
    ins = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference(*ins, kpm=kpm, scale=0.25)
    assert _err(out, ref) < 1e-5
    g = torch.autograd.grad(ref, ins, do.double())
    for a, b in zip(grads[:3], g):
        assert _err(a, b) < 1e-4
    assert grads[3] is None


# ----------------------------------------------------------------------------- stride alignment (VEC)
def _strided(B, H, N, D, row, dtype, batch=None):
    """(B, H, N, D) random values whose rows are ``row >= D`` elements apart (a slice of wider
    storage); ``batch``: the batch stride (any value when B == 1)."""
    t = torch.randn(B, H, N, row, device=DEVICE).to(dtype)[..., :D]
    if batch is not None:
        t = t.as_strided(t.shape, (batch, *t.stride()[1:]))
    return t


@pytest.mark.parametrize("row,vec", [(72, 8), (73, 1), (74, 2), (76, 4), (80, 8)])
def test_stride_vec(row, vec):
    # VEC: the largest of 8, 4, 2, 1 dividing every stride but the last, on dims of size > 1
    t = _strided(2, 3, 5, 72, row, torch.float32)
    assert A._stride_vec(t) == vec
    assert A._stride_vec(t, _strided(2, 3, 5, 72, 72, torch.float32)) == vec      # the least of all tensors
    assert A._stride_vec(_strided(1, 1, 5, 72, 72, torch.float32, batch=12345)) == 8   # size-1 batch: any stride
    assert A._stride_vec(_strided(1, 1, 1, 72, row, torch.float32)) == 8       # one row: no stride counts


@pytest.mark.parametrize("row,dtype", [(72, torch.bfloat16), (73, torch.float32), (74, torch.bfloat16),
                                       (76, torch.float16), (72, torch.float32)])
def test_vec_strides_forward_backward(row, dtype):
    # the kernels' _aligned gives the compiler divisibility VEC (s // VEC * VEC): the identity on the
    # strides _stride_vec vouches for (here 1, 2, 4 and 8), and on a size-1 batch dim with an odd stride
    # (index 0); forward and every gradient against float64
    B, H, N, D = 1, 2, 19, 72
    q, k, v, do = (_strided(B, H, N, D, row, dtype, batch=12345) for _ in range(4))
    assert A._stride_vec(q, k, v, do) == math.gcd(8, row)
    scale = D ** -0.5
    out, lse = A.attention_forward(q, k, v, scale=scale)
    grads = A.attention_backward(do, q, k, v, out, lse, scale=scale)[:3]
    ins64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    insd = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref64, _ = reference(*ins64, scale=scale)
    eager, _ = reference(*insd, scale=scale)
    _assert_close("out", out, ref64, eager, dtype, 2)
    for name, got, r, e in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref64, ins64, do.double()),
                               torch.autograd.grad(eager, insd, do)):
        _assert_close(name, got, r, e, dtype, 3)


# ----------------------------------------------------------------------------- bias row pitch
def test_pitched_bias_layouts():
    """The bias the kernels read: the same values, every row at a multiple of BIAS_PITCH elements
    (so Triton's divisibility specialization vectorizes its loads), broadcast dims kept stride 0,
    an already aligned bias used as is."""
    P = A.BIAS_PITCH
    base = torch.randn(2, 3, 17, 45, device=DEVICE)
    layouts = {
        "contiguous": base,
        "batch-broadcast": base[:1].expand(2, 3, 17, 45),
        "head-broadcast": base[:, :1].expand(2, 3, 17, 45),
        "transposed": torch.randn(2, 3, 45, 17, device=DEVICE).transpose(2, 3),
        "offset-slice": torch.randn(2, 3, 17, 50, device=DEVICE)[..., 3:48],
    }
    for name, b in layouts.items():
        got = A._pitched_bias(b)
        assert torch.equal(got, b), name
        st = got.stride()
        assert st[3] == 1 and all(s % P == 0 for s in st[:3]) and got.storage_offset() % P == 0, (name, st)
        assert [s == 0 for s in st[:2]] == [s == 0 for s in b.stride()[:2]], name
    aligned = torch.randn(2, 3, 17, 2 * P, device=DEVICE)
    assert A._pitched_bias(aligned) is aligned
    for bcast in (base[:, :, :1].expand(2, 3, 17, 45), base[..., :1].expand(2, 3, 17, 45)):
        assert A._pitched_bias(bcast) is bcast           # broadcast rows / keys: loads are broadcast anyway


def test_transposed_and_sliced_bias_gradients():
    """A bias of any layout (here transposed keys/queries) gives the reference output and dbias."""
    B, H, Nq, Nk = 1, 2, 19, 23
    raw = torch.randn(B, H, Nk, Nq, device=DEVICE)
    check(B, H, Nq, Nk, 32, torch.float32, bias_shape=(B, H, Nq, Nk), bias_override=raw.transpose(2, 3))
