"""Tests of the native MAE masking kernels of vlfast._C (random_masking_rank_cpu,
random_masking_gather_cpu, unshuffle_tokens_cpu) against torch references."""
from __future__ import annotations

import pytest
import torch

from vlfast import _native

C = _native.load()
pytestmark = pytest.mark.skipif(C is None, reason=f"vlfast._C unavailable: {_native.error()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BS = [1, 3]
LS = [1, 49, 196, 197, 256]
DS = [1, 17, 64]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16, torch.float64: torch.int64}


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _keeps(L: int):
    return sorted({0, 1, L // 4, L})


def _code(dt: torch.dtype) -> int:
    return _native.DTYPE_CODES[dt]


def _assert_bits_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.is_floating_point():
        a, b = a.contiguous().view(_INT_VIEW[a.dtype]), b.contiguous().view(_INT_VIEW[b.dtype])
    assert torch.equal(a, b)


# ---------------------------------------------------------------- wrappers
def _mask_rank(keys: torch.Tensor, len_keep: int, mask_dtype=torch.float32):
    B, L = keys.shape
    assert keys.is_contiguous()
    ids_restore = torch.full((B, L), -7, dtype=torch.int64)
    ids_keep = torch.full((B, len_keep), -7, dtype=torch.int64)
    mask = torch.full((B, L), 5.0, dtype=mask_dtype)
    C.random_masking_rank_cpu(keys.data_ptr(), _code(keys.dtype), B, L, len_keep, ids_restore.data_ptr(),
                    ids_keep.data_ptr(), mask.data_ptr(), _code(mask_dtype))
    return ids_restore, ids_keep, mask


def _gather(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None, out=None):
    B, L, D = x.shape
    K = idx.shape[1]
    assert idx.dtype == torch.int64 and idx.is_contiguous()
    if out is None:
        out = torch.empty((B, K, D), dtype=x.dtype)
    ps = pos.stride() if pos is not None else (0, 0)
    C.random_masking_gather_cpu(x.data_ptr(), _code(x.dtype), B, L, D, *x.stride(), idx.data_ptr(), K,
                      0 if pos is None else pos.data_ptr(), ps[0], ps[1], out.data_ptr())
    return out


def _unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor | None = None,
               out=None):
    B, K, D = x.shape
    L = ids_restore.shape[1]
    if out is None:
        out = torch.empty((B, L, D), dtype=x.dtype)
    C.unshuffle_tokens_cpu(x.data_ptr(), _code(x.dtype), B, K, D, *x.stride(),
                         ids_restore.data_ptr(), L, 0 if fill is None else fill.data_ptr(),
                         0 if fill is None else fill.stride(0), out.data_ptr())
    return out


# ---------------------------------------------------------------- references
def _ref_rank(keys: torch.Tensor, len_keep: int, mask_dtype):
    ids_shuffle = torch.argsort(keys, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = (ids_restore >= len_keep).to(mask_dtype)
    return ids_restore, ids_keep, mask


def _make_keys(kind: str, B: int, L: int, dtype, gen):
    if kind == "rand":
        k = torch.rand(B, L, generator=gen, dtype=torch.float64)
    elif kind == "ties":
        k = torch.randint(0, 3, (B, L), generator=gen).double()
    else:  # ties + NaNs (both signs) + infs + signed zeros
        k = torch.randint(-2, 3, (B, L), generator=gen).double()
        r = torch.rand(B, L, generator=gen)
        k[r < 0.2] = float("nan")
        k[(r >= 0.2) & (r < 0.25)] = -float("nan")
        k[(r >= 0.25) & (r < 0.3)] = float("inf")
        k[(r >= 0.3) & (r < 0.35)] = -float("inf")
        k[(r >= 0.35) & (r < 0.4)] = -0.0
    return k.to(dtype).contiguous()


def _src(layout: str, B: int, L: int, D: int, dtype, gen):
    """(B, L, D) tensor with the given memory layout (values exact in every dtype)."""
    if layout == "contig":
        base = torch.randn(B, L, D, generator=gen, dtype=torch.float64).to(dtype)
        return base
    if layout == "transposed":  # strides (L*D, 1, L)
        base = torch.randn(B, D, L, generator=gen, dtype=torch.float64).to(dtype)
        return base.transpose(1, 2)
    if layout == "sliced":  # every other feature of a wider tensor, offset rows
        base = torch.randn(B, L + 1, 2 * D, generator=gen, dtype=torch.float64).to(dtype)
        return base[:, 1:, 1::2]
    if layout == "batch_major_T":  # (L, B, D) storage viewed as (B, L, D)
        base = torch.randn(L, B, D, generator=gen, dtype=torch.float64).to(dtype)
        return base.transpose(0, 1)
    raise AssertionError(layout)


LAYOUTS = ["contig", "transposed", "sliced", "batch_major_T"]


# ---------------------------------------------------------------- random_masking_rank
@pytest.mark.parametrize("kind", ["rand", "ties", "nan"])
@pytest.mark.parametrize("kdt", DTYPES, ids=_name)
@pytest.mark.parametrize("L", LS)
@pytest.mark.parametrize("B", BS)
def test_mask_rank_matches_torch(B, L, kdt, kind):
    gen = torch.Generator().manual_seed(1000 * B + L)
    keys = _make_keys(kind, B, L, kdt, gen)
    for i, len_keep in enumerate(_keeps(L)):
        mdt = DTYPES[i % len(DTYPES)]
        ids_restore, ids_keep, mask = _mask_rank(keys, len_keep, mdt)
        r_restore, r_keep, r_mask = _ref_rank(keys, len_keep, mdt)
        assert torch.equal(ids_restore, r_restore)
        assert torch.equal(ids_keep, r_keep)
        _assert_bits_equal(mask, r_mask)


@pytest.mark.parametrize("mdt", DTYPES, ids=_name)
def test_mask_rank_large_parallel(mdt):
    gen = torch.Generator().manual_seed(7)
    for kind in ("rand", "ties", "nan"):
        keys = _make_keys(kind, 64, 196, torch.float32, gen)
        got = _mask_rank(keys, 49, mdt)
        ref = _ref_rank(keys, 49, mdt)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        _assert_bits_equal(got[2], ref[2])


def test_mask_rank_nan_sorts_last():
    keys = torch.tensor([[float("nan"), 1.0, -float("nan"), float("inf"), 0.0, -0.0, -1.0]])
    ids_restore, ids_keep, mask = _mask_rank(keys, 3)
    # order: -1 (6), 0.0 (4), -0.0 (5), 1 (1), inf (3), nan (0), -nan (2)
    assert ids_keep.tolist() == [[6, 4, 5]]
    assert ids_restore.tolist() == [[5, 3, 6, 4, 1, 2, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0]]


def test_mask_rank_empty():
    for B, L in ((0, 5), (2, 0), (0, 0)):
        keys = torch.rand(B, L)
        ids_restore, ids_keep, mask = _mask_rank(keys, 0)
        assert ids_restore.shape == (B, L) and ids_keep.shape == (B, 0) and mask.shape == (B, L)


@pytest.mark.parametrize("len_keep", [-1, 11])
def test_mask_rank_bad_len_keep(len_keep):
    keys = torch.rand(2, 10)
    ids_restore = torch.full((2, 10), -7, dtype=torch.int64)
    ids_keep = torch.full((2, 11), -7, dtype=torch.int64)
    mask = torch.full((2, 10), 5.0)
    with pytest.raises(ValueError, match="len_keep"):
        C.random_masking_rank_cpu(keys.data_ptr(), 0, 2, 10, len_keep, ids_restore.data_ptr(),
                        ids_keep.data_ptr(), mask.data_ptr(), 0)
    assert (ids_restore == -7).all() and (ids_keep == -7).all() and (mask == 5.0).all()


def test_mask_rank_bad_dtype_codes():
    keys = torch.rand(2, 10)
    ids_restore = torch.empty((2, 10), dtype=torch.int64)
    ids_keep = torch.empty((2, 3), dtype=torch.int64)
    mask = torch.empty((2, 10))
    with pytest.raises(ValueError, match="dtype"):
        C.random_masking_rank_cpu(keys.data_ptr(), 4, 2, 10, 3, ids_restore.data_ptr(),
                        ids_keep.data_ptr(), mask.data_ptr(), 0)
    with pytest.raises(ValueError, match="dtype"):
        C.random_masking_rank_cpu(keys.data_ptr(), 0, 2, 10, 3, ids_restore.data_ptr(),
                        ids_keep.data_ptr(), mask.data_ptr(), -1)
    with pytest.raises(ValueError, match="null"):
        C.random_masking_rank_cpu(0, 0, 2, 10, 3, ids_restore.data_ptr(), ids_keep.data_ptr(),
                        mask.data_ptr(), 0)


# ---------------------------------------------------------------- random_masking_gather
def _ref_gather(x, idx, pos=None):
    D = x.shape[2]
    if pos is None:
        # on the integer view: torch.gather canonicalizes bfloat16 NaN payloads
        xi = x.view(_INT_VIEW[x.dtype])
        return torch.gather(xi, 1, idx[..., None].expand(-1, -1, D)).view(x.dtype)
    y = (x.double() + pos.double()).to(x.dtype)
    return torch.gather(y, 1, idx[..., None].expand(-1, -1, D))


@pytest.mark.parametrize("dt", DTYPES, ids=_name)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("L", LS)
@pytest.mark.parametrize("B", BS)
def test_gather_rows_matches_torch(B, L, D, dt):
    gen = torch.Generator().manual_seed(31 * L + D)
    keys = torch.rand(B, L, generator=gen)
    ids_shuffle = torch.argsort(keys, dim=1, stable=True)
    for li, layout in enumerate(LAYOUTS):
        x = _src(layout, B, L, D, dt, gen)
        # pos: contiguous (L, D) or a transposed (D, L) view (strided path)
        posb = torch.randn(L, D, generator=gen, dtype=torch.float64).to(dt)
        pos = posb if li % 2 == 0 else posb.t().contiguous().t()
        for len_keep in _keeps(L):
            idx = ids_shuffle[:, :len_keep].contiguous()
            _assert_bits_equal(_gather(x, idx), _ref_gather(x, idx))
            got = _gather(x, idx, pos)
            ref = _ref_gather(x, idx, pos)
            # computed in fp32 (fp64 for float64) and rounded once; for these
            # formats that equals the correctly rounded sum (24 >= 2*11+2 bits),
            # so the result is exact, well within the allowed 1 ulp for float32.
            _assert_bits_equal(got, ref)
            # and equal to torch's own eager add in the dtype
            _assert_bits_equal(got, torch.gather(x + pos, 1, idx[..., None].expand(-1, -1, D)))


@pytest.mark.parametrize("dt", DTYPES, ids=_name)
def test_gather_rows_large_and_duplicates(dt):
    gen = torch.Generator().manual_seed(3)
    B, L, D = 8, 197, 96
    x = _src("sliced", B, L, D, dt, gen)
    pos = torch.randn(L, D, generator=gen, dtype=torch.float64).to(dt)
    idx = torch.randint(0, L, (B, 300), generator=gen)  # repeats, K > L
    _assert_bits_equal(_gather(x, idx), _ref_gather(x, idx))
    _assert_bits_equal(_gather(x, idx, pos), _ref_gather(x, idx, pos))
    # pos broadcast across features (stride 0) and rows (stride 0)
    pos0 = torch.randn(1, 1, generator=gen, dtype=torch.float64).to(dt).expand(L, D)
    _assert_bits_equal(_gather(x, idx, pos0), _ref_gather(x, idx, pos0))


def test_gather_rows_special_values():
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 65504.0, 1e-7,
                         3.0e38, -3.0e38, 1.0], dtype=torch.float64)
    for dt in DTYPES:
        x = vals.to(dt).reshape(1, 10, 1).expand(1, 10, 4).contiguous()
        pos = vals.flip(0).to(dt).reshape(10, 1).expand(10, 4).contiguous()
        idx = torch.arange(10).flip(0).reshape(1, 10).contiguous()
        got = _gather(x, idx, pos)
        ref = _ref_gather(x, idx, pos)
        assert torch.equal(got.isnan(), ref.isnan())
        keep = ~ref.isnan()
        _assert_bits_equal(got[keep], ref[keep])
        _assert_bits_equal(_gather(x, idx), _ref_gather(x, idx))  # NaN payloads copied as bits


@pytest.mark.parametrize("bad", [-1, 10, 1 << 40])
def test_gather_rows_out_of_range(bad):
    x = torch.randn(2, 10, 4)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    idx[1, 2] = bad
    out = torch.full((2, 3, 4), 7.0)
    with pytest.raises((IndexError, ValueError), match="out of range"):
        _gather(x, idx, out=out)
    with pytest.raises((IndexError, ValueError)):
        _gather(x, idx, torch.randn(10, 4), out=out)
    assert (out == 7.0).all()  # nothing written


def test_gather_rows_bad_args():
    x = torch.randn(2, 10, 4)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    out = torch.empty(2, 3, 4)
    with pytest.raises(ValueError, match="dtype"):
        C.random_masking_gather_cpu(x.data_ptr(), 9, 2, 10, 4, 40, 4, 1, idx.data_ptr(), 3, 0, 0, 0,
                          out.data_ptr())
    with pytest.raises(ValueError, match="s_l"):
        C.random_masking_gather_cpu(x.data_ptr(), 0, 2, 10, 4, 40, -4, 1, idx.data_ptr(), 3, 0, 0, 0,
                          out.data_ptr())
    with pytest.raises(ValueError, match="null"):
        C.random_masking_gather_cpu(x.data_ptr(), 0, 2, 10, 4, 40, 4, 1, 0, 3, 0, 0, 0, out.data_ptr())
    # L == 0 with K > 0: every index is out of range
    with pytest.raises((IndexError, ValueError)):
        C.random_masking_gather_cpu(x.data_ptr(), 0, 2, 0, 4, 40, 4, 1, idx.data_ptr(), 3, 0, 0, 0,
                          out.data_ptr())
    # empty outputs are fine (K == 0, D == 0)
    _gather(x, torch.zeros(2, 0, dtype=torch.int64))
    _gather(torch.randn(2, 10, 0), idx)


# ---------------------------------------------------------------- unshuffle_tokens
def _ref_unshuffle(x, ids_restore, fill):
    B, K, D = x.shape
    L = ids_restore.shape[1]
    f = torch.zeros(D, dtype=x.dtype) if fill is None else fill
    full = torch.cat([x, f.reshape(1, 1, D).expand(B, L - K, D)], dim=1)
    return torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, D))


@pytest.mark.parametrize("dt", DTYPES, ids=_name)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("L", LS)
@pytest.mark.parametrize("B", BS)
def test_unshuffle_rows_matches_torch(B, L, D, dt):
    gen = torch.Generator().manual_seed(17 * L + D)
    keys = _make_keys("ties", B, L, torch.float32, gen)
    r_restore, _, _ = _ref_rank(keys, 0, torch.float32)
    for li, len_keep in enumerate(_keeps(L)):
        x = _src(LAYOUTS[li % len(LAYOUTS)], B, len_keep, D, dt, gen)
        fillb = torch.randn(2 * D, generator=gen, dtype=torch.float64).to(dt)
        for fill in (None, fillb[:D], fillb[::2]):  # absent, contiguous, strided
            _assert_bits_equal(_unshuffle(x, r_restore, fill), _ref_unshuffle(x, r_restore, fill))


@pytest.mark.parametrize("dt", DTYPES, ids=_name)
def test_mae_roundtrip_and_backward(dt):
    """random_masking_rank -> random_masking_gather (+pos) -> unshuffle_tokens reproduces MAE, and
    unshuffle_tokens with zero fill is the backward of random_masking_gather."""
    gen = torch.Generator().manual_seed(11)
    B, L, D = 4, 196, 64
    len_keep = int(L * 0.25)
    x = _src("transposed", B, L, D, dt, gen)
    pos = torch.randn(L, D, generator=gen, dtype=torch.float64).to(dt)
    keys = torch.rand(B, L, generator=gen)
    ids_restore, ids_keep, mask = _mask_rank(keys, len_keep, dt)
    r_restore, r_keep, r_mask = _ref_rank(keys, len_keep, dt)
    assert torch.equal(ids_restore, r_restore) and torch.equal(ids_keep, r_keep)
    _assert_bits_equal(mask, r_mask)

    kept = _gather(x, ids_keep, pos)
    _assert_bits_equal(kept, torch.gather(x + pos, 1, r_keep[..., None].expand(-1, -1, D)))

    token = torch.randn(D, generator=gen, dtype=torch.float64).to(dt)
    dec = _unshuffle(kept, ids_restore, token)
    ref = torch.cat([kept, token.reshape(1, 1, D).expand(B, L - len_keep, D)], 1)
    ref = torch.gather(ref, 1, r_restore[..., None].expand(-1, -1, D))
    _assert_bits_equal(dec, ref)

    # backward of gather: scatter the output grad to the kept rows, zeros elsewhere
    xg = x.detach().clone().requires_grad_(True)
    g = torch.randn(B, len_keep, D, generator=gen, dtype=torch.float64).to(dt)
    torch.gather(xg, 1, ids_keep[..., None].expand(-1, -1, D)).backward(g)
    _assert_bits_equal(_unshuffle(g, ids_restore), xg.grad)


@pytest.mark.parametrize("bad", [-1, 12])
def test_unshuffle_rows_out_of_range(bad):
    x = torch.randn(2, 3, 4)
    ids_restore = torch.arange(12).repeat(2, 1)
    ids_restore[0, 5] = bad
    out = torch.full((2, 12, 4), 7.0)
    with pytest.raises((IndexError, ValueError), match="out of range"):
        _unshuffle(x, ids_restore, out=out)
    assert (out == 7.0).all()  # nothing written
    with pytest.raises(ValueError, match="dtype"):
        C.unshuffle_tokens_cpu(x.data_ptr(), 5, 2, 3, 4, 12, 4, 1, ids_restore.data_ptr(), 12, 0,
                             0, out.data_ptr())
