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


# ----------------------------------------------------------------- exclude_diagonal (NT-Xent over 2N views)
def reference_exclude_diagonal(q, k, scale, positives, sq=None, sk=None, alpha=0.0, eps=0.0, reduction="mean"):
    """float64 oracle of ``exclude_diagonal=True``: key i leaves query i's softmax (its logit is -inf)."""
    s = scale * q @ k.T
    Nq, Nk = s.shape
    off = torch.ones(Nq, Nk, dtype=torch.bool, device=s.device)
    off[torch.arange(Nq), torch.arange(Nq)] = False
    if isinstance(positives, torch.Tensor):
        P = torch.zeros(Nq, Nk, dtype=s.dtype, device=s.device)
        P[torch.arange(Nq), positives] = 1
    else:
        P = ((positives[0][:, None] == positives[1][None, :]) & off).to(s.dtype)
        P = P / P.sum(1, keepdim=True)
    t = torch.where(off, (1 - eps) * P + eps / (Nk - 1), 0.0)
    if sq is not None:
        sh = torch.where(off, scale.detach() * sq @ sk.T, float("-inf"))
        t = (1 - alpha) * t + alpha * torch.softmax(sh, dim=1)
    logp = torch.where(off, torch.log_softmax(torch.where(off, s, float("-inf")), dim=1), 0.0)
    loss = -(t * logp).sum(1)
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


def _ntxent_positives(n2, device):
    return (torch.arange(n2, device=device) + n2 // 2) % n2


def _check_exclude(backend, q, k, scale, tol, **kw):
    fused, fg = _grads(lambda q, k, s: contrastive_loss(q, k, s, backend=backend, exclude_diagonal=True, **kw),
                       (q, k, scale))
    sq, sk = kw.get("soft_query"), kw.get("soft_keys")
    ref, rg = _grads(lambda q, k, s: reference_exclude_diagonal(
        q, k, s, kw["positives"], None if sq is None else sq.double(), None if sk is None else sk.double(),
        kw.get("alpha", 0.0), kw.get("label_smoothing", 0.0), kw.get("reduction", "mean")),
        (q.double(), k.double(), scale.double()))
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    torch.testing.assert_close(fused.double(), ref, **tol)
    for name, a, b in zip(("dq", "dk", "dscale"), fg, rg):
        assert a.dtype == (scale.dtype if name == "dscale" else q.dtype)
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{name}: {m}")


_EXCLUDE_SIZES = [(2, 2, 8), (17, 17, 64), (18, 18, 257), (7, 20, 64)]
_EXCLUDE_VARIANTS = ["ntxent", "index", "ids", "smooth", "soft0.4", "none"]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("Nq,Nk,D,variant", [(*s, v) for s in _EXCLUDE_SIZES for v in _EXCLUDE_VARIANTS]
                         + [(197, 197, 40, "ntxent"), (197, 197, 40, "smooth")])
def test_exclude_diagonal_matches_reference(device, backend, Nq, Nk, D, variant):
    """Separate query / key tensors (gradients of both) and odd square sizes (17, 197: the last
    tile holds only the diagonal column of its last row); Nk > Nq excludes the leading square."""
    q, k = _unit(Nq, D, device), _unit(Nk, D, device)
    scale = torch.tensor(10.0, device=device)
    pos = (torch.arange(Nq, device=device) + 1 + torch.randint(0, Nk - 1, (Nq,), device=device)) % Nk  # never i
    kw = {"positives": _ntxent_positives(Nq, device) if variant == "ntxent" and Nq == Nk else pos}
    if variant == "ids":
        kid = torch.randint(0, 3, (Nk,), device=device)
        kw["positives"] = (kid[pos], kid)  # key pos[i] != i shares query i's id; key i may too (then excluded)
    elif variant == "smooth":
        kw["label_smoothing"] = 0.1
    elif variant == "soft0.4":
        kw.update(soft_query=_unit(Nq, 33, device), soft_keys=_unit(Nk, 33, device), alpha=0.4, label_smoothing=0.05)
    elif variant == "none":
        kw["reduction"] = "none"
    _check_exclude(backend, q, k, scale, F32, **kw)


@pytest.mark.parametrize("device,backend", CASES)
def test_exclude_diagonal_ntxent_one_tensor(device, backend):
    """SimCLR's use: query and keys are one tensor z = normalize(cat(z1, z2)) (2N, D); the op equals
    vlfast.reference.ntxent_loss_reference and the gradients reach z1, z2 and logit_scale."""
    from vlfast.reference import ntxent_loss_reference

    N, D = 13, 48
    z1, z2 = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    scale = torch.tensor(1 / 0.1, device=device)

    def fused(a, b, s):
        z = F.normalize(torch.cat([a, b]), dim=1)
        return contrastive_loss(z, z, s, positives=_ntxent_positives(2 * N, device), exclude_diagonal=True,
                                backend=backend)

    got, g = _grads(fused, (z1, z2, scale))
    ref, rg = _grads(lambda a, b, s: ntxent_loss_reference(a, b, 1 / s), (z1.double(), z2.double(), scale.double()))
    torch.testing.assert_close(got.double(), ref, **F32)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a.double(), b, **F32)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, dict(rtol=1e-2, atol=1e-2)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
def test_exclude_diagonal_half(device, backend, dtype, tol):
    n2, D = 38, 64
    z = _unit(n2, D, device)
    z[n2 // 2:] = F.normalize(z[:n2 // 2] + 0.3 * torch.randn_like(z[:n2 // 2]), dim=1)  # views of one sample
    z = z.to(dtype)
    _check_exclude(backend, z, z.clone(), torch.tensor(10.0, device=device), tol,
                   positives=_ntxent_positives(n2, device))


def test_exclude_diagonal_torch_tiles_and_large_self_logit(monkeypatch):
    """One-key tiles (row 0's first tile holds only its excluded key) and logit_scale 100, where
    exp(s_ii - lse_i) would overflow fp32 if the diagonal were not dropped."""
    monkeypatch.setitem(C.TORCH_TILE, "keys", 1)
    z = _unit(9, 16, "cpu")
    _check_exclude("torch", z, z.clone(), torch.tensor(100.0), F32, positives=(torch.arange(9) + 1) % 9)


def test_exclude_diagonal_off_is_unchanged():
    q, k = _unit(11, 16, "cpu"), _unit(11, 16, "cpu")
    scale = torch.tensor(7.0)
    for kw in ({}, dict(label_smoothing=0.1), dict(soft_query=_unit(11, 8, "cpu"), soft_keys=_unit(11, 8, "cpu"),
                                                   alpha=0.3)):
        assert torch.equal(contrastive_loss(q, k, scale, exclude_diagonal=False, backend="torch", **kw),
                           contrastive_loss(q, k, scale, backend="torch", **kw))


def test_exclude_diagonal_compile_fullgraph():
    z = _unit(10, 8, "cpu")
    scale = torch.tensor(5.0, requires_grad=True)
    pos = _ntxent_positives(10, "cpu")

    def f(z, scale):
        return contrastive_loss(z, z, scale, positives=pos, label_smoothing=0.1, exclude_diagonal=True,
                                backend="torch")

    leaves = [z.clone().requires_grad_(), scale]
    eager = torch.autograd.grad(f(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_exclude_diagonal_opcheck():
    q, k = _unit(6, 8, "cpu"), _unit(6, 8, "cpu")
    scale = torch.tensor(3.0)
    torch.library.opcheck(torch.ops.vlfast.contrastive_loss_lse.default,
                          (q.requires_grad_(), k.requires_grad_(), scale, None, None, 1.0, "torch", True))


_P6 = _ntxent_positives(6, "cpu")


@pytest.mark.parametrize("call,exc,match", [
    (lambda: contrastive_loss(U(6), U(5), 1.0, positives=_P6 % 5, exclude_diagonal=True), ValueError,
     "exclude_diagonal .*Nk >= Nq"),
    (lambda: contrastive_loss(U(1), U(1), 1.0, positives=torch.tensor([0]), exclude_diagonal=True), ValueError,
     "exclude_diagonal .*Nk >= 2"),
    (lambda: contrastive_loss(U(6), U(6), 1.0, exclude_diagonal=True), ValueError, "exclude_diagonal .*positives"),
    (lambda: contrastive_loss(U(6), U(6), 1.0, positives=torch.tensor([3, 4, 5, 0, 4, 2]), exclude_diagonal=True),
     ValueError, r"exclude_diagonal: positives\[4\] = 4"),
    (lambda: contrastive_loss(U(3), U(3), 1.0, positives=(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1])),
                              exclude_diagonal=True), ValueError, "exclude_diagonal: query 0's only positive"),
    (lambda: contrastive_loss(U(6), U(6), 1.0, positives=_P6, exclude_diagonal=1), TypeError, "exclude_diagonal"),
])
def test_exclude_diagonal_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
