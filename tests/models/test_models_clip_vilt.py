"""CLIP (open_clip ViT-B-16 names and size) and ViLT reference models: sizes, eager/fused parity,
convergence, input validation, tokenizer end to end."""

import copy
import math

import pytest
import torch

from vlfast.models import create, list_models, set_fused
from vlfast.models.tokenizer import ByteTokenizer

MICRO = ["clip_micro", "vilt_micro"]


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _meta(name):
    with torch.device("meta"):
        return create(name)


def test_registered():
    names = list_models()
    for n in ("clip_vit_b16", "clip_micro", "vilt_base_patch32", "vilt_micro"):
        assert n in names


def test_clip_vit_b16_matches_open_clip():
    m = _meta("clip_vit_b16")
    # open_clip.create_model("ViT-B-16") has 149,620,737 parameters
    assert _count(m) == 149_620_737
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {
        "visual.conv1.weight": (768, 3, 16, 16),
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (197, 768),
        "visual.ln_pre.weight": (768,),
        "visual.transformer.resblocks.0.ln_1.weight": (768,),
        "visual.transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
        "visual.transformer.resblocks.0.attn.in_proj_bias": (2304,),
        "visual.transformer.resblocks.0.attn.out_proj.weight": (768, 768),
        "visual.transformer.resblocks.0.attn.out_proj.bias": (768,),
        "visual.transformer.resblocks.11.ln_2.bias": (768,),
        "visual.transformer.resblocks.11.mlp.c_fc.weight": (3072, 768),
        "visual.transformer.resblocks.11.mlp.c_proj.weight": (768, 3072),
        "visual.ln_post.weight": (768,),
        "visual.proj": (768, 512),
        "token_embedding.weight": (49408, 512),
        "positional_embedding": (77, 512),
        "transformer.resblocks.0.attn.in_proj_weight": (1536, 512),
        "transformer.resblocks.11.mlp.c_proj.bias": (512,),
        "ln_final.weight": (512,),
        "text_projection": (512, 512),
        "logit_scale": (),
    }
    for k, shape in expected.items():
        assert sd[k] == shape, k
    assert "visual.conv1.bias" not in sd
    assert not any(k.startswith("visual.transformer.resblocks.12") or k.startswith("transformer.resblocks.12")
                   for k in sd)
    # open_clip's state dict keys, less its non-parameter attn_mask buffer: 302 tensors
    assert len(sd) == 302


def test_clip_logit_scale_init():
    m = create("clip_micro")
    assert math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_vilt_base_builds_on_meta():
    m = _meta("vilt_base_patch32")
    # ViT-B/32 encoder at 384 (pos_embed 1 + 144) without a classifier head; the paper's 87.4M
    # is this encoder at 224 (1 + 49 positions): 87,455,232
    assert _count(m.transformer) == 87_528_192
    assert tuple(m.transformer.pos_embed.shape) == (1, 145, 768)
    assert tuple(m.text_embeddings.word_embeddings.weight.shape) == (30522, 768)
    assert tuple(m.text_embeddings.position_embeddings.weight.shape) == (40, 768)
    assert tuple(m.token_type_embeddings.weight.shape) == (2, 768)
    # + BERT embeddings 23,474,688 + modality types 1,536 + pooler 590,592 + ITM 1,538 + MLM 24,063,546
    assert _count(m) == 135_660_092


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MICRO)
def test_eager_fused_parity(name):
    torch.manual_seed(0)
    eager = create(name, fused=False)
    fused = create(name, fused=True)
    fused.load_state_dict(eager.state_dict())
    assert all(m.fused is False for m in eager.modules() if isinstance(getattr(m, "fused", None), bool))
    assert all(m.fused is True for m in fused.modules() if isinstance(getattr(m, "fused", None), bool))
    batch = eager.synthetic_batch(8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    out_e = eager(**batch)
    torch.manual_seed(11)
    out_f = fused(**batch)
    assert torch.isfinite(out_e["loss"])
    assert abs(out_e["loss"].item() - out_f["loss"].item()) <= 1e-5
    for k in out_e:
        torch.testing.assert_close(out_f[k], out_e[k], rtol=1e-5, atol=1e-5)
    out_e["loss"].backward()
    out_f["loss"].backward()
    ge, gf = _grads(eager), _grads(fused)
    assert ge.keys() == gf.keys() == {n for n, _ in eager.named_parameters()}
    for n in ge:
        err = (gf[n] - ge[n]).norm().item()
        assert err <= 1e-4 * ge[n].norm().item() + 1e-8, (n, err, ge[n].norm().item())


def _train(model, steps=30, batch_size=8):
    torch.manual_seed(123)  # the MLM / ITM draws inside forward
    gen = torch.Generator().manual_seed(7)
    batches = [model.synthetic_batch(batch_size, generator=gen) for _ in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        out = model(**batches[step % len(batches)])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name", MICRO)
def test_convergence_eager_vs_fused(name):
    torch.manual_seed(0)
    eager = create(name, fused=False)
    fused = copy.deepcopy(eager)
    set_fused(fused, True)
    le, lf = _train(eager), _train(fused)
    for i, (a, b) in enumerate(zip(le, lf)):
        assert abs(a - b) <= 1e-3 * abs(a), (i, a, b)
    # decreasing: the mean of the last 5 steps well below the first 5
    assert sum(le[-5:]) / 5 < 0.8 * sum(le[:5]) / 5, le


@pytest.mark.parametrize("name", MICRO)
def test_bad_input(name):
    m = create(name)
    b = m.synthetic_batch(2, generator=torch.Generator().manual_seed(0))
    images, ids, mask = b["images"], b["input_ids"], b["attention_mask"]
    with pytest.raises(ValueError):
        m(torch.randn(2, 3, 48, 48), ids, mask)  # wrong size
    with pytest.raises(ValueError):
        m(torch.randn(2, 1, 32, 32), ids, mask)  # wrong channels
    with pytest.raises(ValueError):
        m(images[0], ids, mask)  # not 4-D
    bad = ids.clone()
    bad[0, 1] = m.vocab_size
    with pytest.raises(ValueError):
        m(images, bad, mask)
    bad[0, 1] = -1
    with pytest.raises(ValueError):
        m(images, bad, mask)
    with pytest.raises(ValueError):
        m(torch.cat([images, images]), ids, mask)  # batch mismatch
    with pytest.raises(ValueError):
        m(images, ids, mask[:1])  # mask batch mismatch
    with pytest.raises(ValueError):
        m(images, torch.ones(2, 17, dtype=torch.long), None)  # longer than the context
    with pytest.raises(ValueError):
        m(images, ids, torch.zeros_like(mask))  # no real token
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        m(images, ids.float(), mask)  # wrong dtype: TypeError, as the ops raise
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        m(images, ids, mask.tolist())


@pytest.mark.parametrize("name", MICRO)
def test_byte_tokenizer_end_to_end(name):
    m = create(name)
    ids, mask = ByteTokenizer()(["a red dog", "two cats on the grass, a very long caption indeed"], 16)
    assert ids[1, -1].item() == ByteTokenizer.sep_token_id  # truncated, [SEP] kept
    torch.manual_seed(0)
    out = m(torch.randn(2, 3, 32, 32), ids, mask)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    if name == "clip_micro":
        # pooled at the [SEP] position: changing a padded id does not change the text features
        ids2 = ids.clone()
        ids2[0, -1] = 200
        f1 = m.encode_text(ids, mask, normalize=True)
        f2 = m.encode_text(ids2, mask, normalize=True)
        torch.testing.assert_close(f1, f2)
        # and the padding is never attended: truncating the padding gives the same features
        n = int(mask[0].sum())
        torch.testing.assert_close(m.encode_text(ids[:1, :n], mask[:1, :n], normalize=True), f1[:1],
                                   rtol=1e-5, atol=1e-6)
    else:
        text, image, cls = m.infer(torch.randn(2, 3, 32, 32), ids, mask)
        assert text.shape == (2, 16, 64) and image.shape == (2, 17, 64) and cls.shape == (2, 64)


def test_vilt_mlm_masking_rule():
    from vlfast.models.vilt import mask_tokens

    torch.manual_seed(0)
    ids = torch.randint(5, 261, (64, 64))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    masked, labels = mask_tokens(ids, special, 261, 3)
    sel = labels != -100
    assert not sel[:, 0].any()
    frac = sel.float().mean().item()
    assert 0.12 < frac < 0.18
    assert (masked[sel] == 3).float().mean().item() == pytest.approx(0.8, abs=0.05)
    assert torch.equal(masked[~sel], ids[~sel])
    assert torch.equal(labels[sel], ids[sel])


def test_set_fused_roundtrip_keeps_params():
    m = create("clip_micro", fused=True)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    set_fused(m, False)
    assert all(not x.fused for x in m.modules() if isinstance(getattr(x, "fused", None), bool))
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])
