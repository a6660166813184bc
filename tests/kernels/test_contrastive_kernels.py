"""Tiled contrastive kernels (vlfast.kernels.contrastive) against float64 references that
materialize the (small) logits.

Without CUDA the kernels run in the Triton CPU interpreter (conftest sets TRITON_INTERPRET=1
before the kernel module is imported), at small sizes.  Accuracy rule: fp32 error / max|ref|
< 1e-4 (forward) / 2e-4 (gradients); fp16/bf16 error vs the fp64 reference <= 2x (forward) /
3x (gradients) the error of eager PyTorch math in the same dtype, plus a small atol.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vlfast.kernels.contrastive as C  # noqa: E402  (a core module: a broken import fails, never skips)
from vlfast.kernels._common import override_tiles  # noqa: E402
from vlfast.testing import assert_within_eager_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.float16, torch.bfloat16)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close(name, got, ref64, eager, dtype, factor, rtol=1e-4):
    got = torch.as_tensor(got)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = _err(got, ref64)
    mag = max(ref64.abs().max().item() if ref64.numel() else 0.0, 1e-2)
    if dtype == torch.float32:
        assert err / mag < rtol, f"{name}: relative error {err / mag:.3g}"
    else:
        assert_within_eager_error(got, eager, ref64, factor, atol=1e-4 * mag, what=name)


def _feats(n, d, dtype, unit=False):
    x = torch.randn(n, d, device=DEVICE)
    if unit:
        x = x / x.norm(dim=1, keepdim=True)
    return x.to(dtype)


# ----------------------------------------------------------------------------- InfoNCE lse
def _lse_ref(q, k, scale, sq, sk, soft_scale, g_lse, g_soft, dtype):
    """(lse, soft_dot, soft_lse, dq, dk, dscale) computed in ``dtype`` (float64 for the reference)."""
    qd = q.to(dtype).requires_grad_()
    kd = k.to(dtype).requires_grad_()
    sc = torch.tensor(scale, dtype=dtype, device=q.device, requires_grad=True)
    s = sc * (qd @ kd.T)
    lse = torch.logsumexp(s, 1)
    loss = (g_lse.to(dtype) * lse).sum()
    sdot = slse = None
    if sq is not None:
        sh = soft_scale * (sq.to(dtype) @ sk.to(dtype).T)
        t = torch.softmax(sh, 1).detach()
        slse = torch.logsumexp(sh, 1)
        sdot = (t * s).sum(1)
        if g_soft is not None:
            loss = loss + (g_soft.to(dtype) * sdot).sum()
    loss.backward()
    return lse, sdot, slse, qd.grad, kd.grad, sc.grad


def check_lse(Nq, Nk, D, dtype, *, DS=None, scale=None, soft_scale=2.0, unit=False, g_soft=True,
              g_lse=True, q_stride=None):
    q = _feats(Nq, D, dtype, unit)
    k = _feats(Nk, D, dtype, unit)
    if q_stride is not None:    # rows further apart than D
        big = torch.zeros(Nq, q_stride, device=DEVICE, dtype=dtype)
        big[:, 3:3 + D] = q
        q = big[:, 3:3 + D]
    scale = D ** -0.5 if scale is None else scale
    sq = sk = None
    if DS is not None:
        sq, sk = _feats(Nq, DS, dtype, True), _feats(Nk, DS, dtype, True)
    gl = torch.randn(Nq, device=DEVICE) if g_lse else torch.zeros(Nq, device=DEVICE)
    gs = torch.randn(Nq, device=DEVICE) if (g_soft and DS is not None) else None

    lse, sdot, slse = C.contrastive_loss_lse_forward(q, k, scale, sq, sk, soft_scale)
    dq, dk, dscale = C.contrastive_loss_lse_backward(q, k, scale, lse, gl if g_lse else None, sq, sk, soft_scale,
                                         slse, gs)
    assert lse.dtype == torch.float32 and lse.shape == (Nq,)
    assert dq.dtype == dtype and dk.dtype == dtype and dq.shape == q.shape and dk.shape == k.shape
    assert dscale.dim() == 0 and dscale.dtype == torch.float32

    ref = _lse_ref(q, k, scale, sq, sk, soft_scale, gl, gs, torch.float64)
    eager = _lse_ref(q, k, scale, sq, sk, soft_scale, gl, gs, dtype) if dtype in LOW else [None] * 6
    _assert_close("lse", lse, ref[0], eager[0], dtype, 2)
    if DS is None:
        assert sdot is None and slse is None
    else:
        _assert_close("soft_dot", sdot, ref[1], eager[1], dtype, 2)
        _assert_close("soft_lse", slse, ref[2], eager[2], dtype, 2)
    for name, got, r, e in zip(("dq", "dk", "dscale"), (dq, dk, dscale), ref[3:], eager[3:]):
        _assert_close(name, got, r, e, dtype, 3, rtol=2e-4)
    return lse, dq, dk, dscale


@pytest.mark.parametrize("Nq,Nk,D", [(1, 1, 8), (7, 13, 64), (33, 17, 257),
                                     pytest.param(100, 1000, 64, marks=pytest.mark.slow, id="100-1000-64")])
def test_lse_soft_fp32(Nq, Nk, D):
    check_lse(Nq, Nk, D, torch.float32, DS=24)


@pytest.mark.parametrize("Nq,Nk,D", [(1, 1, 8), (33, 17, 257)])
def test_lse_hard_only_fp32(Nq, Nk, D):
    check_lse(Nq, Nk, D, torch.float32)


def test_lse_soft_without_soft_grad():
    check_lse(20, 9, 40, torch.float32, DS=70, g_soft=False)


def test_lse_soft_only_grad():
    check_lse(20, 9, 40, torch.float32, DS=70, g_lse=False)


@pytest.mark.slow  # ~6 s in the Triton interpreter
def test_lse_d768():
    check_lse(9, 21, 768, torch.float32, DS=257)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("Nq,Nk,D", [(7, 13, 64), pytest.param(33, 17, 257, marks=pytest.mark.slow, id="33-17-257")])
def test_lse_soft_low_precision(Nq, Nk, D, dtype):
    check_lse(Nq, Nk, D, dtype, DS=48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lse_scale_100(dtype):
    """Logit scale 100 on unit vectors: |s| up to 100, exp(s) would overflow fp32."""
    lse, dq, dk, dscale = check_lse(40, 50, 64, dtype, DS=32, scale=100.0, soft_scale=50.0, unit=True)
    assert torch.isfinite(lse).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_lse_row_stride():
    check_lse(19, 23, 40, torch.float32, DS=16, q_stride=100)


def test_lse_block_override_and_chunks():
    """Non-default tiles: several output-feature chunks per block in the backward (dscale partials
    come from chunk 0 only), rectangular tiles, BLOCK_D smaller than D."""
    with override_tiles("contrastive", fwd=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16),
                        bwd=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=16, BLOCK_DO=16)):
        check_lse(45, 37, 70, torch.float32, DS=33)
    with override_tiles("contrastive", fwd=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=64),
                        bwd=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=64, BLOCK_DO=32)):
        check_lse(45, 37, 70, torch.float32, DS=33)


def test_lse_backward_deterministic():
    q, k = _feats(30, 48, torch.float32), _feats(41, 48, torch.float32)
    sq, sk = _feats(30, 20, torch.float32), _feats(41, 20, torch.float32)
    lse, _, slse = C.contrastive_loss_lse_forward(q, k, 0.5, sq, sk, 3.0)
    gl, gs = torch.randn(30, device=DEVICE), torch.randn(30, device=DEVICE)
    a = C.contrastive_loss_lse_backward(q, k, 0.5, lse, gl, sq, sk, 3.0, slse, gs)
    b = C.contrastive_loss_lse_backward(q, k, 0.5, lse, gl, sq, sk, 3.0, slse, gs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_lse_empty():
    q, k = _feats(0, 8, torch.float32), _feats(5, 8, torch.float32)
    lse, _, _ = C.contrastive_loss_lse_forward(q, k, 1.0)
    assert lse.shape == (0,)
    lse, sdot, slse = C.contrastive_loss_lse_forward(k, q, 1.0, k, q)
    assert torch.isinf(lse).all() and (sdot == 0).all()


# ----------------------------------------------------------------------------- SigLIP
def _siglip_ref(x, y, scale, bias, g, pos_offset, dtype):
    xd = x.to(dtype).requires_grad_()
    yd = y.to(dtype).requires_grad_()
    sc = torch.tensor(scale, dtype=dtype, device=x.device, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, device=x.device, requires_grad=True)
    u = sc * (xd @ yd.T) + b
    i = torch.arange(x.shape[0], device=x.device)[:, None]
    j = torch.arange(y.shape[0], device=x.device)[None, :]
    z = torch.where(j == i + pos_offset, 1.0, -1.0).to(dtype)
    r = torch.nn.functional.softplus(-z * u).sum(1)
    (g.to(dtype) * r).sum().backward()
    return r, xd.grad, yd.grad, sc.grad, b.grad


def check_siglip(Nx, Ny, D, dtype, pos_offset, scale=10.0, bias=-10.0):
    x, y = _feats(Nx, D, dtype, True), _feats(Ny, D, dtype, True)
    g = torch.randn(Nx, device=DEVICE)
    r = C.siglip_rows_forward(x, y, scale, bias, pos_offset)
    dx, dy, dscale, dbias = C.siglip_rows_backward(x, y, scale, bias, g, pos_offset)
    assert r.dtype == torch.float32 and r.shape == (Nx,)
    assert dx.dtype == dtype and dy.dtype == dtype and dscale.dim() == 0 and dbias.dim() == 0
    ref = _siglip_ref(x, y, scale, bias, g, pos_offset, torch.float64)
    eager = _siglip_ref(x, y, scale, bias, g, pos_offset, dtype) if dtype in LOW else [None] * 5
    _assert_close("r", r, ref[0], eager[0], dtype, 2)
    for name, got, rf, e in zip(("dx", "dy", "dscale", "dbias"), (dx, dy, dscale, dbias), ref[1:], eager[1:]):
        _assert_close(name, got, rf, e, dtype, 3, rtol=2e-4)


@pytest.mark.parametrize("pos_offset", [0, 5, -3])
@pytest.mark.parametrize("D", [64, 257])
def test_siglip_fp32(D, pos_offset):
    check_siglip(7, 20, D, torch.float32, pos_offset)


def test_siglip_larger():
    check_siglip(50, 70, 96, torch.float32, 10)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_siglip_low_precision(dtype):
    check_siglip(7, 20, 64, dtype, 5)
    check_siglip(33, 17, 257, dtype, 0)


def test_siglip_tiny_terms_relative_precision():
    """Negative pairs with u ~ -20 contribute ~2e-9 each: their sum must keep its digits."""
    x = _feats(5, 16, torch.float32, True)
    r = C.siglip_rows_forward(x, -x, 1.0, -20.0, pos_offset=100)   # no positives at all
    ref = _siglip_ref(x, -x, 1.0, -20.0, torch.ones(5, device=DEVICE), 100, torch.float64)[0]
    assert ((r.double() - ref).abs() / ref).max() < 1e-5
