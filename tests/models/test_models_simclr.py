"""SimCLR reference models: registry, parameter counts and names (timm's ViT-S/16 backbone, SimCLR v2's
projection head), strict loading of timm's backbone, eager vs fused parity (loss and every gradient, the
fused NT-Xent on the torch and the Triton backend), convergence, NTXentLoss, bad input and ``vlfast train``."""

import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import vlfast.nn.attention as va
import vlfast.nn.contrastive as vc
from vlfast.models import create, list_models, set_fused
from vlfast.models.simclr import BatchNorm1dNoCenter, build_projection_head
from vlfast.nn import NTXentLoss
from vlfast.reference import contrastive_loss_reference, ntxent_loss_reference
from vlfast.testing import assert_close

NAMES = ["simclr_vit_small", "simclr_micro"]


@pytest.fixture
def one_thread():
    """The micro model's ops are far too small for intra-op threads: on a busy 2-core machine two threads
    make a step ~20x slower than one.  Restored after the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _meta(name, **kw):
    with torch.device("meta"):
        return create(name, **kw)


def _count(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- counts and names
def _vit_no_head(d, depth, patch, img=224):
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return (3 * patch * patch * d + d) + d + ((img // patch) ** 2 + 1) * d + depth * block + 2 * d


def _projector(d, out=128):  # Linear(d, d) BN(d) | Linear(d, d) BN(d) | Linear(d, out) BN(out) gamma only
    return (d * d + 2 * d) + (d * d + 2 * d) + (d * out + out)


def test_registry_and_create():
    names = list_models()
    for n in NAMES:
        assert n in names
    m = create("simclr_micro", fused=False)
    assert not m.criterion.fused and not m.backbone.blocks[0].attn.fused
    set_fused(m, True)
    assert m.criterion.fused and m.backbone.blocks[0].attn.fused
    assert m.temperature == 0.1 and create("simclr_micro", temperature=0.5).criterion.temperature == 0.5
    assert "temperature=0.1" in repr(m.criterion)


def test_simclr_vit_small_count_and_timm():
    assert _vit_no_head(384, 12, 16) == 21_665_664
    assert _projector(384) == 345_728
    m = _meta("simclr_vit_small")
    assert _count(m.backbone) == 21_665_664 and _count(m.projector) == 345_728
    assert _count(m) == 22_011_392
    with torch.device("meta"):
        ref = timm.create_model("vit_small_patch16_224", num_classes=0)
    assert _count(ref) == 21_665_664
    ours, theirs = m.backbone.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
    assert m.backbone.blocks[0].attn.num_heads == 6


def test_projector_layout_simclr_v2():
    sd = _meta("simclr_vit_small").projector.state_dict()
    stats = ["running_mean", "running_var", "num_batches_tracked"]
    expected = (["0.weight"] + [f"1.{s}" for s in ["weight", "bias"] + stats]
                + ["3.weight"] + [f"4.{s}" for s in ["weight", "bias"] + stats]
                + ["6.weight"] + [f"7.{s}" for s in ["weight"] + stats])  # last BN: gamma, no beta
    assert list(sd) == expected
    assert sd["0.weight"].shape == (384, 384) and sd["3.weight"].shape == (384, 384)
    assert sd["6.weight"].shape == (128, 384) and sd["7.weight"].shape == (128,)
    head = build_projection_head(16, 8)
    assert [type(x).__name__ for x in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                                                "Linear", "BatchNorm1dNoCenter"]
    assert all(lin.bias is None for lin in head if isinstance(lin, torch.nn.Linear))
    assert 0.005 < head[0].weight.std().item() < 0.02  # N(0, 0.01^2), SimCLR's RandomNormal(stddev=0.01)
    bn = BatchNorm1dNoCenter(5)
    x = torch.randn(7, 5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5) + 0.5)
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, bn.weight, None, True, 0.0, 1e-5))
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.ones(5)) and bn.bias is None


@pytest.mark.parametrize("fused", [False, True])
def test_timm_backbone_loads_strictly_and_matches(fused):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    ref = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0).eval()
    m = create("simclr_micro", fused=fused).eval()
    m.backbone.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(m.encode(x), ref(x))


def test_state_dict_roundtrip():
    a = create("simclr_micro")
    a.train()
    a(**a.synthetic_batch(4, generator=torch.Generator().manual_seed(3)))  # non-trivial BN statistics
    torch.manual_seed(1)
    b = create("simclr_micro", fused=False)
    b.load_state_dict(a.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# ----------------------------------------------------------------------------- parity
def _grads_of(model, batch):
    out = model(**batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parity_eager_fused(backend, monkeypatch, one_thread):
    """The loss and every parameter gradient, eager (materialized 2N x 2N logits, eager attention)
    vs fused (vlfast.ops.contrastive_loss with exclude_diagonal on the given backend, fused attention);
    the calls counted prove which path ran.  N = 7 images: 14 views."""
    calls = {"op": 0, "ref": 0, "attn": 0, "attn_ref": 0}
    for mod, name, key in ((vc, "contrastive_loss", "op"), (vc, "ntxent_loss_reference", "ref"),
                           (va, "attention", "attn"), (va, "attention_reference", "attn_ref")):
        real = getattr(mod, name)

        def counting(*a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, counting)
    eager = create("simclr_micro", fused=False)
    fused = create("simclr_micro", fused=True)
    fused.load_state_dict(eager.state_dict())
    fused.criterion.backend = backend
    batch = eager.synthetic_batch(7, generator=torch.Generator().manual_seed(7))
    oe, ge = _grads_of(eager, batch)
    assert calls == {"op": 0, "ref": 1, "attn": 0, "attn_ref": 2}
    of, gf = _grads_of(fused, batch)
    assert calls == {"op": 1, "ref": 1, "attn": 2, "attn_ref": 2}
    assert of["loss"].dtype == torch.float32 and torch.equal(of["ntxent"], of["loss"].detach())
    assert abs(oe["loss"].item() - of["loss"].item()) <= 1e-5, (oe["loss"].item(), of["loss"].item())
    assert set(ge) == set(gf) == {n for n, p in eager.named_parameters()}
    scale = max(g.norm().item() for g in ge.values())
    for n in ge:
        err = (gf[n] - ge[n]).norm().item()
        assert err <= 1e-4 * ge[n].norm().item() + 1e-6 * scale, (n, err, ge[n].norm().item())
    for (k, ve), (_, vf) in zip(eager.state_dict().items(), fused.state_dict().items()):  # BN statistics
        assert_close(vf, ve, msg=k) if ve.is_floating_point() else None


# ----------------------------------------------------------------------------- convergence
@pytest.mark.slow
def test_convergence_eager_vs_fused(one_thread):
    torch.manual_seed(0)
    eager = create("simclr_micro", fused=False)
    fused = create("simclr_micro", fused=True)
    fused.load_state_dict(eager.state_dict())
    batch = eager.synthetic_batch(8, generator=torch.Generator().manual_seed(2024))
    runs = []
    for model in (eager, fused):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(30):
            loss = model(**batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append(losses)
    le, lf = runs
    assert all(math.isfinite(x) for x in le + lf)
    for i, (a, b) in enumerate(zip(le[:10], lf[:10])):
        assert abs(a - b) <= 1e-3 * abs(a) + 1e-5, (i, a, b)
    for losses in runs:
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


# ----------------------------------------------------------------------------- NTXentLoss
def _simclr_tf2_loss(z1, z2, T):
    """google-research/simclr tf2/objective.py add_contrastive_loss, transcribed (single replica)."""
    h1, h2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    n = h1.shape[0]
    labels = F.one_hot(torch.arange(n), 2 * n).to(h1.dtype)
    masks = F.one_hot(torch.arange(n), n).to(h1.dtype)
    aa, bb = h1 @ h1.T / T - masks * 1e9, h2 @ h2.T / T - masks * 1e9
    ab, ba = h1 @ h2.T / T, h2 @ h1.T / T
    loss_a = -(labels * torch.log_softmax(torch.cat([ab, aa], 1), 1)).sum(1)
    loss_b = -(labels * torch.log_softmax(torch.cat([ba, bb], 1), 1)).sum(1)
    return (loss_a + loss_b).mean()


@pytest.mark.parametrize("N", [1, 5, 64])
def test_ntxent_matches_simclr_objective(N):
    z1, z2 = torch.randn(N, 24, dtype=torch.float64), torch.randn(N, 24, dtype=torch.float64)
    ref = ntxent_loss_reference(z1, z2, 0.1)
    torch.testing.assert_close(2 * ref, _simclr_tf2_loss(z1, z2, 0.1))  # simclr reports the sum of both halves
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    pos = (torch.arange(2 * N) + N) % (2 * N)
    torch.testing.assert_close(ref, contrastive_loss_reference(z, z, 10.0, positives=pos, exclude_diagonal=True))
    a, b = z1.float().requires_grad_(), z2.float().requires_grad_()
    got = NTXentLoss(0.1)(a, b)
    got.backward()
    ra, rb = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ntxent_loss_reference(ra, rb, 0.1).backward()
    assert_close(got, ref)
    assert_close(a.grad, ra.grad, grad=True)
    assert_close(b.grad, rb.grad, grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ntxent_half(dtype):
    z1, z2 = torch.randn(9, 32), torch.randn(9, 32)
    got = NTXentLoss(0.5)(z1.to(dtype), z2.to(dtype))
    assert got.dtype == torch.float32
    assert_close(got, ntxent_loss_reference(z1.to(dtype).double(), z2.to(dtype).double(), 0.5), dtype)


def test_ntxent_bad_input():
    loss = NTXentLoss()
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(TypeError, match="fused"):
        NTXentLoss(fused=1)
    with pytest.raises(ValueError, match="z1 and z2"):
        loss(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="z2 has feature dim 7"):
        loss(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(TypeError, match="z2"):
        loss(torch.randn(4, 8), torch.randn(4, 8).double())
    with pytest.raises(ValueError, match=r"z1 must have shape \(N, D\)"):
        loss(torch.randn(8), torch.randn(8))


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    m = create("simclr_micro")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="same shape"):
        m(x, torch.randn(3, 3, 32, 32))
    with pytest.raises(TypeError, match="x2"):
        m(x, x.numpy())
    with pytest.raises(TypeError, match="x1 must be a floating-point"):
        m(x.long(), x.long())
    with pytest.raises(ValueError, match="32x32"):
        m(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="batch_size"):
        m.synthetic_batch(0)
    out = m(x, x)
    assert out["loss"].dim() == 0 and math.isfinite(out["loss"].item())


def test_synthetic_batch_is_deterministic_two_views():
    m = create("simclr_micro")
    a = m.synthetic_batch(5, generator=torch.Generator().manual_seed(1))
    b = m.synthetic_batch(5, generator=torch.Generator().manual_seed(1))
    assert set(a) == {"x1", "x2"} and a["x1"].shape == (5, 3, 32, 32) and a["x1"].dtype == torch.float32
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the views of one image are nearer than views of different images
    f1, f2 = F.normalize(a["x1"].flatten(1), dim=1), F.normalize(a["x2"].flip(-1).flatten(1), dim=1)
    sim = f1 @ f2.T
    assert (sim.diagonal() > sim.masked_fill(torch.eye(5, dtype=torch.bool), -2).max(1).values).all()


# ----------------------------------------------------------------------------- vlfast train
def test_vlfast_train_simclr_micro(tmp_path, one_thread):
    from vlfast.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--model", "simclr_micro", "--steps", "2", "--batch-size", "4", "--out", out,
                 "--no-progress"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    sd = torch.load(os.path.join(out, "checkpoints", "step_2", "model.pt"), map_location="cpu", weights_only=True)
    assert "projector.7.weight" in sd and "projector.7.bias" not in sd and "backbone.blocks.1.attn.qkv.weight" in sd
