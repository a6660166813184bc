"""CoCa (vlfast.models.coca): open_clip coca_ViT-B-32 names and size, numeric parity with open_clip's own
CoCa class, eager/fused parity of the loss and every gradient (torch and Triton backends), convergence,
greedy generation, input errors, ``vlfast train``."""

import copy

import pytest
import torch

import vlfast.nn.attention as nn_attention
import vlfast.ops.contrastive_losses as contrastive_losses
from vlfast.models import create, list_models, set_fused
from vlfast.models.coca import AttentionalPooler, CoCa
from vlfast.models.tokenizer import PAD, SEP, ByteTokenizer
from vlfast.nn import ClipLoss, MultiheadAttention
from vlfast.testing import assert_close

PARTS = ("loss", "contrastive", "caption")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The micro model's ops are tiny: intra-op threads only add OpenMP spin-waits on a busy host."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _micro(seed=0, **kw):
    torch.manual_seed(seed)
    return create("coca_micro", **kw)


def _batch(model, n=5, seed=0, length=15):
    """A synthetic batch cut to an odd text length (the decoder then sees 14 tokens, the text tower 16)."""
    b = model.synthetic_batch(n, generator=torch.Generator().manual_seed(seed))
    b["input_ids"], b["attention_mask"] = b["input_ids"][:, :length], b["attention_mask"][:, :length]
    return b


class _Counter:
    """Counts the calls of vlfast.ops.attention (through vlfast.nn) and of the contrastive op."""

    def __init__(self, monkeypatch):
        self.attention, self.contrastive = [], 0
        attn, cl = nn_attention.attention, contrastive_losses.contrastive_loss

        def attention(q, k, v, **kw):
            self.attention.append((q.shape[2], k.shape[2], kw.get("causal", False),
                                   kw.get("key_padding_mask") is not None))
            return attn(q, k, v, **kw)

        def contrastive_loss(*a, **kw):
            self.contrastive += 1
            return cl(*a, **kw)

        monkeypatch.setattr(nn_attention, "attention", attention)
        monkeypatch.setattr(contrastive_losses, "contrastive_loss", contrastive_loss)

    def expect_micro(self, L, padded=True, forwards=1, losses=1):
        """One CoCa-micro forward: 2 ViT layers (17 tokens), the pooler (9 queries, 17 keys), 2 causal text
        layers (L + 1 with [CLS], padding mask), 2 x (causal decoder self-attention over L - 1, cross-attention
        L - 1 -> 8 image tokens); two contrastive_loss calls (image->text, text->image)."""
        one = ([(17, 17, False, False)] * 2 + [(9, 17, False, False)] + [(L + 1, L + 1, True, padded)] * 2
               + [(L - 1, L - 1, True, False), (L - 1, 8, False, False)] * 2)
        assert self.attention == one * forwards
        assert self.contrastive == 2 * losses


# ------------------------------------------------------------------------------------ structure
def test_registered():
    names = list_models()
    assert "coca_vit_b32" in names and "coca_micro" in names


def test_coca_vit_b32_names_and_count_match_open_clip():
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        ours = create("coca_vit_b32")
        ref = open_clip.create_model("coca_ViT-B-32", pretrained=None, device="meta")
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 253_560_065
    # the same keys, in the same order, with the same shapes (open_clip's attn_mask buffers are non-persistent)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
           [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    sd = ours.state_dict()
    for key, shape in [("visual.attn_pool.query", (256, 512)), ("visual.attn_pool.attn.k_proj_weight", (512, 768)),
                       ("visual.proj", (512, 512)), ("visual.ln_post.weight", (512,)),
                       ("visual.positional_embedding", (50, 768)), ("text.cls_emb", (512,)),
                       ("text.positional_embedding", (77, 512)),
                       ("text_decoder.cross_attn.11.ln_1_kv.weight", (512,)),
                       ("text_decoder.text_projection", (512, 49408))]:
        assert tuple(sd[key].shape) == shape, key
    assert ours.context_length == 76 and ours.caption_loss_weight == 2.0 and ours.clip_loss_weight == 1.0


def test_vlfast_modules_and_set_fused():
    m = _micro()
    mhas = [mod for mod in m.modules() if isinstance(mod, torch.nn.MultiheadAttention)]
    assert len(mhas) == 2 + 1 + 2 + 4 and all(isinstance(mod, MultiheadAttention) for mod in mhas)
    assert isinstance(m.visual.attn_pool, AttentionalPooler) and isinstance(m.loss_fn, ClipLoss)
    flagged = [mod for mod in m.modules() if isinstance(getattr(mod, "fused", None), bool)]
    assert len(flagged) == len(mhas) + 1
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    set_fused(m, False)
    assert all(mod.fused is False for mod in flagged)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="multimodal_width"):
        create("coca_micro", multimodal_width=32)
    with pytest.raises(ValueError, match="attn_pooler_queries"):
        create("coca_micro", attn_pooler_queries=1)


def test_synthetic_batch():
    m = _micro()
    b1 = m.synthetic_batch(4, generator=torch.Generator().manual_seed(3))
    b2 = m.synthetic_batch(4, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(b1[k], b2[k]) for k in ("images", "input_ids", "attention_mask"))
    ids, att = b1["input_ids"], b1["attention_mask"]
    assert b1["images"].shape == (4, 3, 32, 32) and ids.shape == att.shape == (4, 16) and ids.dtype == torch.long
    assert ((ids == PAD) == (att == 0)).all()
    big = CoCa(embed_dim=32, image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
               attn_pooler_queries=3, attn_pooler_heads=2, context_length=8, vocab_size=1000, text_width=32,
               text_heads=2, text_layers=1, multimodal_width=32, multimodal_heads=2, multimodal_layers=1)
    b = big.synthetic_batch(6, generator=torch.Generator().manual_seed(0))
    ids = b["input_ids"]
    assert (ids[:, 0] == 998).all() and ((ids == 999).sum(1) == 1).all()
    assert ((ids == 0) == (b["attention_mask"] == 0)).all()
    assert torch.isfinite(big(**b)["loss"])
    with pytest.raises(ValueError):
        m.synthetic_batch(0)


# ------------------------------------------------------------------------------------ open_clip parity
def _open_clip_micro():
    from open_clip.coca_model import CoCa as OpenClipCoCa

    torch.manual_seed(1)
    ref = OpenClipCoCa(
        64,
        multimodal_cfg=dict(context_length=16, vocab_size=261, width=64, heads=4, layers=2),
        text_cfg=dict(context_length=16, vocab_size=261, width=64, heads=4, layers=2, embed_cls=True,
                      output_tokens=True),
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16, attentional_pool=True,
                        attn_pooler_queries=9, attn_pooler_heads=4, output_tokens=True))
    torch.nn.init.normal_(ref.text_decoder.text_projection, std=64 ** -0.5)  # open_clip leaves it torch.empty
    return ref


@pytest.mark.parametrize("correct_cls_mask", [False, True], ids=["legacy-mask", "correct-mask"])
def test_numeric_parity_with_open_clip(monkeypatch, correct_cls_mask):
    pytest.importorskip("open_clip")
    from open_clip.loss import CoCaLoss

    ref = _open_clip_micro()
    ref.text.correct_cls_mask = correct_cls_mask
    ours = create("coca_micro", correct_cls_mask=correct_cls_mask)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 474_305
    ids, att = ByteTokenizer()(["a red dog", "two cats on the grass, a long one", "sky", "a b", "boat"], 15)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    out_ref = ref(images, ids)
    loss_ref = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)(**out_ref, output_dict=True)
    total_ref = loss_ref["contrastive_loss"] + loss_ref["caption_loss"]
    total_ref.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}

    for fused in (True, False):
        set_fused(ours, fused)
        ours.zero_grad(set_to_none=True)
        counter = _Counter(monkeypatch)
        feats = ours.forward_features(images, ids)
        out = ours(images, ids, att)
        if fused:
            counter.expect_micro(15, forwards=2)  # forward_features, then forward
        else:
            assert counter.attention == [] and counter.contrastive == 0
        for k in ("image_features", "text_features", "logits", "logit_scale"):
            assert_close(feats[k], out_ref[k], msg=k)
        assert torch.equal(feats["labels"], out_ref["labels"])
        assert_close(out["contrastive"], loss_ref["contrastive_loss"], msg="contrastive")
        assert_close(out["caption"], loss_ref["caption_loss"], msg="caption")
        assert_close(out["loss"], total_ref, msg="loss")
        out["loss"].backward()
        for n, p in ours.named_parameters():
            assert_close(p.grad, grads_ref[n], grad=True, msg=n)
        monkeypatch.undo()


def test_padding_mask_is_open_clips_legacy_shift():
    """Legacy: key j >= 1 masked when token j - 1 is padding, [CLS] column first (open_clip's CoCa)."""
    m = _micro()
    ids = torch.tensor([[1, 50, 2, 0, 0], [1, 60, 61, 62, 2]])
    assert torch.equal(m.text.key_padding_mask(ids),
                       torch.tensor([[False, False, False, False, True, True], [False] * 6]))
    m.text.correct_cls_mask = True
    assert torch.equal(m.text.key_padding_mask(ids),
                       torch.tensor([[False, False, False, True, True, False], [False] * 6]))
    assert m.text.key_padding_mask(ids[1:]) is None


# ------------------------------------------------------------------------------------ eager vs fused
def _step(model, batch, fused):
    set_fused(model, fused)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_parity(model, batch, out_e, g_e, out_f, g_f):
    for k in PARTS:
        assert torch.isfinite(out_e[k])
        assert_close(out_f[k], out_e[k], msg=k)
    assert set(g_e) == set(g_f) == {n for n, _ in model.named_parameters()}
    for n in g_e:
        assert g_e[n].abs().sum() > 0, n  # every parameter learns (the pooler's queries, cls_emb, logit_scale...)
        assert_close(g_f[n], g_e[n], grad=True, msg=n)


def test_eager_fused_parity_loss_and_every_grad(monkeypatch):
    m = _micro()
    batch = _batch(m)
    out_e, g_e = _step(m, batch, False)
    counter = _Counter(monkeypatch)
    out_f, g_f = _step(m, batch, True)
    counter.expect_micro(15)
    _assert_parity(m, batch, out_e, g_e, out_f, g_f)


@pytest.mark.slow
def test_fused_triton_backend_in_interpreter(monkeypatch):
    """The fused path on the Triton kernels (the interpreter on CPU: tests/conftest.py) matches eager."""
    pytest.importorskip("triton")
    m = _micro()
    ids, att = ByteTokenizer()(["a dog", "sky"], 7)  # a padded row; L + 1 = 8 text positions
    batch = {"images": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "input_ids": ids,
             "attention_mask": att}
    out_e, g_e = _step(m, batch, False)
    monkeypatch.setenv("VLFAST_BACKEND", "triton")
    counter = _Counter(monkeypatch)
    out_f, g_f = _step(m, batch, True)
    counter.expect_micro(7)
    _assert_parity(m, batch, out_e, g_e, out_f, g_f)


# ------------------------------------------------------------------------------------ convergence
def _train(model, steps=30):
    batch = _batch(model, n=8, seed=5, length=16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rows = []
    for _ in range(steps):
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        rows.append([out[k].item() for k in PARTS])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.slow
def test_convergence_eager_vs_fused():
    eager = _micro()
    fused = copy.deepcopy(eager)
    set_fused(eager, False)
    set_fused(fused, True)
    e, f = _train(eager), _train(fused)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-3)
    for c in (e, f):
        for col in range(3):  # total, contrastive and caption all fall
            assert c[-5:, col].mean() < 0.7 * c[:5, col].mean(), (col, c[:, col])


# ------------------------------------------------------------------------------------ generation
def test_greedy_generate_matches_the_decoder_argmax():
    m = _micro().eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = m.generate(images, max_length=6)
    assert out.dtype == torch.long and out.shape[0] == 3 and 2 <= out.shape[1] <= 6
    assert (out[:, 0] == ByteTokenizer.cls_token_id).all()
    assert torch.equal(out, m.generate(images, max_length=6))
    # every generated token is the argmax of the teacher-forced decoder on the prefix (rows not yet ended)
    feats = m.forward_features(images, torch.cat([out, torch.full_like(out[:, :1], SEP)], 1))
    pred = feats["logits"].argmax(-1)
    for i in range(3):
        for t in range(1, out.shape[1]):
            if (out[i, 1:t] == SEP).any():
                assert out[i, t] == PAD
            else:
                assert out[i, t] == pred[i, t - 1], (i, t)
    # an image batch that must stop at once: eos = the first generated token for every row
    first = out[:, 1]
    if (first == first[0]).all():
        assert m.generate(images, max_length=6, eos_token_id=int(first[0])).shape[1] == 2
    with pytest.raises(ValueError):
        m.generate(images, max_length=17)
    with pytest.raises(ValueError):
        m.generate(images, sot_token_id=261)


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs():
    m = _micro()
    b = _batch(m, n=4)
    imgs, ids, att = b["images"], b["input_ids"], b["attention_mask"]
    value_errors = [
        dict(images=imgs[:, :, :16]), dict(images=imgs[:, :1]), dict(images=imgs[0]), dict(images=imgs[:3]),
        dict(input_ids=ids.clone().fill_(m.vocab_size)), dict(input_ids=ids - 1), dict(input_ids=ids[:, :, None]),
        dict(input_ids=ids[:, :1], attention_mask=att[:, :1]),  # no caption target position
        dict(input_ids=torch.ones(4, 17, dtype=torch.long), attention_mask=None),  # longer than the context
        dict(attention_mask=att[:, :-1]), dict(attention_mask=att[:3]),
        dict(attention_mask=torch.ones_like(att)),  # disagrees with the pad ids
        dict(input_ids=torch.cat([ids[:, :1], torch.zeros_like(ids[:, 1:])], 1), attention_mask=None),
    ]
    for change in value_errors:
        kwargs = dict(images=imgs, input_ids=ids, attention_mask=att)
        kwargs.update(change)
        with pytest.raises(ValueError):
            m(**kwargs)
    with pytest.raises(TypeError, match="input_ids"):
        m(imgs, ids.float(), att)
    with pytest.raises(TypeError, match="attention_mask"):
        m(imgs, ids, att.tolist())
    with pytest.raises(TypeError, match="images"):
        m(imgs.long(), ids, att)
    with pytest.raises(ValueError):
        m.encode_text(ids[:, :, None])


# ------------------------------------------------------------------------------------ vlfast train
def test_vlfast_train_two_steps(tmp_path):
    import json
    import os

    from vlfast.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--model", "coca_micro", "--steps", "2", "--batch-size", "4", "--out", out,
                 "--no-progress", "--threads", "1"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss"] == r["loss"] for r in recs)
