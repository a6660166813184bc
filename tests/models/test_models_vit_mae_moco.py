"""ViT, MAE and MoCo v3 reference models: registry, parameter counts and names (timm / MAE /
moco-v3), eager vs fused parity (loss and gradients), convergence and input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.models import create, list_models, set_fused

VIT = ["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "vit_micro"]
MAE = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_micro"]
MOCO = ["moco_v3_vit_small", "moco_v3_vit_base", "moco_v3_micro"]
MICRO = ["vit_micro", "mae_micro", "moco_v3_micro"]


def _meta(name, **kw):
    with torch.device("meta"):
        return create(name, **kw)


def _count(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# ----------------------------------------------------------------------------- hand-written counts
def _block(d):  # norm1, qkv, proj, norm2, fc1, fc2 (mlp_ratio 4)
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)


def _vit(d, depth, patch, classes=1000, img=224):
    n = (img // patch) ** 2
    head = d * classes + classes if classes else 0
    return (3 * patch * patch * d + d) + d + (n + 1) * d + depth * _block(d) + 2 * d + head


def _mae(d, depth, patch, dd=512, ddepth=8, img=224):
    n = (img // patch) ** 2
    dec = ((d * dd + dd) + dd + (n + 1) * dd + ddepth * _block(dd) + 2 * dd
           + (dd * patch * patch * 3 + patch * patch * 3))
    return _vit(d, depth, patch, classes=0, img=img) + dec


def _moco_parts(d, dim=256, mlp=4096):
    proj = d * mlp + 2 * mlp + mlp * mlp + 2 * mlp + mlp * dim  # last BN has no affine
    pred = dim * mlp + 2 * mlp + mlp * dim
    return proj, pred


def test_hand_counts_agree_with_literals():
    assert _vit(768, 12, 16) == 86_567_656
    assert _vit(384, 12, 16) == 22_050_664
    assert _vit(1024, 24, 16) == 304_326_632
    assert _vit(1280, 32, 14) == 632_045_800
    assert _mae(768, 12, 16) == 111_907_840


def test_registry_and_create():
    names = list_models()
    for n in VIT + MAE + MOCO:
        assert n in names
    m = create("vit_micro", num_classes=7)
    assert m.head.out_features == 7 and all(a.fused for a in m.modules() if hasattr(a, "fused"))
    m = create("mae_micro", fused=False, norm_pix_loss=True)
    assert m.norm_pix_loss and not m.masking.fused and not m.unshuffle.fused
    m = create("moco_v3_micro", fused=False)
    assert not m.criterion.fused and not m.momentum_encoder.fused
    set_fused(m, True)
    assert m.criterion.fused and m.momentum_encoder.fused


@pytest.mark.parametrize("name,count", [
    ("vit_small_patch16_224", 22_050_664), ("vit_base_patch16_224", 86_567_656),
    ("vit_large_patch16_224", 304_326_632),
    # timm's ViT-H/14 with a 1000-class head: 630,764,800 + 1,281,000 (the 632,199,400 of the brief is off)
    ("vit_huge_patch14_224", 632_045_800)])
def test_vit_param_counts(name, count):
    assert _count(_meta(name)) == count


@pytest.mark.parametrize("name,count,frozen", [
    ("mae_vit_base_patch16", 111_907_840, 197 * (768 + 512)),
    ("mae_vit_large_patch16", 329_541_888, 197 * (1024 + 512)),
    ("mae_vit_huge_patch14", 657_074_508, 257 * (1280 + 512))])
def test_mae_param_counts(name, count, frozen):
    m = _meta(name)
    assert _count(m) == count
    assert _count(m, trainable=True) == count - frozen  # fixed sin-cos pos_embed / decoder_pos_embed
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert m.norm_pix_loss is False


def test_mae_counts_by_formula():
    assert _mae(1024, 24, 16) == 329_541_888
    assert _mae(1280, 32, 14) == 657_074_508


@pytest.mark.parametrize("name,d,total,trainable", [
    ("moco_v3_vit_small", 384, 84_266_752, 43_110_400),
    ("moco_v3_vit_base", 768, 215_678_464, 108_740_608)])
def test_moco_param_counts(name, d, total, trainable):
    proj, pred = _moco_parts(d)
    base = _vit(d, 12, 16, classes=0) + proj
    assert 2 * base + pred == total
    assert base - 197 * d + pred == trainable  # pos_embed frozen; momentum encoder frozen
    m = _meta(name)
    assert _count(m) == total and _count(m, trainable=True) == trainable
    assert m.base_encoder.blocks[0].attn.num_heads == 12  # MoCo v3's ViT-S has 12 heads
    assert m.T == 0.2 and m.momentum == 0.99


# ----------------------------------------------------------------------------- names
def _block_keys(prefix, i):
    return [f"{prefix}{i}.{k}" for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                           "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                           "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]


def _vit_keys(depth, prefix="", head=True):
    keys = [prefix + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")]
    for i in range(depth):
        keys += _block_keys(prefix + "blocks.", i)
    keys += [prefix + "norm.weight", prefix + "norm.bias"]
    if head:
        keys += [prefix + "head.weight", prefix + "head.bias"]
    return keys


def test_vit_timm_keys():
    sd = _meta("vit_base_patch16_224").state_dict()
    assert list(sd) == _vit_keys(12)
    assert sd["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert sd["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert sd["pos_embed"].shape == (1, 197, 768) and sd["head.weight"].shape == (1000, 768)
    assert _meta("vit_huge_patch14_224").state_dict()["pos_embed"].shape == (1, 257, 1280)


def test_mae_keys():
    sd = _meta("mae_vit_base_patch16").state_dict()
    expected = set(_vit_keys(12, head=False))
    expected |= {"decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
                 "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    for i in range(8):
        expected |= set(_block_keys("decoder_blocks.", i))
    assert set(sd) == expected
    assert sd["decoder_pred.weight"].shape == (768, 512)
    assert sd["mask_token"].shape == (1, 1, 512) and sd["decoder_pos_embed"].shape == (1, 197, 512)


def _mlp_keys(prefix, n_layers):
    keys = []
    for i in range(n_layers):
        keys.append(f"{prefix}{3 * i}.weight")
        bn = f"{prefix}{3 * i + 1}."
        stats = ["running_mean", "running_var", "num_batches_tracked"]
        keys += [bn + s for s in (["weight", "bias"] + stats if i < n_layers - 1 else stats)]
    return keys


def test_moco_v3_keys():
    sd = _meta("moco_v3_vit_base").state_dict()
    enc = _vit_keys(12, head=False) + _mlp_keys("head.", 3)
    expected = (["base_encoder." + k for k in enc] + ["momentum_encoder." + k for k in enc]
                + _mlp_keys("predictor.", 2))
    assert set(sd) == set(expected)
    for k in ("base_encoder.head.6.weight", "momentum_encoder.blocks.11.attn.qkv.weight",
              "predictor.0.weight", "predictor.4.running_var", "base_encoder.head.7.running_mean"):
        assert k in sd
    assert sd["base_encoder.head.0.weight"].shape == (4096, 768)
    assert sd["predictor.3.weight"].shape == (256, 4096)
    assert "base_encoder.head.7.weight" not in sd  # last BN without affine


@pytest.mark.parametrize("name", MICRO)
def test_micro_state_dict_roundtrip(name):
    a = create(name)
    a.train()
    if name == "moco_v3_micro":  # make BN statistics and the momentum copy non-trivial
        a(**a.synthetic_batch(4, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(1)
    b = create(name)
    b.load_state_dict(a.state_dict(), strict=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_moco_loads_wrapped_keys():
    a = create("moco_v3_micro")
    wrapped = {k.replace("momentum_encoder.", "momentum_encoder.module.", 1): v for k, v in a.state_dict().items()}
    b = create("moco_v3_micro")
    b.load_state_dict(wrapped, strict=True)
    assert torch.equal(b.momentum_encoder.module.cls_token, a.momentum_encoder.module.cls_token)


# ----------------------------------------------------------------------------- fixed embeddings
def test_mae_sincos_layout():
    m = create("mae_micro")  # 64-dim, 4x4 grid
    D, omega = 64, 1.0 / 10000 ** (torch.arange(16, dtype=torch.float64) / 16)
    pe = m.pos_embed[0].double()
    assert torch.equal(pe[0], torch.zeros(D, dtype=torch.float64))
    r, c = 2, 3
    tok = pe[1 + r * 4 + c]
    torch.testing.assert_close(tok[:16], torch.sin(c * omega), atol=1e-6, rtol=0)  # first half: column
    torch.testing.assert_close(tok[32:48], torch.sin(r * omega), atol=1e-6, rtol=0)  # second half: row
    assert m.decoder_pos_embed.shape == (1, 17, 32) and not m.decoder_pos_embed.requires_grad


def test_mae_mask_ratio_and_unpatchify():
    m = create("mae_micro")
    imgs = m.synthetic_batch(3, generator=torch.Generator().manual_seed(0))["images"]
    out = m(imgs, mask_ratio=0.5)
    assert out["mask"].shape == (3, 16) and torch.equal(out["mask"].sum(1), torch.full((3,), 8.0))
    assert m.masking.mask_ratio == 0.75
    assert m(imgs)["mask"].sum().item() == 3 * 12
    torch.testing.assert_close(m.unpatchify(m.patchify(imgs)), imgs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        m(imgs, mask_ratio=1.0)


# ----------------------------------------------------------------------------- parity
def _loss(model, name, batch):
    out = model(**batch)
    if name.startswith("vit"):
        return F.cross_entropy(out, batch["labels"]), out
    return out["loss"], out


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name,kw", [("vit_micro", {}), ("mae_micro", {}), ("mae_micro", {"norm_pix_loss": True}),
                                     ("moco_v3_micro", {})])
def test_parity_eager_fused(name, kw):
    eager = create(name, fused=False, **kw)
    fused = create(name, fused=True, **kw)
    fused.load_state_dict(eager.state_dict())
    batch = eager.synthetic_batch(8, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)
    le, oe = _loss(eager, name, batch)
    torch.manual_seed(11)
    lf, of = _loss(fused, name, batch)
    assert abs(le.item() - lf.item()) <= 1e-5, (le.item(), lf.item())
    if name == "mae_micro":
        assert torch.equal(oe["mask"], of["mask"])
    le.backward()
    lf.backward()
    pairs = list(zip(eager.named_parameters(), fused.named_parameters()))
    scale = max(pe.grad.norm().item() for (_, pe), _ in pairs if pe.grad is not None)
    n_grads = 0
    for (n, pe), (_, pf) in pairs:
        if pe.grad is None:
            assert pf.grad is None, n
            continue
        n_grads += 1
        # 1e-4 relative; the floor (1e-6 of the largest gradient) is for gradients that are zero
        # analytically and rounding noise numerically: MoCo's base_encoder.norm.bias (a constant
        # shift that the projector's BatchNorm removes) has |grad| ~ 1e-7 in both modes
        err = (pf.grad - pe.grad).norm().item()
        assert err <= 1e-4 * pe.grad.norm().item() + 1e-6 * scale, (n, _rel(pf.grad, pe.grad))
    assert n_grads > 10
    # the momentum update and BN statistics agree too
    for (k, ve), (_, vf) in zip(eager.state_dict().items(), fused.state_dict().items()):
        if ve.is_floating_point():
            torch.testing.assert_close(vf, ve, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(vf, ve), k


# ----------------------------------------------------------------------------- convergence
def _train(model, name, batches, seeds):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch, s in zip(batches, seeds):
        torch.manual_seed(s)
        loss, _ = _loss(model, name, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name", MICRO)
def test_convergence_eager_vs_fused(name):
    torch.manual_seed(0)
    eager = create(name, fused=False)
    fused = create(name, fused=True)
    fused.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(2024)
    batches = [eager.synthetic_batch(16, generator=g) for _ in range(30)]
    seeds = list(range(100, 130))
    le = _train(eager, name, batches, seeds)
    lf = _train(fused, name, batches, seeds)
    assert all(math.isfinite(x) for x in le + lf)
    # ViT and MAE: every step within 1e-3 relative.  MoCo v3 (BatchNorm MLP heads, InfoNCE at
    # T = 0.2, momentum keys) is chaotic under AdamW at this size: in the eager model alone, a
    # 1e-6 relative change of ONE predictor weight moves the step-30 loss by up to 8e-2 relative
    # (batch 8..64 alike), so rounding-level eager/fused differences (~5e-6 relative in the
    # gradients, see test_parity_eager_fused) grow the same way after ~10 steps.  There the
    # first 8 steps are held to 1e-3 and the run to the mean of its last 5 losses within 2e-2.
    strict = 8 if name == "moco_v3_micro" else len(le)
    for i, (a, b) in enumerate(zip(le[:strict], lf[:strict])):
        assert abs(a - b) <= 1e-3 * abs(a), (i, a, b)
    tail_e, tail_f = sum(le[-5:]) / 5, sum(lf[-5:]) / 5
    assert abs(tail_e - tail_f) <= 2e-2 * tail_e, (le, lf)
    for losses in (le, lf):
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", MICRO)
def test_bad_image_shapes(name):
    m = create(name)
    good = torch.randn(2, 3, 32, 32)
    for bad, msg in ((torch.randn(2, 3, 64, 64), "32x32"), (torch.randn(2, 1, 32, 32), "3 channels")):
        with pytest.raises(ValueError, match=msg):
            if name == "moco_v3_micro":
                m(bad, bad)
            else:
                m(bad)
    m(*((good, good) if name == "moco_v3_micro" else (good,)))


def test_moco_mismatched_views():
    m = create("moco_v3_micro")
    with pytest.raises(ValueError, match="same shape"):
        m(torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32))


def test_moco_eval_does_not_update_momentum():
    m = create("moco_v3_micro")
    before = m.momentum_encoder.module.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        m.base_encoder.blocks[0].attn.qkv.weight.add_(1.0)
    m.eval()
    x = torch.randn(4, 3, 32, 32)
    m(x, x)
    assert torch.equal(m.momentum_encoder.module.blocks[0].attn.qkv.weight, before)
    m(x, x, m=0.5)
    torch.testing.assert_close(m.momentum_encoder.module.blocks[0].attn.qkv.weight,
                               0.5 * before + 0.5 * m.base_encoder.blocks[0].attn.qkv.weight)
