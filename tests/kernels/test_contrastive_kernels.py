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
    """Non-default tiles: rectangular score / G tiles, BLOCK_D smaller than D, several key splits."""
    with override_tiles("contrastive", fwd=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16),
                        bwd=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=16)):
        check_lse(45, 37, 70, torch.float32, DS=33)
    with override_tiles("contrastive", fwd=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=64),
                        bwd=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=64)):
        check_lse(45, 37, 70, torch.float32, DS=33)


def _spy(monkeypatch, name):
    """Record what ``C.<name>`` returns (the plan the launchers used)."""
    seen = []
    real = getattr(C, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(C, name, wrapper)
    return seen


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lse_key_splits(monkeypatch, splits, dtype):
    """The forward split over keys (partials merged by _lse_combine_kernel) at forced split counts:
    the same statistics as the float64 reference, soft targets included."""
    seen = _spy(monkeypatch, "plan_key_splits")
    q, k = _feats(21, 40, dtype), _feats(113, 40, dtype)
    sq, sk = _feats(21, 24, dtype, True), _feats(113, 24, dtype, True)
    lse, sdot, slse = C.contrastive_loss_lse_forward(q, k, 0.7, sq, sk, 3.0, key_splits=splits)
    assert seen[-1][0] == splits                     # 113 keys are 8 blocks of 16: every count is taken
    ref = _lse_ref(q, k, 0.7, sq, sk, 3.0, torch.ones(21), None, torch.float64)
    eager = _lse_ref(q, k, 0.7, sq, sk, 3.0, torch.ones(21), None, dtype) if dtype in LOW else [None] * 3
    for name, got, r, e in zip(("lse", "soft_dot", "soft_lse"), (lse, sdot, slse), ref[:3], eager[:3]):
        _assert_close(name, got, r, e, dtype, 2)


def test_key_splits_exclude_diagonal_empty_split():
    """NT-Xent with splits of one key block: row 16's second split holds only key 16, which it
    excludes (m = -inf, l = 0 in that partial); a 1-key problem leaves lse = -inf."""
    q = _feats(17, 24, torch.float32)
    with override_tiles("contrastive", fwd=dict(BLOCK_N=16)):
        lse, sdot, slse = C.contrastive_loss_lse_forward(q, q, 0.5, q, q, 2.0, exclude_diagonal=True,
                                                         key_splits=2)
        one, _, _ = C.contrastive_loss_lse_forward(q[:1], q[:1], 0.5, exclude_diagonal=True, key_splits=2)
    s = 0.5 * (q.double() @ q.double().T)
    s.fill_diagonal_(float("-inf"))
    sh = 2.0 * (q.double() @ q.double().T)
    sh.fill_diagonal_(float("-inf"))
    t = torch.softmax(sh, 1)
    assert torch.allclose(lse.double(), torch.logsumexp(s, 1), atol=1e-5)
    assert torch.allclose(slse.double(), torch.logsumexp(sh, 1), atol=1e-5)
    assert torch.allclose(sdot.double(), (t * s.nan_to_num(neginf=0.0)).sum(1), atol=1e-5)
    assert torch.isneginf(one).all()


def test_key_splits_rule():
    """Automatic splits: none when the query blocks fill two waves of SMs, else up to two waves,
    at most MAX_SPLITS, each split at least MIN_SPLIT_BLOCKS key blocks; never an empty split."""
    cpu = torch.device("cpu")
    waves = 2 * C.H200_SMS
    assert C.plan_key_splits(waves, 10 ** 6, 64, cpu)[0] == 1
    S, length = C.plan_key_splits(32, 32768, 64, cpu)      # one rank's Nq = 4096 at BLOCK_M = 128
    assert S == min(-(-waves // 32), C.MAX_SPLITS) and length % 64 == 0 and (S - 1) * length < 32768 <= S * length
    assert C.plan_key_splits(1, 64 * C.MIN_SPLIT_BLOCKS * 3, 64, cpu)[0] == 3
    assert C.plan_key_splits(1, 100, 64, cpu)[0] == 1
    for n_kb in range(1, 40):
        for forced in (1, 2, 5, 64):
            S, length = C.plan_key_splits(1, n_kb * 16 - 3, 16, cpu, forced)
            assert S <= forced and (S - 1) * length < n_kb * 16 - 3 <= S * length
    with pytest.raises(ValueError, match="key_splits"):
        C.plan_key_splits(1, 100, 16, cpu, 0)


def test_grad_plan_passes():
    """The backward's score passes: one when the whole G fits the workspace, else two (key chunks
    for dk, query chunks for dq), every tile of G exactly once per pass."""
    assert C.grad_plan(100, 300, 2, 16, 32, 100 * 300 * 2) == [(0, 100, 0, 300, "both")]
    plan = C.grad_plan(100, 300, 2, 16, 32, 100 * 300 * 2 - 1)
    for role, total, span in (("dk", 300, lambda r: (r[2], r[3])), ("dq", 100, lambda r: (r[0], r[1]))):
        rects = [r for r in plan if r[4] == role]
        assert len(rects) > 1
        starts = [span(r)[0] for r in rects]
        assert starts == sorted(starts) and sum(span(r)[1] for r in rects) == total
        full = [(r[1], r[3]) for r in rects]
        assert all(m == 100 for m, _ in full) if role == "dk" else all(n == 300 for _, n in full)
        assert all(m * n * 2 <= 100 * 300 * 2 - 1 for m, n in full)          # within the workspace
    # the score FLOPs this plans at N = 32k, D = 768, bf16, the default workspace: 4 passes vs the 3 minimum
    N, D = 32768, 768
    plan = C.grad_plan(N, N, 2, 128, 128, C.WORKSPACE_BYTES)
    score = sum(2 * mq * mk * D for _, mq, _, mk, _ in plan)
    issued = score + 2 * (2 * N * N * D)                 # + the dq and dk GEMMs
    assert issued / (3 * 2 * N * N * D) <= 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lse_backward_workspace_chunks(monkeypatch, dtype):
    """A workspace smaller than G: the two-pass plan (several key and query chunks) gives the same
    gradients as the float64 reference, with soft targets and exclude_diagonal."""
    seen = _spy(monkeypatch, "grad_plan")
    q, k = _feats(37, 48, dtype), _feats(37, 48, dtype)
    sq, sk = _feats(37, 20, dtype, True), _feats(37, 20, dtype, True)
    gl, gs = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    for excl in (False, True):
        lse, _, slse = C.contrastive_loss_lse_forward(q, k, 0.9, sq, sk, 2.0, exclude_diagonal=excl)
        whole = C.contrastive_loss_lse_backward(q, k, 0.9, lse, gl, sq, sk, 2.0, slse, gs, exclude_diagonal=excl)
        assert [r[4] for r in seen[-1]] == ["both"]
        got = C.contrastive_loss_lse_backward(q, k, 0.9, lse, gl, sq, sk, 2.0, slse, gs, exclude_diagonal=excl,
                                              workspace_bytes=37 * 16 * q.element_size())
        roles = [r[4] for r in seen[-1]]
        assert roles.count("dk") == 3 and roles.count("dq") == 3      # 37 rows: chunks of 16, 16, 5
        for a, b in zip(whole, got):
            assert torch.equal(a, b) if a.dim() else torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_workspace_env_and_bad_values(monkeypatch):
    monkeypatch.setenv("VLFAST_CONTRASTIVE_WORKSPACE_MB", "0.5")
    assert C._workspace(None) == 2 ** 19
    assert C._workspace(123) == 123
    for bad in ("x", "0", "-1"):
        monkeypatch.setenv("VLFAST_CONTRASTIVE_WORKSPACE_MB", bad)
        with pytest.raises(ValueError, match="VLFAST_CONTRASTIVE_WORKSPACE_MB"):
            C._workspace(None)
    monkeypatch.delenv("VLFAST_CONTRASTIVE_WORKSPACE_MB")
    assert C._workspace(None) == C.WORKSPACE_BYTES
    q = _feats(4, 8, torch.float32)
    with pytest.raises(ValueError, match="workspace_bytes"):
        C.contrastive_loss_lse_backward(q, q, 1.0, torch.zeros(4), torch.ones(4), workspace_bytes=0)
    with pytest.raises(ValueError, match="key_splits"):
        C.contrastive_loss_lse_forward(q, q, 1.0, key_splits=0)
    with pytest.raises(ValueError, match="key_splits"):
        C.siglip_rows_forward(q, q, 1.0, 0.0, key_splits=-2)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_siglip_splits_and_workspace_chunks(monkeypatch, dtype):
    """SigLIP's forward over forced key splits and its backward over workspace chunks, against the
    float64 reference (the per-row sums of the splits, dscale / dbias from the query chunks)."""
    x, y = _feats(29, 40, dtype, True), _feats(45, 40, dtype, True)
    g = torch.randn(29, device=DEVICE)
    ref = _siglip_ref(x, y, 10.0, -10.0, g, 3, torch.float64)
    eager = _siglip_ref(x, y, 10.0, -10.0, g, 3, dtype) if dtype in LOW else [None] * 5
    for splits in (2, 3):
        r = C.siglip_rows_forward(x, y, 10.0, -10.0, 3, key_splits=splits)
        _assert_close("r", r, ref[0], eager[0], dtype, 2)
    seen = _spy(monkeypatch, "grad_plan")
    got = C.siglip_rows_backward(x, y, 10.0, -10.0, g, 3, workspace_bytes=29 * 16 * x.element_size())
    assert [r[4] for r in seen[-1]].count("dq") == 2
    for name, v, rf, e in zip(("dx", "dy", "dscale", "dbias"), got, ref[1:], eager[1:]):
        _assert_close(name, v, rf, e, dtype, 3, rtol=2e-4)


# ----------------------------------------------------------------------------- feature row alignment
def test_kernel_pair_layouts():
    # aligned features are read as they are; any other D or row pitch becomes a zero-padded
    # (N, ceil16(D)) copy with the same values (the padded columns add exact zeros to the dots)
    P = C.FEATURE_PITCH
    a, b = torch.randn(5, 64, device=DEVICE), torch.randn(7, 64, device=DEVICE)
    a2, b2, D = C._kernel_pair(a, b)
    assert a2 is a and b2 is b and D == 64
    wide = torch.randn(7, 72, device=DEVICE)
    cases = {"D=257": (torch.randn(5, 257, device=DEVICE), torch.randn(7, 257, device=DEVICE)),
             "D=40": (torch.randn(5, 40, device=DEVICE), torch.randn(7, 40, device=DEVICE)),
             "pitch 72": (a, wide[:, :64])}
    for name, (x, y) in cases.items():
        x2, y2, D = C._kernel_pair(x, y)
        d = x.shape[1]
        assert D == -(-d // P) * P and x2.shape == (x.shape[0], D) and y2.shape == (y.shape[0], D), name
        for got, src in ((x2, x), (y2, y)):
            assert got.stride(0) % P == 0 and torch.equal(got[:, :d], src), name
            assert not got[:, d:].any(), name
    one = torch.randn(1, 80, device=DEVICE)[:, :64]                  # a single row: its pitch does not count
    assert C._kernel_pair(one, b)[0] is one


class _DSpy:
    """Stands in for a ``@triton.jit`` kernel: records each launch's feature dims, then launches."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.seen.append((kwargs["D"], kwargs.get("DS")))
            return launch(*args, **kwargs)

        return call


def test_padded_feature_dims_reach_the_kernels(monkeypatch):
    seen = {n: [] for n in ("_lse_fwd_kernel", "_grad_tile_kernel", "_siglip_fwd_kernel")}
    for name in seen:
        monkeypatch.setattr(C, name, _DSpy(getattr(C, name), seen[name]))
    q, k = torch.randn(9, 40, device=DEVICE), torch.randn(11, 40, device=DEVICE)
    sq, sk = torch.randn(9, 24, device=DEVICE), torch.randn(11, 24, device=DEVICE)
    g = torch.randn(9, device=DEVICE)
    lse, _, slse = C.contrastive_loss_lse_forward(q, k, 2.0, sq, sk, 3.0)
    C.contrastive_loss_lse_backward(q, k, 2.0, lse, g, sq, sk, 3.0, slse, g)
    C.siglip_rows_forward(q, k, 2.0, -1.0)
    C.siglip_rows_backward(q, k, 2.0, -1.0, g)
    assert set(seen["_lse_fwd_kernel"]) == {(48, 32)} and set(seen["_grad_tile_kernel"]) == {(48, 32), (48, 0)}
    assert set(seen["_siglip_fwd_kernel"]) == {(48, None)}
    monkeypatch.undo()
