"""BEiT (arXiv:2106.08254): timm's classifier (counts, names, strict load and logits), unilm's masked image
modelling pre-training (names, block masks, visual-token targets), eager vs fused parity of the loss and every
gradient (the relative position bias tables and mask_token included, Triton under the interpreter once),
convergence, bad inputs and a 2-step ``vlfast train``."""

import copy
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import vlfast.models.beit as beit_mod
from vlfast.models import create, list_models, set_fused
from vlfast.models.beit import (Beit, BeitAttention, BeitForMaskedImageModeling, convert_unilm_state_dict,
                                gen_relative_position_index, synthetic_visual_tokens)
from vlfast.testing import assert_close, max_abs_error

NAMES = ["beit_base_patch16_224", "beit_base_patch16_224_pt", "beit_micro"]
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10)  # 65 tokens
PER_LAYER = dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
BOTH = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=True, use_abs_pos_emb=True)
SMALL = dict(img_size=16, min_num_patches=2)  # 4 x 4 patches, 17 tokens: for Triton's (slow) interpreter


def _meta(fn, *a, **kw):
    with torch.device("meta"):
        return fn(*a, **kw)


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _perturb(model, seed=0, scale=0.05):
    """Random (never zero) values in every parameter: rel-pos tables, q/v biases, layer scale included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


# ----------------------------------------------------------------------------- registry, counts, names
def test_registered_and_classes():
    names = list_models()
    for n in NAMES:
        assert n in names
    assert isinstance(create("beit_micro"), BeitForMaskedImageModeling)
    m = create("beit_base_patch16_224", fused=False, **TINY)
    assert isinstance(m, Beit)
    attn = [a for a in m.modules() if isinstance(a, BeitAttention)]
    assert len(attn) == 2 and not any(a.fused for a in attn)
    set_fused(m, True)
    assert all(a.fused for a in attn)


def _block(d, heads=12, table=0):  # norm1, qkv (no bias), q_bias, v_bias, proj, norm2, fc1, fc2, gamma_1, gamma_2
    return 2 * d + 3 * d * d + 2 * d + d * d + d + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d + 2 * d + table * heads


def test_hand_counts():
    table = 27 * 27 + 3
    cls = (3 * 256 * 768 + 768) + 768 + 12 * _block(768, table=table) + 2 * 768 + 768 * 1000 + 1000
    pt = (3 * 256 * 768 + 768) + 2 * 768 + table * 12 + 12 * _block(768) + 2 * 768 + 768 * 8192 + 8192
    assert cls == 86_530_984 and pt == 91_965_776


def test_classifier_count_and_names_match_timm_on_meta():
    ours = _meta(create, "beit_base_patch16_224")
    ref = _meta(timm.create_model, "beit_base_patch16_224", pretrained=False)
    assert _count(ours) == _count(ref) == 86_530_984
    sd, rsd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(rsd)
    for k in rsd:
        assert sd[k].shape == rsd[k].shape, k
    for k in ("blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.11.attn.relative_position_bias_table",
              "blocks.3.gamma_1", "blocks.3.gamma_2", "fc_norm.weight", "head.weight"):
        assert k in sd
    assert "blocks.0.attn.qkv.bias" not in sd and "blocks.0.attn.k_bias" not in sd  # k bias: a zero buffer
    assert "blocks.0.attn.relative_position_index" not in sd and "pos_embed" not in sd
    assert sd["blocks.0.attn.relative_position_bias_table"].shape == (27 * 27 + 3, 12)


def test_pretraining_count_and_names_unilm():
    ours = _meta(create, "beit_base_patch16_224_pt")
    assert _count(ours) == 91_965_776
    # the encoder is timm's Beit with a shared bias and token-pooling norm; unilm adds mask_token and lm_head
    enc = _meta(timm.models.beit.Beit, num_classes=0, global_pool="", use_abs_pos_emb=False,
                use_shared_rel_pos_bias=True, init_values=0.1)
    sd = ours.state_dict()
    assert set(sd) == set(enc.state_dict()) | {"mask_token", "lm_head.weight", "lm_head.bias"}
    assert sd["rel_pos_bias.relative_position_bias_table"].shape == (732, 12)
    assert sd["mask_token"].shape == (1, 1, 768) and sd["lm_head.weight"].shape == (8192, 768)
    assert ours.blocks[0].gamma_1.shape == (768,) and ours.vocab_size == 8192
    per_layer = _meta(create, "beit_base_patch16_224_pt", **PER_LAYER).state_dict()
    assert "rel_pos_bias.relative_position_bias_table" not in per_layer
    assert per_layer["blocks.5.attn.relative_position_bias_table"].shape == (732, 12)


def test_relative_position_index_is_timms():
    for ws in ((4, 4), (3, 5), (14, 14)):
        assert torch.equal(gen_relative_position_index(ws), timm.models.beit.gen_relative_position_index(ws))


# ----------------------------------------------------------------------------- timm numerics
@pytest.mark.parametrize("kw", [{}, dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=True,
                                         global_pool="token")], ids=["per-layer-avg", "shared-abs-token"])
def test_timm_strict_load_same_logits(kw):
    torch.manual_seed(0)
    ref = _perturb(timm.create_model("beit_base_patch16_224", pretrained=False, **TINY, **kw).eval())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
    for fused in (False, True):
        m = create("beit_base_patch16_224", fused=fused, **TINY, **kw).eval()
        m.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            got = m(x)
        assert_close(got, want, msg=f"logits fused={fused}")


def test_timm_logits_on_triton_under_interpreter(monkeypatch):
    calls = []
    real = beit_mod.attention
    monkeypatch.setattr(beit_mod, "attention", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    tiny = {**TINY, "img_size": 16}
    ref = _perturb(timm.create_model("beit_base_patch16_224", pretrained=False, **tiny).eval(), seed=3)
    m = create("beit_base_patch16_224", fused=True, backend="triton", **tiny).eval()
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(m(x), ref(x), msg="logits triton")
    assert calls == ["triton", "triton"]


def test_pretraining_encoder_loads_timm_encoder():
    ref = _perturb(timm.models.beit.Beit(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                                         global_pool="", use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                                         init_values=0.1).eval(), seed=1)
    m = create("beit_micro").eval()
    res = m.load_state_dict(ref.state_dict(), strict=False)
    assert set(res.missing_keys) == {"mask_token", "lm_head.weight", "lm_head.bias"} and not res.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(m.forward_features(x), ref.forward_features(x), msg="features")


def test_convert_unilm_state_dict():
    m = _perturb(create("beit_micro", **BOTH))
    sd = m.state_dict()
    unilm = dict(sd)  # unilm keeps the index buffers persistent
    unilm["rel_pos_bias.relative_position_index"] = m.rel_pos_bias.relative_position_index
    for i, b in enumerate(m.blocks):
        unilm[f"blocks.{i}.attn.relative_position_index"] = b.attn.relative_position_index
    other = create("beit_micro", **BOTH)
    other.load_state_dict(convert_unilm_state_dict({"model": unilm}), strict=True)
    for k, v in sd.items():
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(TypeError, match="state_dict"):
        convert_unilm_state_dict([1, 2])


# ----------------------------------------------------------------------------- synthetic batch, masks, targets
def test_synthetic_batch_masks_and_tokens():
    m = create("beit_micro")
    b = m.synthetic_batch(6, generator=torch.Generator().manual_seed(5))
    b2 = m.synthetic_batch(6, generator=torch.Generator().manual_seed(5))
    assert set(b) == {"images", "visual_tokens", "bool_masked_pos"}
    for k in b:
        assert torch.equal(b[k], b2[k]), k
    assert b["images"].shape == (6, 3, 32, 32) and b["images"].dtype == torch.float32
    tok, mask = b["visual_tokens"], b["bool_masked_pos"]
    assert tok.shape == (6, 64) and tok.dtype == torch.int64 and 0 <= tok.min() and tok.max() < 512
    assert mask.dtype == torch.bool and torch.equal(mask.sum(1), torch.full((6,), 64 - int(64 * 0.6)))
    assert len(torch.unique(tok)) > 20  # varied targets
    assert torch.equal(tok, synthetic_visual_tokens(b["images"], 4, 512))  # a function of the patch content
    img = b["images"].clone()
    img[:, :, :4, :4] = img[:, :, 4:8, 4:8]  # patch (0, 0) := patch (1, 1)
    t2 = synthetic_visual_tokens(img, 4, 512)
    assert torch.equal(t2[:, 0], t2[:, 9]) and torch.equal(t2[:, 1:], tok[:, 1:])
    # BEiT's defaults at 14 x 14: 40% masked, blocks of >= 16 patches
    pt = _meta(create, "beit_base_patch16_224_pt")
    masks = pt.block_masks(3, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (3, 196) and torch.equal(masks.sum(1), torch.full((3,), 196 - int(196 * 0.6)))
    assert (pt.mask_ratio, pt.min_num_patches, pt.min_aspect) == (0.4, 16, 0.3)


def test_forward_contract_and_masking():
    m = _perturb(create("beit_micro"))
    b = m.synthetic_batch(4, generator=torch.Generator().manual_seed(1))
    out = m(**b)
    M = int(b["bool_masked_pos"].sum())
    assert out["loss"].dim() == 0 and out["logits"].shape == (M, 512) and 0 <= out["mlm_acc"].item() <= 1
    assert torch.equal(out["bool_masked_pos"], b["bool_masked_pos"])
    want = F.cross_entropy(out["logits"], b["visual_tokens"][b["bool_masked_pos"]])
    assert_close(out["loss"], want, msg="loss = CE on masked positions")
    # masked patches' pixels do not matter: the mask token replaces them
    img = b["images"].clone()
    img[b["bool_masked_pos"].view(4, 8, 1, 8, 1).expand(4, 8, 4, 8, 4).reshape(4, 1, 32, 32).expand_as(img)] = 7.0
    assert_close(m(img, b["visual_tokens"], b["bool_masked_pos"])["loss"], out["loss"], msg="masked pixels")
    # without a mask: BEiT block masks drawn from torch's RNG
    torch.manual_seed(3)
    o1 = m(b["images"], b["visual_tokens"])
    torch.manual_seed(3)
    o2 = m(b["images"], b["visual_tokens"])
    assert torch.equal(o1["bool_masked_pos"], o2["bool_masked_pos"]) and o1["bool_masked_pos"].sum() == 4 * 26


def test_classifier_synthetic_batch_is_trainer_contract():
    m = create("beit_base_patch16_224", **TINY)
    b = m.synthetic_batch(4, generator=torch.Generator().manual_seed(0))
    assert set(b) == {"images", "labels"} and b["labels"].dtype == torch.int64
    logits = m(**b)
    assert logits.shape == (4, 10)


# ----------------------------------------------------------------------------- parity eager vs fused
def _grads(model, batch, fused):
    set_fused(model, fused)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw,backend,n_tables", [({}, None, 1), (PER_LAYER, None, 2),
                                                     ({**BOTH, **SMALL}, "triton", 3)],
                         ids=["shared-torch", "per-layer-torch", "both-abs-triton"])
def test_parity_eager_fused_loss_and_every_grad(kw, backend, n_tables, monkeypatch):
    calls = {"fused": 0, "eager": 0}
    real_f, real_e = beit_mod.attention, beit_mod.attention_reference

    def fused_op(*a, **k):
        calls["fused"] += 1
        assert k["attn_bias"] is not None and k["attn_bias"].requires_grad
        return real_f(*a, **k)

    def eager_op(*a, **k):
        calls["eager"] += 1
        return real_e(*a, **k)

    monkeypatch.setattr(beit_mod, "attention", fused_op)
    monkeypatch.setattr(beit_mod, "attention_reference", eager_op)
    m = _perturb(create("beit_micro", backend=backend, **kw), seed=2)
    batch = m.synthetic_batch(2 if backend else 4, generator=torch.Generator().manual_seed(7))
    out_e, g_e = _grads(m, batch, False)
    assert calls == {"fused": 0, "eager": 2}
    out_f, g_f = _grads(m, batch, True)
    assert calls == {"fused": 2, "eager": 2}
    assert abs(out_e["loss"].item() - out_f["loss"].item()) <= 1e-5
    assert_close(out_f["logits"], out_e["logits"], atol=1e-5, rtol=1e-4, msg="logits")
    trainable = {n for n, p in m.named_parameters()}
    assert set(g_e) == set(g_f) == trainable
    worst = 0.0
    for n in trainable:
        assert_close(g_f[n], g_e[n], grad=True, atol=1e-5, rtol=1e-4, msg=n)
        worst = max(worst, max_abs_error(g_f[n], g_e[n]))
    tables = [n for n in trainable if n.endswith("relative_position_bias_table")]
    assert len(tables) == n_tables
    for n in tables + ["mask_token", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.1.gamma_1"]:
        assert g_f[n].abs().sum() > 0, n  # the bias table and mask token learn on the fused path
    assert worst < 1e-5


def test_classifier_parity_eager_fused():
    m = _perturb(create("beit_base_patch16_224", **TINY), seed=4)
    b = m.synthetic_batch(4, generator=torch.Generator().manual_seed(0))
    res = {}
    for fused in (False, True):
        set_fused(m, fused)
        m.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(**b), b["labels"])
        loss.backward()
        res[fused] = loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    assert abs(res[False][0].item() - res[True][0].item()) <= 1e-5
    for n, g in res[False][1].items():
        assert_close(res[True][1][n], g, grad=True, atol=1e-5, rtol=1e-4, msg=n)


# ----------------------------------------------------------------------------- convergence
@pytest.mark.slow
def test_convergence_30_steps_eager_and_fused():
    torch.manual_seed(0)
    init = copy.deepcopy(create("beit_micro").state_dict())
    batch = create("beit_micro").synthetic_batch(4, generator=torch.Generator().manual_seed(0))
    curves = {}
    for fused in (False, True):
        m = create("beit_micro", fused=fused)
        m.load_state_dict(init)
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
        losses = []
        for _ in range(30):
            out = m(**batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].item())
        curves[fused] = torch.tensor(losses, dtype=torch.float64)
    e, f = curves[False], curves[True]
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-3)
    for c in (e, f):
        assert c[-5:].mean() < 0.7 * c[:5].mean(), c


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    m = create("beit_micro")
    b = m.synthetic_batch(2, generator=torch.Generator().manual_seed(0))
    x, tok, mask = b["images"], b["visual_tokens"], b["bool_masked_pos"]
    with pytest.raises(ValueError, match="visual_tokens is required"):
        m(x)
    with pytest.raises(TypeError, match="images"):
        m(x.numpy(), tok, mask)
    with pytest.raises(ValueError, match="images"):
        m(x[:, :, :16], tok, mask)
    with pytest.raises(TypeError, match="visual_tokens"):
        m(x, tok.float(), mask)
    with pytest.raises(ValueError, match="visual_tokens"):
        m(x, tok[:, :10], mask)
    with pytest.raises(ValueError, match=r"visual_tokens must lie in \[0, vocab_size=512\)"):
        m(x, tok + 512, mask)
    with pytest.raises(ValueError, match="visual_tokens must lie"):
        m(x, tok - 600, mask)
    with pytest.raises(TypeError, match="bool_masked_pos"):
        m(x, tok, mask.long())
    with pytest.raises(ValueError, match="bool_masked_pos"):
        m(x, tok, mask[:, :63])
    with pytest.raises(ValueError, match="at least one patch"):
        m(x, tok, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="vocab_size"):
        create("beit_micro", vocab_size=1)
    with pytest.raises(ValueError, match="mask_ratio"):
        create("beit_micro", mask_ratio=1.0)
    with pytest.raises(ValueError, match="global_pool"):
        create("beit_base_patch16_224", global_pool="max", **TINY)
    with pytest.raises(ValueError, match="num_heads"):
        create("beit_micro", num_heads=5)
    attn = m.blocks[0].attn
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(2, 65, 32))
    with pytest.raises(TypeError, match="x must be"):
        attn(torch.randint(0, 3, (2, 65, 64)))


# ----------------------------------------------------------------------------- vlfast train
def test_train_two_steps(tmp_path):
    from vlfast.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--model", "beit_micro", "--steps", "2", "--batch-size", "4", "--out", out,
                 "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_2", "model.pt"))
