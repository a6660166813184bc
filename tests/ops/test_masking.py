"""vlfast.ops.random_masking / unshuffle_tokens against MAE's reference, on every backend."""

import pytest
import torch

from vlfast.ops import random_masking, unshuffle_tokens
from vlfast.reference import random_masking_reference, unshuffle_tokens_reference
from vlfast.testing import cases_for

CASES = cases_for("random_masking")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _x(B, L, D, dtype, device, noncontig=False):
    if noncontig:  # (B, L, D) view of a (B, D, L) buffer plus a slice
        return torch.randn(B, D + 3, L, device=device).to(dtype).transpose(1, 2)[:, :, 1:D + 1]
    return torch.randn(B, L, D, device=device).to(dtype)


def _assert_same(ours, ref):
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("L", [1, 49, 196, 197, 256])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_exact_with_given_noise(device, backend, L, ratio):
    B, D = 3, 17
    x = _x(B, L, D, torch.float32, device)
    pos = torch.randn(1, L, D, device=device)
    noise = torch.rand(B, L, device=device)
    ours = random_masking(x, ratio, noise=noise, pos_embed=pos, backend=backend)
    _assert_same(ours, random_masking_reference(x, ratio, noise, pos))
    assert ours[0].shape == (B, int(L * (1 - ratio)), D)


@pytest.mark.parametrize("device,backend", CASES)
def test_long_video_sequence(device, backend):
    B, L, D = 2, 1568, 8
    x = _x(B, L, D, torch.bfloat16, device)
    noise = torch.rand(B, L, device=device)
    _assert_same(random_masking(x, 0.9, noise=noise, backend=backend), random_masking_reference(x, 0.9, noise))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("pos_shape", [None, "LD", "1LD"])
def test_dtypes_layouts_pos(device, backend, dtype, noncontig, pos_shape):
    B, L, D = 2, 197, 33
    x = _x(B, L, D, dtype, device, noncontig)
    assert x.is_contiguous() == (not noncontig)
    pos = None if pos_shape is None else torch.randn(*((L, D) if pos_shape == "LD" else (1, L, D)), device=device)
    noise = torch.rand(B, L, device=device)
    _assert_same(random_masking(x, 0.75, noise=noise, pos_embed=pos, backend=backend),
                 random_masking_reference(x, 0.75, noise, pos))


@pytest.mark.parametrize("device,backend", CASES)
def test_ties_and_nan_keys(device, backend):
    B, L, D = 4, 61, 5
    x = _x(B, L, D, torch.float32, device)
    noise = torch.randint(0, 3, (B, L), device=device).float()
    noise[1, 7] = float("nan")
    noise[1, 3] = float("nan")
    _assert_same(random_masking(x, 0.5, noise=noise, backend=backend), random_masking_reference(x, 0.5, noise))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients(device, backend, dtype):
    B, L, D = 3, 197, 24
    x = _x(B, L, D, dtype, device).requires_grad_()
    pos = torch.randn(1, L, D, device=device, dtype=dtype, requires_grad=True)
    noise = torch.rand(B, L, device=device)
    g = torch.randn(B, int(L * 0.25), D, device=device).to(dtype)
    ours = random_masking(x, 0.75, noise=noise, pos_embed=pos, backend=backend)[0]
    ours.backward(g)
    x64 = x.detach().double().requires_grad_()
    pos64 = pos.detach().double().requires_grad_()
    random_masking_reference(x64, 0.75, noise, pos64)[0].backward(g.double())
    assert torch.equal(x.grad.double(), x64.grad)  # a pure scatter: exact, zero on removed tokens
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(pos.grad.double(), pos64.grad, **tol)
    assert pos.grad.dtype == dtype and pos.grad.shape == pos.shape


@pytest.mark.parametrize("device,backend", CASES)
def test_seeded_generator_and_default_rng(device, backend):
    B, L, D = 2, 196, 8
    x = _x(B, L, D, torch.float32, device)
    g1 = torch.Generator(device=device).manual_seed(123)
    g2 = torch.Generator(device=device).manual_seed(123)
    a = random_masking(x, 0.75, generator=g1, backend=backend)
    b = random_masking(x, 0.75, generator=g2, backend=backend)
    _assert_same(a, b)
    c = random_masking(x, 0.75, generator=g1, backend=backend)
    assert not torch.equal(a[2], c[2])
    # the same draw as MAE's eager code under the same global seed
    torch.manual_seed(7)
    ours = random_masking(x, 0.75, backend=backend)
    torch.manual_seed(7)
    noise = torch.rand(B, L, device=device)
    _assert_same(ours, random_masking_reference(x, 0.75, noise))


@pytest.mark.parametrize("device,backend", CASES)
def test_precomputed_mask(device, backend):
    B, L, D = 3, 49, 6
    x = _x(B, L, D, torch.float32, device)
    mask = torch.stack([torch.randperm(L, device=device) < 37 for _ in range(B)])  # 37 removed per row
    kept, mask_out, ids_restore = random_masking(x, mask=mask, backend=backend)
    assert kept.shape == (B, L - 37, D)
    assert torch.equal(mask_out, mask.to(x.dtype))
    for b in range(B):
        assert torch.equal(kept[b], x[b][~mask[b]])  # unmasked tokens in position order
    token = torch.randn(D, device=device)
    full = unshuffle_tokens(kept, ids_restore, token, backend=backend)
    assert torch.equal(full[~mask], x[~mask])
    assert torch.equal(full[mask], token.expand(int(mask.sum()), D))
    # consistent with the ratio that gives the same count; inconsistent ratio raises
    random_masking(x, 0.75, mask=mask, backend=backend)
    with pytest.raises(ValueError, match="keeps 12 of 49"):
        random_masking(x, 0.5, mask=mask)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("token_shape", [(1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unshuffle_matches_reference_and_grads(device, backend, token_shape, dtype):
    B, L, C = 3, 197, 20
    K = 49
    shape = tuple(C if s == 1 and i == len(token_shape) - 1 else 1 for i, s in enumerate(token_shape))
    ids_restore = torch.stack([torch.randperm(L, device=device) for _ in range(B)])
    xk = torch.randn(B, C, K, device=device).to(dtype).transpose(1, 2).requires_grad_()  # non-contiguous
    tok = torch.randn(shape, device=device).to(dtype).requires_grad_()
    ours = unshuffle_tokens(xk, ids_restore, tok, backend=backend)
    ref = unshuffle_tokens_reference(xk, ids_restore, tok)
    assert torch.equal(ours, ref)
    g = torch.randn(B, L, C, device=device).to(dtype)
    gx, gt = torch.autograd.grad(ours, (xk, tok), g)
    rx, rt = torch.autograd.grad(ref, (xk, tok), g)
    assert torch.equal(gx, rx)
    torch.testing.assert_close(gt.double(), rt.double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)
    assert gt.shape == tok.shape and gt.dtype == dtype


@pytest.mark.parametrize("device,backend", CASES)
def test_edge_sizes(device, backend):
    x = _x(1, 1, 1, torch.float32, device)
    kept, mask, ids = random_masking(x, 0.0, noise=torch.rand(1, 1, device=device), backend=backend)
    assert torch.equal(kept, x) and mask.item() == 0 and ids.item() == 0
    kept, mask, ids = random_masking(x, 0.5, noise=torch.rand(1, 1, device=device), backend=backend)
    assert kept.shape == (1, 0, 1) and mask.item() == 1
    full = unshuffle_tokens(kept, ids, torch.ones(1, device=device), backend=backend)
    assert full.item() == 1.0
    empty = _x(0, 5, 3, torch.float32, device)
    assert random_masking(empty, 0.5, backend=backend)[0].shape == (0, 2, 3)


def test_compile_and_opcheck():
    B, L, D = 2, 16, 8
    x = torch.randn(B, L, D, requires_grad=True)
    pos = torch.randn(1, L, D, requires_grad=True)
    tok = torch.randn(D, requires_grad=True)
    noise = torch.rand(B, L)

    def f(x, pos, tok, noise):
        kept, mask, ids = random_masking(x, 0.75, noise=noise, pos_embed=pos, backend="torch")
        return (unshuffle_tokens(kept * 2, ids, tok, backend="torch") * mask[..., None]).sum()

    eager = f(x, pos, tok, noise)
    ge = torch.autograd.grad(eager, (x, pos, tok))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, pos, tok, noise)
    gc = torch.autograd.grad(compiled, (x, pos, tok))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)

    ids_restore = torch.stack([torch.randperm(L) for _ in range(B)])
    ids_keep = torch.argsort(ids_restore, 1)[:, :4].contiguous()
    for backend in ("torch", "native"):
        torch.library.opcheck(torch.ops.vlfast.random_masking_rank.default, (noise, 4, torch.float32, backend))
        torch.library.opcheck(torch.ops.vlfast.random_masking_gather.default,
                              (x, ids_keep, ids_restore, pos[0], backend))
        torch.library.opcheck(torch.ops.vlfast.unshuffle_tokens.default,
                              (torch.randn(B, 4, D, requires_grad=True), ids_restore, tok, backend))


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: random_masking(x[0], 0.5), ValueError, "x must have 3 dimensions"),
    (lambda x: random_masking(x.long(), 0.5), TypeError, "x must be float32"),
    (lambda x: random_masking(x), ValueError, "mask_ratio is required"),
    (lambda x: random_masking(x, 1.0), ValueError, r"mask_ratio must be in \[0, 1\)"),
    (lambda x: random_masking(x, -0.1), ValueError, r"mask_ratio must be in \[0, 1\)"),
    (lambda x: random_masking(x, "0.5"), TypeError, "mask_ratio must be a real number"),
    (lambda x: random_masking(x, 0.5, noise=torch.rand(2, 9)), ValueError, r"noise must have shape \(B, L\)"),
    (lambda x: random_masking(x, 0.5, noise=torch.ones(2, 10, dtype=torch.long)), TypeError,
     "noise must be a floating"),
    (lambda x: random_masking(x, 0.5, pos_embed=torch.rand(10, 5)), ValueError, "pos_embed must have shape"),
    (lambda x: random_masking(x, 0.5, pos_embed=torch.rand(2, 10, 4)), ValueError, "pos_embed must have shape"),
    (lambda x: random_masking(x, 0.5, generator=3), TypeError, "generator must be a torch.Generator"),
    (lambda x: random_masking(x, 0.5, noise=torch.rand(2, 10), generator=torch.Generator()), ValueError, "not both"),
    (lambda x: random_masking(x, mask=torch.zeros(2, 10)), TypeError, "mask must be a bool tensor"),
    (lambda x: random_masking(x, mask=torch.zeros(2, 9, dtype=torch.bool)), ValueError, r"mask must have shape"),
    (lambda x: random_masking(x, mask=torch.tensor([[True] + [False] * 9, [False] * 10])), ValueError,
     "same number of tokens in every row"),
    (lambda x: random_masking(x, 0.5, noise=torch.rand(2, 10, device="meta")), ValueError, "noise is on meta"),
    (lambda x: unshuffle_tokens(x, torch.zeros(2, 10, dtype=torch.int32), torch.zeros(4)), TypeError,
     "ids_restore must be an int64"),
    (lambda x: unshuffle_tokens(x, torch.zeros(3, 10, dtype=torch.long), torch.zeros(4)), ValueError,
     r"ids_restore must have shape \(B, L\)"),
    (lambda x: unshuffle_tokens(x, torch.zeros(2, 5, dtype=torch.long), torch.zeros(4)), ValueError,
     "fewer than the K"),
    (lambda x: unshuffle_tokens(x, torch.arange(12).expand(2, 12).contiguous(), torch.zeros(5)), ValueError,
     "mask_token must have shape"),
    (lambda x: unshuffle_tokens(x, torch.arange(12).expand(2, 12).contiguous() + 1, torch.zeros(4)), ValueError,
     r"ids_restore values must be in \[0, 12\)"),
    (lambda x: unshuffle_tokens(x, torch.arange(12).expand(2, 12).contiguous(), torch.zeros(4, dtype=torch.long)),
     TypeError, "mask_token must be a floating"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 10, 4))


def test_random_masking_module():
    from vlfast.nn import RandomMasking

    m = RandomMasking(0.75)
    assert "mask_ratio=0.75" in repr(m)
    x = torch.randn(2, 196, 8, requires_grad=True)
    pos = torch.randn(1, 196, 8)
    noise = torch.rand(2, 196)
    out = m(x, pos, noise=noise)
    _assert_same([t.detach() for t in out], random_masking_reference(x.detach(), 0.75, noise, pos))
    out[0].sum().backward()
    assert x.grad.sum().item() == 2 * 49 * 8
    mask = torch.stack([torch.randperm(196) < 147 for _ in range(2)])
    kept, mask_out, _ = m(x, mask=mask)
    assert kept.shape == (2, 49, 8) and torch.equal(mask_out, mask.float())
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        RandomMasking(1.0)


@pytest.mark.parametrize("device,backend", CASES)
def test_non_permutation_backward_does_not_read_out_of_bounds(device, backend):
    """ids_restore in range but not a permutation: documented wrong gradient, never a crash."""
    ids = torch.zeros(2, 6, dtype=torch.int64, device=device)  # every slot reads kept row 0
    xk = torch.randn(2, 3, 4, device=device, requires_grad=True)
    out = unshuffle_tokens(xk, ids, torch.zeros(4, device=device), backend=backend)
    assert torch.equal(out, xk[:, :1].expand(2, 6, 4))
    out.sum().backward()
    assert xk.grad.shape == xk.shape and torch.isfinite(xk.grad).all()
