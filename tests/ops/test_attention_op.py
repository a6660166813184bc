"""vlfast.ops.attention against a float64 reference, on every backend.

Rule (FlashAttention's tests): in fp16/bf16 the backend's error against float64
must be at most 2x the error of eager PyTorch math in the same dtype (3x for
gradients); in fp32 the relative error must be under 1e-3.
"""

import pytest
import torch

import vlfast
from vlfast.ops import attention
from vlfast.reference import attention_reference
from vlfast.testing import FORWARD_FACTOR, GRAD_FACTOR, assert_within_eager_error, cases_for, max_abs_error

CASES = cases_for("attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, H, Nq, Nk, D, dtype, device, layout="bhnd"):
    def one(N):
        if layout == "bnhd":  # the usual (B, N, H, D) projection output, transposed: non-contiguous
            return torch.randn(B, N, H, D, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, H, N, D, device=device).to(dtype)
    return one(Nq), one(Nk), one(Nk)


def _run(fn, q, k, v, bias, do):
    """Output and gradients (q, k, v[, bias]) of fn on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(*leaves, b)
    grads = torch.autograd.grad(out, leaves + ([b] if b is not None else []), do.to(out.dtype))
    return out, grads


def _compare(fused, eager, ref, dtype, what):
    if dtype == torch.float32:
        ref_scale = max(ref.abs().max().item(), 1.0)  # gradients can be exactly 0 (e.g. dq with one key)
        err_f = max_abs_error(fused, ref)
        assert err_f / ref_scale < 1e-3, f"{what}: relative error {err_f / ref_scale:.3g}"
        return
    # the floor is EAGER_ERROR_FLOOR[dtype] (of q's dtype, also for an fp32 dbias) * max(|ref|, 1)
    assert_within_eager_error(fused, eager, ref, FORWARD_FACTOR if what == "out" else GRAD_FACTOR, dtype=dtype,
                              what=what)


def _check_against_reference(backend, q, k, v, dtype, **kw):
    bias = kw.pop("attn_bias", None)
    do = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], device=q.device)

    def fused(q, k, v, b):
        return attention(q, k, v, attn_bias=b, backend=backend, **kw)

    def eager(q, k, v, b):
        return attention_reference(q, k, v, attn_bias=b, **kw)

    def ref64(q, k, v, b):
        return attention_reference(q.double(), k.double(), v.double(),
                                   attn_bias=None if b is None else b.double(), **kw)

    fo, fg = _run(fused, q, k, v, bias, do)
    eo, eg = _run(eager, q, k, v, bias, do)
    ro, rg = _run(ref64, q, k, v, bias, do)
    assert fo.dtype == q.dtype and fo.shape == ro.shape
    assert torch.isfinite(fo).all() and all(torch.isfinite(g).all() for g in fg)
    _compare(fo, eo, ro, dtype, "out")
    for name, f, e, r in zip(("dq", "dk", "dv", "dbias"), fg, eg, rg):
        assert f.shape == r.shape and f.dtype == (bias.dtype if name == "dbias" else q.dtype)
        _compare(f, e, r, dtype, name)
    return fo, fg


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Nq,Nk,D", [(1, 1, 32), (17, 17, 64), (197, 197, 64), (17, 45, 80), (33, 20, 72),
                                     (24, 24, 40), (12, 12, 96), (8, 8, 128), (9, 9, 256)])
def test_matches_reference(device, backend, dtype, Nq, Nk, D):
    q, k, v = _qkv(2, 2, Nq, Nk, D, dtype, device)
    _check_against_reference(backend, q, k, v, dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("N", [257, 577, 1023])
def test_long_odd_lengths_fp32(device, backend, N):
    q, k, v = _qkv(1, 1, N, N, 32, torch.float32, device)
    _check_against_reference(backend, q, k, v, torch.float32)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_mask_with_fully_padded_row(device, backend, dtype):
    B, H, Nq, Nk, D = 3, 2, 19, 23, 64
    q, k, v = _qkv(B, H, Nq, Nk, D, dtype, device, layout="bnhd")
    kpm = torch.rand(B, Nk, device=device) < 0.3
    kpm[1] = True  # every key of sample 1 is padding
    kpm[2] = False
    out, grads = _check_against_reference(backend, q, k, v, dtype, key_padding_mask=kpm)
    assert torch.all(out[1] == 0)
    assert torch.all(grads[0][1] == 0) and torch.all(grads[1][1] == 0) and torch.all(grads[2][1] == 0)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("bias_shape", [(1, 2, 17, 29), (3, 1, 1, 29), (3, 2, 17, 29), (17, 29), (29,)])
def test_bias_with_gradient(device, backend, bias_shape):
    q, k, v = _qkv(3, 2, 17, 29, 40, torch.float32, device)
    bias = torch.randn(bias_shape, device=device)
    _check_against_reference(backend, q, k, v, torch.float32, attn_bias=bias)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("Nq,Nk", [(21, 21), (7, 30), (1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_causal(device, backend, Nq, Nk, dtype):
    q, k, v = _qkv(2, 2, Nq, Nk, 64, dtype, device)
    bias = torch.randn(1, 2, Nq, Nk, device=device)
    kpm = torch.zeros(2, Nk, dtype=torch.bool, device=device)
    kpm[0, -3:] = True
    _check_against_reference(backend, q, k, v, dtype, causal=True, attn_bias=bias, key_padding_mask=kpm)


@pytest.mark.parametrize("device,backend", CASES)
def test_bf16_bias_and_masks_together(device, backend):
    q, k, v = _qkv(2, 3, 33, 33, 80, torch.bfloat16, device)
    kpm = torch.rand(2, 33, device=device) < 0.2
    bias = torch.randn(3, 33, 33, device=device)
    _check_against_reference(backend, q, k, v, torch.bfloat16, key_padding_mask=kpm, attn_bias=bias)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] == "triton"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_backward_uses_forward_mask(device, backend, p):
    from vlfast.kernels.attention import dropout_mask

    B, H, Nq, Nk, D = 2, 2, 19, 27, 32
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device)
    kpm = torch.zeros(B, Nk, dtype=torch.bool, device=device)
    kpm[1, :5] = True
    seed = 1234
    mask = dropout_mask(B, H, Nq, Nk, dropout_p=p, seed=seed, offset=0, device=device)
    assert mask.shape == (B, H, Nq, Nk) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - (1 - p)) < 0.05
    assert torch.equal(mask, dropout_mask(B, H, Nq, Nk, dropout_p=p, seed=seed, offset=0, device=device))
    assert not torch.equal(mask, dropout_mask(B, H, Nq, Nk, dropout_p=p, seed=seed + 1, offset=0, device=device))
    do = torch.randn(B, H, Nq, D, device=device)

    def fused(q, k, v, b):
        return attention(q, k, v, key_padding_mask=kpm, dropout_p=p, dropout_seed=seed, backend=backend)

    def ref(q, k, v, b):
        return attention_reference(q.double(), k.double(), v.double(), key_padding_mask=kpm,
                                   dropout_mask=mask, dropout_p=p)

    fo, fg = _run(fused, q, k, v, None, do)
    ro, rg = _run(ref, q, k, v, None, do)
    torch.testing.assert_close(fo.double(), ro, rtol=1e-4, atol=1e-5)
    for f, r in zip(fg, rg):
        torch.testing.assert_close(f.double(), r.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] == "triton"])
def test_dropout_mask_shared_by_differently_tiled_kernels(device, backend):
    # the forward and both backward kernels on different key tiles (BLOCK_N 32 / 64 / 16) and the
    # mask kernel on its own: one mask (its counters depend on (row, key) only), replayed in float64
    from vlfast.kernels._common import override_tiles
    from vlfast.kernels.attention import dropout_mask

    B, H, Nq, Nk, D, p, seed = 2, 3, 21, 45, 40, 0.25, 987654321
    q, k, v = _qkv(B, H, Nq, Nk, D, torch.float32, device, layout="bnhd")
    mask = dropout_mask(B, H, Nq, Nk, dropout_p=p, seed=seed, offset=0, device=device)
    do = torch.randn(B, H, Nq, D, device=device)

    def fused(q, k, v, b):
        return attention(q, k, v, dropout_p=p, dropout_seed=seed, causal=True, backend=backend)

    def ref(q, k, v, b):
        return attention_reference(q.double(), k.double(), v.double(), dropout_mask=mask, dropout_p=p, causal=True)

    with override_tiles("attention", fwd=dict(BLOCK_M=16, BLOCK_N=32), bwd_kv=dict(BLOCK_M=32, BLOCK_N=64),
                        bwd_q=dict(BLOCK_M=32, BLOCK_N=16)):
        fo, fg = _run(fused, q, k, v, None, do)
    ro, rg = _run(ref, q, k, v, None, do)
    torch.testing.assert_close(fo.double(), ro, rtol=1e-4, atol=1e-5)
    for f, r in zip(fg, rg):
        torch.testing.assert_close(f.double(), r.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_dropout_seeded_and_active(device, backend):
    q, k, v = _qkv(1, 2, 16, 16, 32, torch.float32, device)
    base = attention(q, k, v, backend=backend)
    torch.manual_seed(3)
    a = attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b) and not torch.allclose(a, base)


@pytest.mark.parametrize("device,backend", CASES)
def test_deterministic_bias_grad(device, backend):
    q, k, v = _qkv(3, 2, 17, 17, 32, torch.float32, device)
    bias = torch.randn(1, 2, 17, 17, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        out = attention(q, k, v, attn_bias=bias, deterministic=True, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), bias)[0])
    assert torch.equal(grads[0], grads[1])


def test_backend_rules():
    rows = {op: (chosen, avail) for op, chosen, avail in vlfast.backend_report("cpu")}
    chosen, avail = rows["attention"]
    assert set(avail) == {"triton", "torch", "xformers"}
    with pytest.raises(RuntimeError, match="no 'native' implementation"):
        attention(*_qkv(1, 1, 4, 4, 8, torch.float32, "cpu"), backend="native")


def test_compile_fullgraph():
    q, k, v = _qkv(2, 2, 9, 11, 16, torch.float32, "cpu")
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[0, :3] = True
    backends = [c.values[1] for c in CASES if c.values[0] == "cpu" and not c.marks and c.values[1] != "xformers"]
    for backend in backends:
        def f(q, k, v):
            return attention(q, k, v, key_padding_mask=kpm, backend=backend).square().sum()

        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        eager = torch.autograd.grad(f(*leaves), leaves)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(*leaves), leaves)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call,exc,match", [
    (lambda q: attention(q[0], q, q), ValueError, r"q must have shape \(B, H, N, D\)"),
    (lambda q: attention(q.long(), q, q), TypeError, "q must be float32"),
    (lambda q: attention(q, q.double(), q), TypeError, "k must be float32"),
    (lambda q: attention(q, q.half(), q.half()), TypeError, "one dtype"),
    (lambda q: attention(q, q[:, :1], q[:, :1]), ValueError, "k must have shape"),
    (lambda q: attention(q, q, q[..., :4]), ValueError, "k and v must have the same shape"),
    (lambda q: attention(*(torch.randn(1, 1, 2, 257),) * 3), ValueError, r"head dim D must be in \[1, 256\]"),
    (lambda q: attention(q, q, q, key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool"),
    (lambda q: attention(q, q, q, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(B, Nk\)"),
    (lambda q: attention(q, q, q, attn_bias=torch.zeros(3, 5)), ValueError, "does not broadcast"),
    (lambda q: attention(q, q, q, attn_bias=torch.zeros(5, dtype=torch.long)), TypeError, "attn_bias must be"),
    (lambda q: attention(q, q, q, dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (lambda q: attention(q, q, q, dropout_p=-0.1), ValueError, "dropout_p"),
    (lambda q: attention(q, q, q, scale=0.0), ValueError, "scale must be a positive"),
    (lambda q: attention(q, q, q, causal=1), TypeError, "causal must be a bool"),
    (lambda q: attention(q, q, q.to("meta")), ValueError, "one device"),
    (lambda q: attention(q, q, q, backend="cuda"), ValueError, "must be one of"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 3, 5, 8))
