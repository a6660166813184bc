"""vlfast.ops.contrastive_loss / siglip_rows against float64 references that build the logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlfast.ops import contrastive as C
from vlfast.ops import contrastive_loss, siglip_rows
from vlfast.testing import cases_for

CASES = cases_for("contrastive_loss")
SIG_CASES = cases_for("siglip_rows")


def _unit(n, d, device, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)


def reference(q, k, scale, positives=None, sq=None, sk=None, alpha=0.0, eps=0.0, reduction="mean"):
    s = scale * q @ k.T
    Nq, Nk = s.shape
    P = torch.zeros(Nq, Nk, dtype=s.dtype, device=s.device)
    if positives is None:
        P[torch.arange(Nq), torch.arange(Nq)] = 1
    elif isinstance(positives, torch.Tensor):
        P[torch.arange(Nq), positives] = 1
    else:
        P = (positives[0][:, None] == positives[1][None, :]).to(s.dtype)
        P = P / P.sum(1, keepdim=True)
    t = (1 - eps) * P + eps / Nk
    if sq is not None:
        t = (1 - alpha) * t + alpha * torch.softmax(scale.detach() * sq @ sk.T, dim=1)
    loss = -(t * torch.log_softmax(s, dim=1)).sum(1)
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


def _grads(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    g = torch.autograd.grad(out.sum(), leaves)
    return out, g


def _check(backend, q, k, scale, tol, **kw):
    fused, fg = _grads(lambda q, k, s: contrastive_loss(q, k, s, backend=backend, **kw), (q, k, scale))
    kw64 = dict(kw)
    for name in ("soft_query", "soft_keys"):
        if kw64.get(name) is not None:
            kw64[name] = kw64[name].double()
    ref_kw = dict(positives=kw64.get("positives"), sq=kw64.get("soft_query"), sk=kw64.get("soft_keys"),
                  alpha=kw64.get("alpha", 0.0), eps=kw64.get("label_smoothing", 0.0),
                  reduction=kw64.get("reduction", "mean"))
    ref, rg = _grads(lambda q, k, s: reference(q, k, s, **ref_kw), (q.double(), k.double(), scale.double()))
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), ref, **tol)
    for name, a, b in zip(("dq", "dk", "dscale"), fg, rg):
        assert a.dtype == (scale.dtype if name == "dscale" else q.dtype)
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{name}: {m}")


F32 = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("Nq,Nk,D", [(1, 1, 64), (7, 7, 257), (7, 20, 64), (100, 300, 64)])
@pytest.mark.parametrize("variant", ["default", "index", "ids", "smooth", "soft0.4", "soft1", "none_sum"])
def test_variants_match_reference(device, backend, Nq, Nk, D, variant):
    q, k = _unit(Nq, D, device), _unit(Nk, D, device)
    scale = torch.tensor(14.3, device=device)
    kw = {}
    if variant == "index":
        kw["positives"] = torch.randint(0, Nk, (Nq,), device=device)
    elif variant == "ids":
        kid = torch.randint(0, 3, (Nk,), device=device)
        kw["positives"] = (kid[torch.randint(0, Nk, (Nq,), device=device)], kid)
    elif variant == "smooth":
        kw["label_smoothing"] = 0.1
    elif variant.startswith("soft"):
        kw.update(soft_query=_unit(Nq, 33, device), soft_keys=_unit(Nk, 33, device), alpha=float(variant[4:]),
                  label_smoothing=0.05)
    elif variant == "none_sum":
        kw["reduction"] = "none"
    _check(backend, q, k, scale, F32, **kw)
    if variant == "none_sum":
        _check(backend, q, k, scale, F32, reduction="sum")


@pytest.mark.parametrize("device,backend", CASES)
def test_large_logit_scale_and_bf16(device, backend):
    q, k = _unit(37, 64, device), _unit(53, 64, device)
    k[:37] = q + 0.01 * torch.randn_like(q)  # confident positives: logits up to 100
    _check(backend, q, F.normalize(k, dim=1), torch.tensor(100.0, device=device), F32)
    qb, kb = q.bfloat16(), F.normalize(k, dim=1).bfloat16()
    _check(backend, qb, kb, torch.tensor(20.0, device=device), dict(rtol=2e-2, atol=2e-2))


def test_torch_backend_thousand_rows_d768():
    q, k = _unit(1000, 768, "cpu"), _unit(1200, 768, "cpu")
    _check("torch", q, k, torch.tensor(10.0), F32, label_smoothing=0.1)


def test_float_logit_scale_has_no_grad():
    q, k = _unit(5, 8, "cpu").requires_grad_(), _unit(5, 8, "cpu")
    loss = contrastive_loss(q, k, 10.0)
    torch.testing.assert_close(loss, F.cross_entropy(10.0 * q @ k.T, torch.arange(5)))
    loss.backward()
    assert q.grad is not None


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_torch_backend_never_allocates_nq_by_nk(monkeypatch):
    monkeypatch.setitem(C.TORCH_TILE, "elems", 2048)
    Nq = Nk = 300
    q, k = _unit(Nq, 16, "cpu").requires_grad_(), _unit(Nk, 16, "cpu").requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    sq, sk = _unit(Nq, 16, "cpu"), _unit(Nk, 16, "cpu")
    mode = _MaxNumel()
    with mode:
        loss = contrastive_loss(q, k, scale, soft_query=sq, soft_keys=sk, alpha=0.3, label_smoothing=0.1,
                                backend="torch")
        loss.backward()
        rows = siglip_rows(q.detach().requires_grad_(), k.detach(), 10.0, -10.0, backend="torch")
        rows.sum().backward()
    assert mode.max <= max(2048, Nq * 16) < Nq * Nk, mode.max  # a tile or an (N, D) tensor, never Nq x Nk


def siglip_reference(x, y, scale, bias, pos_offset=0):
    u = scale * x @ y.T + bias
    z = -torch.ones_like(u)
    i = torch.arange(x.shape[0])
    j = i + pos_offset
    ok = j < y.shape[0]
    z[i[ok], j[ok]] = 1
    return -F.logsigmoid(z * u).sum(1)


@pytest.mark.parametrize("device,backend", SIG_CASES)
@pytest.mark.parametrize("Nx,Ny,off", [(7, 7, 0), (7, 20, 5), (1, 1, 0), (64, 130, 64)])
def test_siglip_rows(device, backend, Nx, Ny, off):
    x, y = _unit(Nx, 40, device), _unit(Ny, 40, device)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    out, g = _grads(lambda x, y, s, b: siglip_rows(x, y, s, b, pos_offset=off, backend=backend), (x, y, scale, bias))
    ref, rg = _grads(lambda x, y, s, b: siglip_reference(x, y, s, b, off),
                     (x.double(), y.double(), scale.double(), bias.double()))
    torch.testing.assert_close(out.double(), ref, **F32)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a.double(), b, **F32)


def test_compile_fullgraph():
    q, k = _unit(6, 8, "cpu"), _unit(9, 8, "cpu")
    scale = torch.tensor(7.0, requires_grad=True)

    def f(q, k, scale):
        return contrastive_loss(q, k, scale, label_smoothing=0.1, backend="torch") + \
            siglip_rows(q, k, scale, -1.0, backend="torch").mean()

    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), scale]
    eager = torch.autograd.grad(f(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


U = lambda n, d=8: _unit(n, d, "cpu")  # noqa: E731


@pytest.mark.parametrize("call,exc,match", [
    (lambda: contrastive_loss(U(3), U(3, 9), 1.0), ValueError, "keys has feature dim 9"),
    (lambda: contrastive_loss(U(5), U(3), 1.0), ValueError, "need Nk >= Nq"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, positives=torch.tensor([0, 1, 4])), ValueError, "out of range"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, positives=torch.tensor([0., 1., 2.])), TypeError, "int64"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, positives=(torch.zeros(3), torch.zeros(4, dtype=torch.long))),
     TypeError, "query_ids must be an int64"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, positives=(torch.tensor([0, 1, 9]), torch.tensor([0, 1, 2, 2]))),
     ValueError, "matches no key id"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, soft_query=U(3)), ValueError, "together"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, alpha=0.5), ValueError, "alpha > 0 needs"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, soft_query=U(3), soft_keys=U(4), alpha=1.5), ValueError,
     r"alpha must be in \[0, 1\]"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, label_smoothing=1.0), ValueError,
     r"label_smoothing must be in \[0, 1\)"),
    (lambda: contrastive_loss(U(3), U(4), 1.0, reduction="avg"), ValueError, "reduction"),
    (lambda: contrastive_loss(U(3).long(), U(4), 1.0), TypeError, "query must be float32"),
    (lambda: contrastive_loss(U(3)[0], U(4), 1.0), ValueError, r"query must have shape \(N, D\)"),
    (lambda: contrastive_loss(U(3), U(4).double(), 1.0), TypeError, "keys must be float32"),
    (lambda: contrastive_loss(U(3), U(4), "1"), TypeError, "logit_scale must be a float"),
    (lambda: siglip_rows(U(3), U(4, 9), 1.0, 0.0), ValueError, "feature dim"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
