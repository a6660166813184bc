"""CLIP / SigLIP losses, MoCo queue loss, ALBEF/BLIP ITC and the distributed gather.

Every loss is checked against the eager formulas of :mod:`vlfast.reference.contrastive`
(computed in float64) for the loss and the gradients of the features and of
``logit_scale`` / ``logit_bias`` / ``temp``; bf16 features loosely.  The distributed part
spawns two gloo processes on CPU.
"""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlfast.distributed import all_gather_no_grad, all_gather_with_grad, world_info
import vlfast.nn.contrastive as vc
from vlfast.nn.contrastive import ClipLoss, ITCLoss, MoCoQueueLoss, MoCoV3Loss, SigLipLoss
from vlfast.ops.contrastive_losses import clip_loss, siglip_loss
from vlfast.reference.contrastive import (albef_itc_reference, clip_loss_reference, contrastive_loss_reference,
                                          moco_loss_reference, moco_v3_loss_reference, siglip_loss_reference)
from vlfast.testing import run_gloo_ranks, DEVICES, assert_close


def _unit(n, d, device="cpu", dtype=torch.float32):
    return F.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)


def _leaves(*ts, double=False):
    return [t.detach().clone().double().requires_grad_() if double else t.detach().clone().requires_grad_()
            for t in ts]


def _close(a, b, dtype=torch.float32, what="", tol=None):
    assert_close(a, b, dtype, msg=what, **(tol or {}))  # vlfast.testing's per-dtype tolerance unless tol


# ---------------------------------------------------------------- CLIP / SigLIP
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_loss_matches_open_clip(device, dtype):
    img, txt = _unit(24, 32, device, dtype), _unit(24, 32, device, dtype)
    scale = torch.tensor(14.3, device=device)
    x, y, s = _leaves(img, txt, scale)
    loss = clip_loss(x, y, s)
    loss.backward()
    xr, yr, sr = _leaves(img, txt, scale, double=True)
    ref = clip_loss_reference(xr, yr, sr)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, ref, dtype, "loss")
    for got, want, nm in ((x.grad, xr.grad, "image"), (y.grad, yr.grad, "text"), (s.grad, sr.grad, "scale")):
        assert got.dtype == (dtype if nm != "scale" else torch.float32)
        _close(got, want, dtype, nm)
    # the module (open_clip signature) gives the same loss; logit_bias cancels in a softmax
    m = ClipLoss()
    out = m(img, txt, scale, logit_bias=torch.tensor(-3.0, device=device), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert out["contrastive_loss"].dtype == dtype  # open_clip's dtype: the features'
    torch.testing.assert_close(out["contrastive_loss"], loss.detach().to(dtype), atol=1e-5, rtol=1e-5)
    assert torch.equal(m(img, txt, scale), loss.detach().to(dtype))


def test_clip_loss_float_scale_and_gather_without_process_group():
    img, txt = _unit(6, 8), _unit(6, 8)
    a = clip_loss(img, txt, 10.0)
    b = clip_loss(img, txt, torch.tensor(10.0), gather=False)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.double(), clip_loss_reference(img.double(), txt.double(), 10.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siglip_loss_matches_reference(device, dtype):
    img, txt = _unit(20, 32, device, dtype), _unit(20, 32, device, dtype)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    x, y, s, b = _leaves(img, txt, scale, bias)
    loss = siglip_loss(x, y, s, b)
    loss.backward()
    xr, yr, sr, br = _leaves(img, txt, scale, bias, double=True)
    ref = siglip_loss_reference(xr, yr, sr, br)
    ref.backward()
    _close(loss, ref, dtype, "loss")
    for got, want, nm in ((x.grad, xr.grad, "image"), (y.grad, yr.grad, "text"), (s.grad, sr.grad, "scale"),
                          (b.grad, br.grad, "bias")):
        _close(got, want, dtype, nm)
    out = SigLipLoss()(img, txt, scale, bias, output_dict=True)
    assert out["contrastive_loss"].dtype == dtype  # open_clip's dtype: the features'
    torch.testing.assert_close(out["contrastive_loss"], loss.detach().to(dtype), atol=1e-5, rtol=1e-5)


def test_generic_reference_agrees_with_specialized_references():
    img, txt = _unit(7, 5).double(), _unit(7, 5).double()
    ref = clip_loss_reference(img, txt, 3.0)
    gen = 0.5 * (contrastive_loss_reference(img, txt, 3.0) + contrastive_loss_reference(txt, img, 3.0))
    torch.testing.assert_close(ref, gen)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    per = contrastive_loss_reference(img, txt, 3.0, positives=(ids, ids), reduction="none")
    assert per.shape == (7,)


def test_clip_siglip_validation():
    img, txt = _unit(4, 8), _unit(4, 8)
    with pytest.raises(ValueError, match="text_features"):
        clip_loss(img, _unit(5, 8), 1.0)
    with pytest.raises(ValueError, match="text_features"):
        clip_loss(img, _unit(4, 6), 1.0)
    with pytest.raises(TypeError, match="text_features"):
        siglip_loss(img, txt.double(), 1.0, 0.0)
    with pytest.raises(TypeError, match="image_features"):
        clip_loss(img.numpy(), txt, 1.0)
    with pytest.raises(TypeError, match="logit_scale"):
        clip_loss(img, txt, "10")
    with pytest.raises(TypeError, match="logit_bias"):
        siglip_loss(img, txt, 1.0, None)
    with pytest.raises(TypeError, match="gather"):
        clip_loss(img, txt, 1.0, gather=1)
    with pytest.raises(TypeError, match="gather"):
        ClipLoss(gather="yes")


def test_gather_helpers_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert world_info() == (0, 1)
    assert all_gather_with_grad(x) is x
    g = all_gather_no_grad(x)
    assert not g.requires_grad and torch.equal(g, x)
    with pytest.raises(TypeError, match="x"):
        all_gather_with_grad([1, 2])
    with pytest.raises(ValueError, match="x"):
        all_gather_no_grad(torch.tensor(1.0))


# ---------------------------------------------------------------- MoCo
@pytest.mark.parametrize("device", DEVICES)
def test_moco_queue_loss_matches_moco_and_enqueues(device):
    D, K, N, T = 16, 32, 8, 0.2
    m = MoCoQueueLoss(D, queue_size=K, temperature=T).to(device)
    assert m.queue.shape == (K, D) and m.queue_ptr.dtype == torch.long
    torch.testing.assert_close(m.queue.norm(dim=1), torch.ones(K, device=device))
    original = m.queue.clone()
    for step in range(5):  # 4 batches fill the queue, the 5th wraps around to slot 0
        q, k = _unit(N, D, device), _unit(N, D, device)
        before, ptr = m.queue.clone(), int(m.queue_ptr)
        assert ptr == (step * N) % K
        qg = q.clone().requires_grad_()
        kg = k.clone().requires_grad_()
        loss = m(qg, kg)
        loss.backward()
        qr = q.double().requires_grad_()
        ref = moco_loss_reference(qr, k.double(), before.double(), T)  # the queue *before* this batch
        ref.backward()
        assert_close(loss, ref, msg="loss")
        assert_close(qg.grad, qr.grad, msg="q grad")
        assert kg.grad is None  # k is detached, as in MoCo
        assert torch.equal(m.queue[ptr:ptr + N], k)
        keep = torch.ones(K, dtype=torch.bool, device=device)
        keep[ptr:ptr + N] = False
        assert torch.equal(m.queue[keep], before[keep])
        assert int(m.queue_ptr) == (ptr + N) % K
    assert int(m.queue_ptr) == N and not torch.equal(m.queue[N:2 * N], original[N:2 * N])


def test_moco_bf16_and_divisibility():
    D, K = 16, 24
    m = MoCoQueueLoss(D, queue_size=K, temperature=0.07)
    q, k = _unit(6, D, dtype=torch.bfloat16), _unit(6, D, dtype=torch.bfloat16)
    before = m.queue.clone()
    qg = q.clone().requires_grad_()
    loss = m(qg, k)
    loss.backward()
    qr = q.double().requires_grad_()
    ref = moco_loss_reference(qr, k.double(), before.double(), 0.07)
    ref.backward()
    _close(loss, ref, torch.bfloat16, "loss")
    assert qg.grad.dtype == torch.bfloat16
    _close(qg.grad, qr.grad, torch.bfloat16, "q grad")
    state = m.queue.clone(), m.queue_ptr.clone()
    with pytest.raises(ValueError, match="queue_size"):
        m(_unit(5, D), _unit(5, D))
    assert torch.equal(m.queue, state[0]) and torch.equal(m.queue_ptr, state[1])  # nothing enqueued
    with pytest.raises(ValueError, match="q"):
        m(_unit(6, D + 1), _unit(6, D))
    with pytest.raises(ValueError, match="k"):
        m(_unit(6, D), _unit(3, D))
    for kw, exc, name in ((dict(dim=0), ValueError, "dim"), (dict(dim=4.0), TypeError, "dim"),
                          (dict(dim=4, queue_size=-1), ValueError, "queue_size"),
                          (dict(dim=4, temperature=0.0), ValueError, "temperature")):
        with pytest.raises(exc, match=name):
            MoCoQueueLoss(**kw)


def test_moco_state_dict_round_trip_and_moco_layout():
    D, K = 8, 16
    a = MoCoQueueLoss(D, queue_size=K)
    a(_unit(4, D), _unit(4, D))
    sd = a.state_dict()
    assert set(sd) == {"queue", "queue_ptr"}
    b = MoCoQueueLoss(D, queue_size=K)
    b.load_state_dict(sd)
    assert torch.equal(b.queue, a.queue) and int(b.queue_ptr) == 4
    # MoCo's builder stores queue as (dim, K) (normalized along dim 0)
    moco_queue = F.normalize(torch.randn(D, K), dim=0)
    c = MoCoQueueLoss(D, queue_size=K)
    c.load_state_dict({"queue": moco_queue, "queue_ptr": torch.tensor([12])})
    assert torch.equal(c.queue, moco_queue.t()) and int(c.queue_ptr) == 12
    # nested in a parent module (prefix handling)
    parent = torch.nn.Module()
    parent.crit = MoCoQueueLoss(D, queue_size=K)
    parent.load_state_dict({"crit.queue": moco_queue, "crit.queue_ptr": torch.tensor([4])})
    assert torch.equal(parent.crit.queue, moco_queue.t())


# ---------------------------------------------------------------- ALBEF / BLIP ITC
def _itc_inputs(N, D, device="cpu", dtype=torch.float32):
    return [_unit(N, D, device, dtype) for _ in range(4)]


def _itc_check(m, feats, alpha_ref, idx=None, alpha_arg=None, dtype=torch.float32, tol=None):
    img, txt, img_m, txt_m = feats
    iq, tq, idq = m.image_queue.clone(), m.text_queue.clone(), m.idx_queue.clone()
    x, y = _leaves(img, txt)
    m.zero_grad()
    loss = m(x, y, img_m, txt_m, alpha=alpha_arg, idx=idx)
    loss.backward()
    temp_clamped = m.temp.detach().clone()
    xr, yr = _leaves(img, txt, double=True)
    tr = temp_clamped.double().requires_grad_()
    ref = albef_itc_reference(xr, yr, img_m.double(), txt_m.double(), iq.double(), tq.double(), tr, alpha_ref,
                              idx=idx, idx_queue=idq)
    ref.backward()
    _close(loss, ref, dtype, "loss", tol)
    _close(x.grad, xr.grad, dtype, "image grad", tol)
    _close(y.grad, yr.grad, dtype, "text grad", tol)
    _close(m.temp.grad, tr.grad, dtype, "temp grad", tol)
    return loss


@pytest.mark.parametrize("device", DEVICES)
def test_itc_matches_albef_and_enqueues(device):
    D, K, N = 16, 24, 8
    m = ITCLoss(D, queue_size=K).to(device)
    assert m.idx_queue.shape == (K,) and bool((m.idx_queue == -100).all())
    for step in range(4):  # 3 batches fill, the 4th wraps
        feats = _itc_inputs(N, D, device)
        ptr = int(m.queue_ptr)
        assert ptr == (step * N) % K
        _itc_check(m, feats, 0.4)
        assert torch.equal(m.image_queue[ptr:ptr + N], feats[2])
        assert torch.equal(m.text_queue[ptr:ptr + N], feats[3])
        assert bool((m.idx_queue == -100).all())
        assert int(m.queue_ptr) == (ptr + N) % K


def test_itc_alpha_override_bf16_and_clamp():
    D, K, N = 16, 24, 6
    m = ITCLoss(D, queue_size=K, alpha=0.4)
    _itc_check(m, _itc_inputs(N, D), 0.0, alpha_arg=0.0)
    _itc_check(m, _itc_inputs(N, D), 0.9, alpha_arg=0.9)
    assert m.alpha == 0.4
    _itc_check(m, _itc_inputs(N, D, dtype=torch.bfloat16), 0.4, dtype=torch.bfloat16)
    with torch.no_grad():
        m.temp.fill_(2.0)
    _itc_check(m, _itc_inputs(N, D), 0.4)
    assert m.temp.item() == 0.5
    with torch.no_grad():
        m.temp.fill_(1e-5)
    # logits up to 1000: fp32 rounding of the logits alone is ~1e-4 absolute
    _itc_check(m, _itc_inputs(N, D), 0.4, tol=dict(atol=1e-3, rtol=2e-4))
    assert m.temp.item() == pytest.approx(0.001)
    with pytest.raises(ValueError, match="alpha"):
        m(*_itc_inputs(N, D), alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        ITCLoss(D, queue_size=K, alpha=-0.1)
    with pytest.raises(ValueError, match="text_feat_m"):
        m(*_itc_inputs(N, D)[:3], _unit(N - 1, D))
    with pytest.raises(ValueError, match="queue_size"):
        m(*_itc_inputs(5, D))
    with pytest.raises(TypeError, match="idx"):
        m(*_itc_inputs(N, D), idx=torch.zeros(N))
    with pytest.raises(ValueError, match="idx"):
        m(*_itc_inputs(N, D), idx=torch.zeros(N + 1, dtype=torch.long))


def test_itc_blip_ids():
    D, K, N = 16, 16, 4
    m = ITCLoss(D, queue_size=K, alpha=0.4)
    ids = [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 2, 5, 0]).view(-1, 1), torch.tensor([5, 6, 0, 2]),
           torch.tensor([7, 7, 7, 1])]
    for step, idx in enumerate(ids):
        ptr = int(m.queue_ptr)
        before = m.idx_queue.clone()
        _itc_check(m, _itc_inputs(N, D), 0.4, idx=idx)
        assert torch.equal(m.idx_queue[ptr:ptr + N], idx.view(-1))
        assert torch.equal(m.idx_queue[N * (step + 1):], before[N * (step + 1):])  # -100 beyond
    assert int(m.queue_ptr) == 0


def test_itc_state_dict_and_albef_layout():
    D, K = 8, 16
    a = ITCLoss(D, queue_size=K)
    a(*_itc_inputs(4, D), idx=torch.arange(4))
    sd = a.state_dict()
    assert set(sd) == {"temp", "image_queue", "text_queue", "idx_queue", "queue_ptr"}
    b = ITCLoss(D, queue_size=K)
    b.load_state_dict(sd)
    for n in sd:
        assert torch.equal(b.state_dict()[n], sd[n]), n
    albef = {"temp": torch.tensor(0.05), "image_queue": F.normalize(torch.randn(D, K), dim=0),
             "text_queue": F.normalize(torch.randn(D, K), dim=0), "idx_queue": torch.full((1, K), -100),
             "queue_ptr": torch.tensor([8])}
    c = ITCLoss(D, queue_size=K)
    c.load_state_dict(albef)
    assert torch.equal(c.image_queue, albef["image_queue"].t()) and torch.equal(c.text_queue, albef["text_queue"].t())
    assert c.idx_queue.shape == (K,) and int(c.queue_ptr) == 8 and c.temp.item() == pytest.approx(0.05)


# ---------------------------------------------------------------- the fused switch
def test_moco_v3_loss_matches_moco_v3_and_fused_flag(count_calls):
    q, k = torch.randn(6, 8), torch.randn(6, 8)  # normalized inside, as moco-v3's contrastive_loss
    op, ref = count_calls(vc, "contrastive_loss"), count_calls(vc, "moco_v3_loss_reference")
    m = MoCoV3Loss(0.2)
    qf = q.clone().requires_grad_()
    fused = m(qf, k)
    m.fused = False
    qe = q.clone().requires_grad_()
    eager = m(qe, k)
    assert (len(op), len(ref)) == (1, 1) and fused.dtype == torch.float32
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    assert torch.equal(eager, moco_v3_loss_reference(qn, kn, 0.2))
    # moco-v3: CE(q k^T / T, arange) * 2T; the generic oracle agrees
    assert_close(eager, 0.4 * contrastive_loss_reference(qn.double(), kn.double(), 5.0))
    assert_close(fused, eager)
    (fused + eager).backward()
    assert_close(qf.grad, qe.grad, grad=True)
    assert "temperature=0.2" in repr(m)
    for kw, exc in ((dict(temperature=0.0), ValueError), (dict(temperature="1"), TypeError),
                    (dict(fused=1), TypeError)):
        with pytest.raises(exc, match=next(iter(kw))):
            MoCoV3Loss(**kw)
    with pytest.raises(TypeError, match="k"):
        MoCoV3Loss(fused=False)(q, k.double())
    with pytest.raises(ValueError, match="k"):
        MoCoV3Loss(fused=False)(q, torch.randn(6, 7))


def test_clip_siglip_fused_flag(count_calls):
    img, txt = _unit(6, 8), _unit(6, 8)
    scale, bias = torch.tensor(5.0), torch.tensor(-1.0)
    calls = {n: count_calls(vc, n) for n in ("clip_loss", "siglip_loss", "clip_loss_reference",
                                                  "siglip_loss_reference")}
    clip, sig = ClipLoss(), SigLipLoss()
    fused = clip(img, txt, scale), sig(img, txt, scale, bias)
    assert {n: len(c) for n, c in calls.items()} == {"clip_loss": 1, "siglip_loss": 1, "clip_loss_reference": 0,
                                                     "siglip_loss_reference": 0}
    clip.fused = sig.fused = False
    eager = clip(img, txt, scale, output_dict=True)["contrastive_loss"], sig(img, txt, scale, bias)
    assert {n: len(c) for n, c in calls.items()} == {"clip_loss": 1, "siglip_loss": 1, "clip_loss_reference": 1,
                                                     "siglip_loss_reference": 1}
    assert torch.equal(eager[0], clip_loss_reference(img, txt, scale))
    assert torch.equal(eager[1], siglip_loss_reference(img, txt, scale, bias))
    for f, e in zip(fused, eager):
        assert_close(f, e)
    # the eager path checks its inputs as the op does
    with pytest.raises(ValueError, match="text_features"):
        clip(img, _unit(5, 8), scale)
    with pytest.raises(TypeError, match="text_features"):
        sig(img, txt.double(), scale, bias)
    with pytest.raises(TypeError, match="logit_scale"):
        clip(img, txt, "10")
    with pytest.raises(TypeError, match="logit_bias"):
        sig(img, txt, scale, None)
    with pytest.raises(TypeError, match="fused"):
        SigLipLoss(fused="yes")


def test_moco_queue_loss_fused_flag(count_calls):
    D, K, N, T = 16, 32, 8, 0.2
    fused = MoCoQueueLoss(D, queue_size=K, temperature=T)
    eager = MoCoQueueLoss(D, queue_size=K, temperature=T, fused=False)
    eager.load_state_dict(fused.state_dict())
    op, ref = count_calls(vc, "contrastive_loss"), count_calls(vc, "moco_loss_reference")
    for _ in range(3):
        q, k = _unit(N, D), _unit(N, D)
        before = eager.queue.clone()
        qf, qe = q.clone().requires_grad_(), q.clone().requires_grad_()
        lf, le = fused(qf, k), eager(qe, k)
        (lf + le).backward()
        assert torch.equal(le.detach(), moco_loss_reference(q, k, before, T))
        assert_close(lf, le, msg="loss")
        assert_close(qf.grad, qe.grad, grad=True, msg="q grad")
        assert torch.equal(fused.queue, eager.queue) and torch.equal(fused.queue_ptr, eager.queue_ptr)
    assert (len(op), len(ref)) == (3, 3)
    assert "fused=False" in repr(eager)


def test_itc_fused_flag(count_calls):
    D, K, N = 16, 24, 8
    fused = ITCLoss(D, queue_size=K)
    eager = ITCLoss(D, queue_size=K, fused=False)
    eager.load_state_dict(fused.state_dict())
    op, ref = count_calls(vc, "contrastive_loss"), count_calls(vc, "albef_itc_reference")
    for idx in (None, torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), None):
        img, txt, img_m, txt_m = _itc_inputs(N, D)
        xf, yf = _leaves(img, txt)
        xe, ye = _leaves(img, txt)
        lf = fused(xf, yf, img_m, txt_m, alpha=0.4, idx=idx)
        le = eager(xe, ye, img_m, txt_m, alpha=0.4, idx=idx)
        (lf + le).backward()
        assert_close(lf, le, msg="loss")
        for a, b, what in ((xf.grad, xe.grad, "image"), (yf.grad, ye.grad, "text"), (fused.temp.grad, eager.temp.grad,
                                                                                      "temp")):
            assert_close(a, b, grad=True, msg=f"{what} grad")
        for name, t in fused.state_dict().items():
            assert torch.equal(t, eager.state_dict()[name]), name
        fused.zero_grad(), eager.zero_grad()
    assert (len(op), len(ref)) == (6, 3)  # two contrastive_loss calls (i2t, t2i) per fused step


# ---------------------------------------------------------------- distributed (2 gloo processes)
def _grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def _dist_checks(rank, world):
    torch.manual_seed(0)  # identical global data on every rank
    N, D = 3, 8
    img, txt = _unit(world * N, D), _unit(world * N, D)
    scale, bias = torch.tensor(7.0), torch.tensor(-2.0)
    rows = slice(rank * N, (rank + 1) * N)

    def averaged(vals):
        out = []
        for v in vals:
            v = v.clone()
            dist.all_reduce(v)
            out.append(v / world)
        return out

    cases = {
        "clip": (lambda X, Y, s, b: clip_loss(X[rows], Y[rows], s),
                 lambda X, Y, s, b: clip_loss_reference(X, Y, s) + 0 * b),
        "ClipLoss": (lambda X, Y, s, b: ClipLoss(local_loss=True, gather_with_grad=True)(X[rows], Y[rows], s),
                     lambda X, Y, s, b: clip_loss_reference(X, Y, s) + 0 * b),
        "siglip": (lambda X, Y, s, b: siglip_loss(X[rows], Y[rows], s, b),
                   lambda X, Y, s, b: siglip_loss_reference(X, Y, s, b)),
        "SigLipLoss": (lambda X, Y, s, b: SigLipLoss()(X[rows], Y[rows], s, b),
                       lambda X, Y, s, b: siglip_loss_reference(X, Y, s, b)),
        # the eager formulas, gathered with their gradients as open_clip does
        "ClipLoss(fused=False)": (lambda X, Y, s, b: ClipLoss(gather=True, fused=False)(X[rows], Y[rows], s),
                                  lambda X, Y, s, b: clip_loss_reference(X, Y, s) + 0 * b),
        "SigLipLoss(fused=False)": (lambda X, Y, s, b: SigLipLoss(fused=False)(X[rows], Y[rows], s, b),
                                    lambda X, Y, s, b: siglip_loss_reference(X, Y, s, b)),
    }
    for name, (local_fn, global_fn) in cases.items():
        got = averaged(_grads_of(local_fn, img, txt, scale, bias))
        want = _grads_of(global_fn, img.double(), txt.double(), scale.double(), bias.double())
        for g, w, what in zip(got, want, ("loss", "image grad", "text grad", "logit_scale grad", "logit_bias grad")):
            assert_close(g, w, msg=f"rank {rank} {name} {what}")
    # without gather: the local loss of the local rows only
    loc = clip_loss(img[rows], txt[rows], scale, gather=False)
    assert_close(loc, clip_loss_reference(img[rows].double(), txt[rows].double(), 7.0), msg="local loss")

    # MoCo: the queue receives the keys of both ranks, in rank order (fused and eager)
    for fused in (True, False):
        torch.manual_seed(1)
        moco = MoCoQueueLoss(D, queue_size=4 * world * N, temperature=0.2, fused=fused)
        q, k = _unit(world * N, D), _unit(world * N, D)
        before = moco.queue.clone()
        loss = moco(q[rows], k[rows])
        assert_close(loss, moco_loss_reference(q[rows].double(), k[rows].double(), before.double(), 0.2),
                     msg=f"MoCo loss fused={fused}")
        assert torch.equal(moco.queue[:world * N], k), f"rank {rank}: MoCo queue lacks the keys of every rank"
        assert torch.equal(moco.queue[world * N:], before[world * N:])
        assert int(moco.queue_ptr) == world * N

    # ITC: momentum features and ids of both ranks
    itc = ITCLoss(D, queue_size=2 * world * N)
    im, tm = _unit(world * N, D), _unit(world * N, D)
    idx = torch.arange(world * N) + 10
    itc(img[rows], txt[rows], im[rows], tm[rows], idx=idx[rows])
    assert torch.equal(itc.image_queue[:world * N], im) and torch.equal(itc.text_queue[:world * N], tm)
    assert torch.equal(itc.idx_queue[:world * N], idx) and int(itc.queue_ptr) == world * N

    # ITC with gather=True (fused and ALBEF's eager formula): the ranks' mean loss and averaged
    # gradients equal one process's on the global batch; the queues get every rank's keys
    im, tm = _unit(world * N, D), _unit(world * N, D)
    for ids in (None, torch.arange(world * N) % 2 + 5):
        for fused in (True, False):
            torch.manual_seed(3)  # same queues on every rank
            mod = ITCLoss(D, queue_size=2 * world * N, gather=True, fused=fused)
            iq, tq, idq = mod.image_queue.clone(), mod.text_queue.clone(), mod.idx_queue.clone()
            x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
            loss = mod(x[rows], y[rows], im[rows], tm[rows], alpha=0.4, idx=None if ids is None else ids[rows])
            loss.backward()
            got = averaged([loss.detach(), x.grad, y.grad, mod.temp.grad])
            xr, yr = img.double().requires_grad_(), txt.double().requires_grad_()
            tr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
            ref = albef_itc_reference(xr, yr, im.double(), tm.double(), iq.double(), tq.double(), tr, 0.4,
                                      idx=ids, idx_queue=None if ids is None else idq)
            ref.backward()
            for g, w, what in zip(got, (ref.detach(), xr.grad, yr.grad, tr.grad),
                                  ("loss", "image grad", "text grad", "temp grad")):
                assert_close(g, w, msg=f"rank {rank} ITC gather fused={fused} ids={ids}: {what}")
            assert torch.equal(mod.image_queue[:world * N], im) and torch.equal(mod.text_queue[:world * N], tm)

    # unequal row counts across ranks: a clear ValueError on every rank
    with pytest.raises(ValueError, match="same shape"):
        all_gather_with_grad(torch.zeros(2 + rank, D))
    assert world_info() == (rank, world)


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_gloo_two_ranks_match_single_process():
    run_gloo_ranks(_dist_checks, world=2, timeout=150)


class _NoDeepcopy:
    """Stands in for a torch.distributed ProcessGroup, which copy.deepcopy cannot copy."""

    def __deepcopy__(self, memo):
        raise RuntimeError("cannot deep-copy a process group")


def test_itc_deepcopy_keeps_group_by_reference():
    import copy

    from vlfast.nn import EMA, MomentumEncoder

    itc = ITCLoss(8, queue_size=16, gather=True)
    itc.group = _NoDeepcopy()
    c = copy.deepcopy(itc)
    assert c.group is itc.group and c.gather is True and c.dim == 8
    assert c.temp is not itc.temp and torch.equal(c.temp, itc.temp) and isinstance(c.temp, torch.nn.Parameter)
    for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        a, b = getattr(c, name), getattr(itc, name)
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        c.temp.fill_(0.3)
    assert itc.temp.item() != pytest.approx(0.3)
    # the load hook (ALBEF's layout) still works on the copy, and is bound to the copy
    sd = {k: v.clone() for k, v in itc.state_dict().items()}
    sd["image_queue"] = sd["image_queue"].t().contiguous()
    c.load_state_dict(sd)
    assert torch.equal(c.image_queue, itc.image_queue)
    # models holding it: EMA / MomentumEncoder deep-copy them
    outer = torch.nn.Sequential(torch.nn.Linear(8, 8), itc)
    c2 = copy.deepcopy(outer)
    assert c2[1].group is itc.group and c2[1] is not itc
    assert MomentumEncoder(outer).module[1].group is itc.group
    assert EMA(outer).module[1].group is itc.group
    plain = ITCLoss(8, queue_size=16)
    assert copy.deepcopy(plain).group is None
