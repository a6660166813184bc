"""DINO reference model (vlfast.models.dino): counts and names (timm / facebookresearch/dino), timm
strict load and features, position-embedding interpolation, DINO's head / loss / schedules against
copies of DINO's code, eager vs fused parity, convergence, resume, multi-crop, bad input, `vlfast train`."""

import copy
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed as timm_resample
from torch import nn

import vlfast.nn.attention as attn_mod
import vlfast.nn.ema as ema_mod
from vlfast.models import create, list_models, set_fused
from vlfast.models.dino import DINOHead, DINOLoss, convert_dino_checkpoint, multi_crop, random_resized_crop
from vlfast.models.layers import resample_abs_pos_embed
from vlfast.nn import Attention, MomentumEncoder
from vlfast.testing import assert_close

# the reference DINOHead is DINO's, on torch.nn.utils.weight_norm (deprecated, still DINO's checkpoint names)
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Micro-sized ops: intra-op threads only add spin-waits on a busy 2-core host."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n(module, trainable=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _micro(seed=0, **kw):
    torch.manual_seed(seed)
    return create("dino_micro", **kw)


def _images(m, n=4, seed=0):
    return m.synthetic_batch(n, generator=torch.Generator().manual_seed(seed))["images"]


# ----------------------------------------------------------------------------------- DINO's code (reference)
class RefDINOHead(nn.Module):
    """facebookresearch/dino vision_transformer.py DINOHead, verbatim but for trunc_normal_'s module."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x


def ref_dino_loss(student_output, teacher_output, center, temp, ncrops, student_temp=0.1, center_momentum=0.9):
    """main_dino.py DINOLoss.forward + update_center (one process): (loss, new center)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total_loss, center * center_momentum + batch_center * (1 - center_momentum)


def ref_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ----------------------------------------------------------------------------------- registry, counts, names
def _head_count(d, out=65536, hidden=2048, bottleneck=256, nlayers=3):
    mlp = d * hidden + hidden + (nlayers - 2) * (hidden * hidden + hidden) + hidden * bottleneck + bottleneck
    return mlp + bottleneck * out + out  # last_layer: weight_v + weight_g


def test_registered_and_set_fused():
    assert {"dino_vit_small", "dino_micro"} <= set(list_models())
    m = create("dino_micro", fused=False)
    flags = [x.fused for x in m.modules() if isinstance(getattr(x, "fused", None), bool)]
    assert len(flags) >= 2 * 2 + 2 and not any(flags)  # 2 student + 2 teacher attentions, loss, momentum
    assert not m.dino_loss.fused and not m.teacher.fused
    set_fused(m, True)
    assert m.dino_loss.fused and m.teacher.fused and all(a.fused for a in m.modules() if isinstance(a, Attention))


def test_counts_vit_small():
    with torch.device("meta"):
        m = create("dino_vit_small")
        ref_bb = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        ref_head = RefDINOHead(384, 65536)
    assert _n(ref_bb) == 21_665_664 == _n(m.student.backbone)
    assert _head_count(384) == 22_352_128 == _n(ref_head) == _n(m.student.head)
    assert _n(m.student) == 44_017_792 and _n(m.student, trainable=True) == 44_017_792 - 65536
    assert _n(m) == 2 * 44_017_792 and _n(m, trainable=True) == 44_017_792 - 65536  # teacher frozen
    assert not m.student.head.last_layer.weight_g.requires_grad
    assert m.student.backbone.blocks[0].attn.num_heads == 6 and len(m.student.backbone.blocks) == 12
    assert m.local_crops_number == 8 and m.img_size == (224, 224) and m.local_size == (96, 96)
    assert m.momentum_teacher == 0.996 and m.dino_loss.student_temp == 0.1 and m.dino_loss.center_momentum == 0.9


def test_state_dict_names_are_dino_and_timm():
    with torch.device("meta"):
        m = create("dino_vit_small")
        ref_bb = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        ref_head = RefDINOHead(384, 65536)
    sd = m.state_dict()
    bb = {k: tuple(v.shape) for k, v in ref_bb.state_dict().items()}
    hd = {k: tuple(v.shape) for k, v in ref_head.state_dict().items()}
    expected = {}
    for part in ("student", "teacher"):
        expected.update({f"{part}.backbone.{k}": s for k, s in bb.items()})
        expected.update({f"{part}.head.{k}": s for k, s in hd.items()})
    expected["dino_loss.center"] = (1, 65536)
    expected["global_step"] = ()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert list(m.student.head.state_dict()) == list(ref_head.state_dict())  # mlp.0/2/4, weight_g, weight_v
    assert sd["student.head.last_layer.weight_g"].shape == (65536, 1)
    assert sd["student.head.last_layer.weight_v"].shape == (65536, 256)
    assert sd["global_step"].dtype == torch.int64


def test_timm_backbone_strict_load_and_features():
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():  # non-trivial position embedding and class token
        ref.pos_embed.normal_(0, 0.5)
        ref.cls_token.normal_(0, 0.5)
    m = create("dino_vit_small", out_dim=256, hidden_dim=64, bottleneck_dim=32).eval()
    m.student.backbone.load_state_dict(ref.state_dict(), strict=True)
    for size in (224, 96):  # global and local crops: the local one resamples the position embedding
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert_close(m.student.backbone(x), ref(x), torch.float32)
            assert_close(m.student.backbone.forward_features(x), ref.forward_features(x), torch.float32)


@pytest.mark.parametrize("old,new", [((14, 14), (6, 6)), ((4, 4), (2, 2)), ((4, 4), (3, 5)), ((4, 4), (4, 4))])
def test_pos_embed_interpolation_equals_timm(old, new):
    pe = torch.randn(1, 1 + old[0] * old[1], 24, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    ours = resample_abs_pos_embed(pe, new, old, num_prefix_tokens=1)
    ref = timm_resample(pe, new, old, num_prefix_tokens=1)
    assert ours.shape == (1, 1 + new[0] * new[1], 24)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # the position embedding learns through the resampling (the micro's local crops: 2x2 from 4x4)
    pe.requires_grad_(True)
    ours = resample_abs_pos_embed(pe, new, old, num_prefix_tokens=1)
    ours.square().sum().backward()
    assert pe.grad.abs().sum() > 0


def test_micro_local_crops_use_resampled_pos_embed():
    m = _micro().eval()
    bb = m.student.backbone
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    tokens = bb.patch_embed(x)
    pos = timm_resample(bb.pos_embed, (2, 2), (4, 4), num_prefix_tokens=1)
    expect = torch.cat([bb.cls_token.expand(2, -1, -1), tokens], 1) + pos
    expect = bb.norm(bb.blocks(expect))
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_features(x), expect, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- head, loss, schedules
def test_head_matches_dino_head():
    torch.manual_seed(3)
    ref = RefDINOHead(48, 40, hidden_dim=64, bottleneck_dim=16)
    ours = DINOHead(48, 40, hidden_dim=64, bottleneck_dim=16)
    with torch.no_grad():  # weight_g != 1 checks the formula; both keep it frozen
        ref.last_layer.weight_g.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert not ours.last_layer.weight_g.requires_grad
    assert torch.equal(DINOHead(48, 40, hidden_dim=64, bottleneck_dim=16).last_layer.weight_g, torch.ones(40, 1))
    x = torch.randn(5, 48)
    assert_close(ours(x), ref(x), torch.float32)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        if b.grad is None:
            assert a.grad is None, n
        else:
            assert_close(a.grad, b.grad, torch.float32, grad=True)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("ncrops", [2, 5])
def test_loss_and_center_match_dino(fused, ncrops):
    g = torch.Generator().manual_seed(ncrops)
    B, K = 3, 17
    s = torch.randn(ncrops * B, K, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2 * B, K, generator=g, dtype=torch.float64)
    loss_mod = DINOLoss(K, ncrops, fused=fused).double()
    loss_mod.center.copy_(torch.randn(1, K, generator=g, dtype=torch.float64))
    center0 = loss_mod.center.clone()
    ref_loss, ref_center = ref_dino_loss(s, t, center0, 0.07, ncrops)
    loss = loss_mod(s, t, 0.07)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_mod.center, ref_center, rtol=1e-12, atol=1e-12)
    (g1,) = torch.autograd.grad(loss, s)
    (g2,) = torch.autograd.grad(ref_loss, s)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    center1 = loss_mod.center.clone()
    loss_mod(s, t, 0.07, update_center=False)
    assert torch.equal(loss_mod.center, center1)


def test_momentum_schedule_is_dino_cosine_scheduler():
    m = _micro()
    assert m.momentum_at(5) == 0.996  # no run length yet: constant
    m.set_total_steps(12)
    ref = ref_cosine_scheduler(0.996, 1, 3, 4)  # 3 "epochs" of 4 iterations
    for it in range(12):
        assert math.isclose(m.momentum_at(it), ref[it], rel_tol=0, abs_tol=1e-15), it
    assert m.momentum_at(0) == 0.996 and m.momentum_at(12) == 1.0 and m.momentum_at(50) == 1.0


def test_teacher_temperature_schedule():
    m = _micro(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=30)
    ref = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))  # DINOLoss.teacher_temp_schedule
    for s in range(100):
        assert math.isclose(m.teacher_temp_at(s), ref[s], rel_tol=1e-14), s
    d = _micro()  # DINO's defaults: 0.04 throughout
    assert d.teacher_temp_at(0) == d.teacher_temp_at(10 ** 6) == 0.04
    one = _micro(warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_steps=1)
    assert one.teacher_temp_at(0) == 0.02 and one.teacher_temp_at(1) == 0.05


def test_forward_uses_the_step_temperature_and_center(monkeypatch):
    m = _micro(warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_steps=3)
    seen = []
    orig = DINOLoss.forward

    def spy(self, s, t, temp, **kw):
        seen.append((temp, self.center.clone(), t.detach().clone()))
        return orig(self, s, t, temp, **kw)

    monkeypatch.setattr(DINOLoss, "forward", spy)
    x = _images(m)
    for _ in range(4):
        m(x)
    assert [round(t, 12) for t, _, _ in seen] == [0.02, 0.04, 0.06, 0.06]
    c = torch.zeros(1, 64)
    for i, (_, center, t) in enumerate(seen):
        torch.testing.assert_close(center, c, rtol=0, atol=1e-7, msg=str(i))
        c = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
    torch.testing.assert_close(m.dino_loss.center, c, rtol=0, atol=1e-7)
    assert int(m.global_step) == 4 and m.step == 4


# ----------------------------------------------------------------------------------- parity eager vs fused
def _step(m, x, fused, seed=5):
    set_fused(m, fused)
    m.zero_grad(set_to_none=True)
    out = m(x, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    return out["loss"].detach(), grads, copy.deepcopy(m.state_dict())


def _nontrivial(m):
    """A student that differs from its teacher, a non-zero center and step: one step's update means something."""
    m.set_total_steps(10)
    m(_images(m, 4, seed=9))
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    m.zero_grad(set_to_none=True)
    return copy.deepcopy(m.state_dict())


def test_parity_eager_fused_loss_grads_teacher(monkeypatch):
    m = _micro()
    sd0 = _nontrivial(m)
    x = _images(m, 4)
    calls = {"attention": 0, "ema": 0}
    real_attention, real_ema = attn_mod.attention, ema_mod.ema_update_

    def count_attention(*a, **k):
        calls["attention"] += 1
        return real_attention(*a, **k)

    def count_ema(*a, **k):
        calls["ema"] += 1
        return real_ema(*a, **k)

    monkeypatch.setattr(attn_mod, "attention", count_attention)
    monkeypatch.setattr(ema_mod, "ema_update_", count_ema)
    m.load_state_dict(sd0)
    le, ge, sde = _step(m, x, False)
    assert calls == {"attention": 0, "ema": 0}  # the eager path runs none of the fused ops
    m.load_state_dict(sd0)
    lf, gf, sdf = _step(m, x, True)
    # teacher on the 2 global crops, student on the global and the local crops (one call per size): 2 blocks each
    assert calls == {"attention": 2 * 1 + 2 * 2, "ema": 1}

    assert torch.isfinite(le) and abs(le.item() - lf.item()) <= 1e-5 * abs(le.item()), (le.item(), lf.item())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n, g in ge.items() if g is not None} == {n for n, g in gf.items() if g is not None} == trainable
    assert all(n.startswith("student.") for n in trainable) and len(trainable) == 2 * 12 + 4 + 2 + 6 + 1
    for n in trainable:
        assert ge[n].abs().sum() > 0, n
        assert_close(gf[n], ge[n], torch.float32, grad=True)
    # the teacher update (ema_update_ vs DINO's loop), the center and the step agree
    for k in sd0:
        if k.startswith("teacher."):
            assert torch.equal(sdf[k], sde[k]), k
    torch.testing.assert_close(sdf["dino_loss.center"], sde["dino_loss.center"], rtol=0, atol=1e-6)
    assert int(sde["global_step"]) == int(sdf["global_step"]) == 2
    # the update is DINO's: teacher <- m(1 - 1) teacher + (1 - m(0)) student, at global_step 1
    mom = m.momentum_at(0)
    for k, v in sd0.items():
        if k.startswith("teacher.") and v.is_floating_point():
            s = sd0["student." + k[len("teacher."):]]
            torch.testing.assert_close(sde[k], mom * v + (1 - mom) * s, rtol=0, atol=1e-6)
    assert not torch.equal(sde["teacher.backbone.blocks.0.attn.qkv.weight"],
                           sd0["teacher.backbone.blocks.0.attn.qkv.weight"])


def test_fused_path_runs_the_triton_attention_kernel(monkeypatch):
    """The fused model on the Triton backend (the interpreter on CPU) against the eager model."""
    import vlfast.kernels.attention as kattn

    launches = []
    real = kattn.attention_forward

    def spy(*a, **k):
        launches.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kattn, "attention_forward", spy)
    m = _micro(depth=1)  # the interpreter is slow: one block, one image
    sd0 = _nontrivial(m)
    x = _images(m, 1)
    le, ge, _ = _step(m, x, False)
    for a in m.modules():
        if isinstance(a, Attention):
            a.backend = "triton"
    m.load_state_dict(sd0)
    lf, gf, _ = _step(m, x, True)
    assert len(launches) == 3  # teacher (global crops), student (global, local)
    assert abs(le.item() - lf.item()) <= 1e-5 * abs(le.item())
    for n, g in ge.items():
        if g is not None:
            assert_close(gf[n], g, torch.float32, grad=True)


# ----------------------------------------------------------------------------------- convergence, resume
def _train(fused, init, steps=30, **kw):
    m = create("dino_micro", fused=fused, **kw)
    m.load_state_dict(init)
    m.set_total_steps(steps)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    x = _images(m, 8, seed=4)
    rows = []
    for _ in range(steps):
        out = m(x, generator=torch.Generator().manual_seed(0))  # one batch, the same crops
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        rows.append([out[k].item() for k in ("loss", "teacher_entropy", "kl")])
    return torch.tensor(rows, dtype=torch.float64)


def _falls(c):
    return c[-5:].mean() < 0.7 * c[:5].mean()


@pytest.mark.slow
def test_convergence_eager_vs_fused():
    init = copy.deepcopy(_micro().state_dict())
    e, f = _train(False, init), _train(True, init)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-4)
    for c in (e, f):
        # the student learns the teacher: KL(teacher || student) halves.  The loss itself is H + KL, and on
        # one batch of a random teacher, centering (EMA 0.9) flattens the targets (H -> log 64) once the
        # student has matched them: DINO's anti-collapse at work, so the default loss rises after step ~8
        assert _falls(c[:, 2]), c
        assert (c[:, 0] - c[:, 1] - c[:, 2]).abs().max() < 1e-5  # loss = H + KL
    # with slower centering (center_momentum 0.99, DINO's parameter) the targets stay sharp: the loss falls
    slow = _train(True, init, center_momentum=0.99)
    assert _falls(slow[:, 0]), slow


def test_resume_is_exact():
    def run(m, opt, n):
        out = []
        for i in range(n):
            loss = m(_images(m, 4, seed=i))["loss"]  # crops from the per-step seeded generator
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    a = _micro(warmup_teacher_temp=0.02, warmup_teacher_temp_steps=4, total_steps=6)
    sd0 = copy.deepcopy(a.state_dict())
    opt_a = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    full = run(a, opt_a, 4)

    b = _micro(seed=1, warmup_teacher_temp=0.02, warmup_teacher_temp_steps=4, total_steps=6)
    b.load_state_dict(sd0)
    opt_b = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    first = run(b, opt_b, 2)
    c = _micro(seed=2, warmup_teacher_temp=0.02, warmup_teacher_temp_steps=4, total_steps=6)
    c.load_state_dict(b.state_dict())  # a fresh process resuming at step 2
    opt_c = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=0.1)
    rest = []
    for i in range(2, 4):
        loss = c(_images(c, 4, seed=i))["loss"]
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()
        rest.append(loss.item())
    assert first + rest == full
    for (k, va), (_, vc) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vc), k


def test_eval_changes_nothing_and_freeze_last_layer():
    m = _micro()
    x = _images(m)
    sd0 = copy.deepcopy(m.state_dict())
    m.eval()
    m(x)
    m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd0[k]), k
    f = _micro(freeze_last_layer_steps=1)
    f(x)["loss"].backward()  # step 0 < 1: DINO's cancel_gradients_last_layer
    assert f.student.head.last_layer.weight_v.grad is None
    assert f.student.head.mlp[0].weight.grad is not None
    f.zero_grad(set_to_none=True)
    f(x)["loss"].backward()
    assert f.student.head.last_layer.weight_v.grad is not None
    assert f.student.head.last_layer.weight_g.grad is None  # norm_last_layer: fixed to 1


def test_state_dict_roundtrip_and_dino_checkpoint():
    a = _micro()
    a(_images(a))
    sd = a.state_dict()
    assert "teacher.backbone.cls_token" in sd and not any(k.startswith("teacher.module.") for k in sd)
    b = _micro(seed=1)
    b.load_state_dict({k.replace("teacher.", "teacher.module.", 1): v for k, v in sd.items()}, strict=True)
    assert b.step == 1 and torch.equal(b.teacher.module.backbone.cls_token, a.teacher.module.backbone.cls_token)
    # a main_dino.py checkpoint: student under DDP (module.), teacher plain, dino_loss's center
    ckpt = {"student": {"module." + k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")},
            "teacher": {k[len("teacher."):]: v for k, v in sd.items() if k.startswith("teacher.")},
            "dino_loss": {"center": sd["dino_loss.center"]}, "epoch": 1}
    c = _micro(seed=2)
    c.load_state_dict(convert_dino_checkpoint(ckpt, global_step=1), strict=True)
    for k, v in c.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(ValueError, match="dino_loss"):
        convert_dino_checkpoint({"student": {}, "teacher": {}})


def test_sync_teacher_after_loading_a_backbone():
    m = _micro()
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    m.sync_teacher()
    for a, b in zip(m.student.parameters(), m.teacher.module.parameters()):
        assert torch.equal(a, b)
    assert isinstance(m.teacher, MomentumEncoder)


# ----------------------------------------------------------------------------------- multi-crop
def test_multi_crop_shapes_determinism_and_geometry():
    m = _micro()
    x = _images(m, 3)
    crops = m.make_crops(x, torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    again = m.make_crops(x, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert not torch.equal(crops[0], crops[1])
    # the seeded per-step generator: the same crops at the same step, others at the next
    s0 = m.make_crops(x)
    assert all(torch.equal(a, b) for a, b in zip(s0, m.make_crops(x)))
    m.global_step.fill_(1)
    m._step_cache = None
    assert not torch.equal(s0[0], m.make_crops(x)[0])
    # the whole image, unflipped / flipped, resampled at its own size: the image itself
    img = torch.randn(2, 3, 12, 20)
    same = random_resized_crop(img, (12, 20), (1.0, 1.0), (20 / 12, 20 / 12), flip_p=0.0)
    torch.testing.assert_close(same, img, rtol=0, atol=1e-5)
    flipped = random_resized_crop(img, (12, 20), (1.0, 1.0), (20 / 12, 20 / 12), flip_p=1.0)
    torch.testing.assert_close(flipped, img.flip(-1), rtol=0, atol=1e-5)
    # local crops cover (0.05, 0.4) of the area: a quarter-scale crop of a linear ramp spans less of it
    ramp = torch.linspace(0, 1, 64).expand(64, 3, 64, 64).contiguous()
    glob, loc = multi_crop(ramp, 32, 16, 1, generator=torch.Generator().manual_seed(3))[1:]
    span = lambda c: (c[:, 0, 8].amax(-1) - c[:, 0, 8].amin(-1)).mean()  # noqa: E731
    assert span(loc) < span(glob)


def test_precomputed_crops_match_images_path():
    m = _micro()
    x = _images(m, 3)
    crops = m.make_crops(x, torch.Generator().manual_seed(7))
    a = copy.deepcopy(m)
    la = a(x, generator=torch.Generator().manual_seed(7))["loss"]
    lb = m(global_crops=torch.stack(crops[:2]), local_crops=crops[2:])["loss"]
    assert torch.equal(la, lb)


# ----------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    m = _micro()
    x = _images(m, 2)
    sd0 = copy.deepcopy(m.state_dict())
    with pytest.raises(TypeError, match="images"):
        m(x.numpy())
    with pytest.raises(TypeError, match="images"):
        m((x * 10).long())
    with pytest.raises(ValueError, match="images"):
        m(x[0])
    with pytest.raises(ValueError, match="3 channels"):
        m(x[:, :1])
    with pytest.raises(ValueError, match="either images"):
        m(x, global_crops=[x, x])
    with pytest.raises(ValueError, match="either images"):
        m()
    with pytest.raises(TypeError, match="generator"):
        m(x, generator=0)
    with pytest.raises(ValueError, match="global_crops must hold 2"):
        m(global_crops=[x], local_crops=[x[..., :16, :16]] * 2)
    with pytest.raises(ValueError, match="local_crops must hold"):
        m(global_crops=[x, x], local_crops=[x[..., :16, :16]])
    with pytest.raises(ValueError, match="divisible by the patch size"):
        m(global_crops=[x, x], local_crops=[x[..., :12, :12]] * 2)
    with pytest.raises(ValueError, match=r"local_crops\[1\]"):
        m(global_crops=[x, x], local_crops=[x[..., :16, :16], x[..., :8, :8]])
    with pytest.raises(ValueError, match="batch"):
        m(global_crops=[x, x], local_crops=[x[:1, :, :16, :16]] * 2)
    with pytest.raises(TypeError, match="global_crops"):
        m(global_crops="crops")
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd0[k]), k  # nothing moved on a refused call
    with pytest.raises(ValueError, match="total_steps"):
        m.set_total_steps(0)
    with pytest.raises(TypeError, match="total_steps"):
        m.set_total_steps(2.5)
    with pytest.raises(ValueError, match="momentum_teacher"):
        create("dino_micro", momentum_teacher=1.5)
    with pytest.raises(ValueError, match="teacher_temp"):
        create("dino_micro", teacher_temp=0.0)
    with pytest.raises(ValueError, match="local_crops_scale"):
        create("dino_micro", local_crops_scale=(0.5, 0.2))
    loss = DINOLoss(8, 4)
    with pytest.raises(ValueError, match="ncrops"):
        loss(torch.randn(12, 8), torch.randn(4, 8), 0.04)
    with pytest.raises(ValueError, match="out_dim"):
        loss(torch.randn(8, 7), torch.randn(4, 7), 0.04)
    with pytest.raises(ValueError, match="ncrops"):
        DINOLoss(8, 1)


# ----------------------------------------------------------------------------------- vlfast train
def test_vlfast_train_dino_micro(tmp_path):
    from vlfast.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--model", "dino_micro", "--steps", "2", "--batch-size", "4", "--out", out,
                 "--no-progress"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    sd = torch.load(os.path.join(out, "checkpoints", "step_2", "model.pt"), map_location="cpu", weights_only=True)
    assert int(sd["global_step"]) == 2 and "teacher.head.last_layer.weight_v" in sd
