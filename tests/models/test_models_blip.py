"""BLIP reference model (vlfast.models.blip): structure and counts vs HF, eager/fused parity (the causal
decoder included), convergence, HF numerics through the converter, greedy generation, input errors, train CLI."""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

import vlfast._backend
import vlfast.nn.attention as nn_attention
import vlfast.nn.contrastive as nn_contrastive
from vlfast.models import create, list_models, set_fused
from vlfast.models.blip import BLIP, convert_hf_blip_checkpoint
from vlfast.models.tokenizer import CLS, PAD, SEP, ByteTokenizer
from vlfast.nn import Attention, CrossAttention, MomentumEncoder

PARTS = ("loss", "itc", "itm", "lm")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n(module):
    return sum(p.numel() for p in module.parameters())


def _micro(seed=0, **kw):
    torch.manual_seed(seed)
    return create("blip_micro", **kw)


def _batch(model, n=4, seed=0):
    return model.synthetic_batch(n, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ structure
def test_registered():
    names = list_models()
    assert "blip_base" in names and "blip_micro" in names


def test_blip_base_meta_count_names_and_tying_vs_hf():
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    with torch.device("meta"):
        m = create("blip_base")
        hf_cap = BlipForConditionalGeneration(BlipConfig())
        hf_ret = BlipForImageTextRetrieval(BlipConfig())
    assert isinstance(m, BLIP)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    assert _n(m.visual_encoder) == 85_798_656  # ViT-B/16 at 224, no head
    assert _n(m.text_encoder.embeddings) == 30524 * 768 + 512 * 768 + 2 * 768  # no token types
    assert _n(m.text_encoder.encoder.layer[0]) == 9_451_776  # self + cross attention + FFN
    assert _n(m.text_encoder) == 137_258_496
    own = [p for n, p in m.named_parameters() if n.startswith("text_decoder.")]
    assert sum(p.numel() for p in own) == 12 * 2_363_904 + 622_652  # causal self-attention + LM head
    assert trainable == 252_441_919
    assert frozen == 85_798_656 + 137_258_496 + 2 * (768 * 256 + 256)  # momentum copies

    # HF default configs (384x384 images): retrieval = vision + text encoder + heads; captioning =
    # vision + a decoder holding its own copy of what BLIP's decoder shares with the encoder
    assert _n(hf_ret) == 223_744_258 and _n(hf_cap) == 223_971_644
    pos_384_vs_224 = (577 - 197) * 768
    assert _n(hf_ret.vision_model) - pos_384_vs_224 == _n(m.visual_encoder)
    assert _n(hf_ret.text_encoder) == _n(m.text_encoder)
    assert trainable == _n(hf_ret) - pos_384_vs_224 + 12 * 2_363_904 + 622_652 + 1  # + temp
    assert trainable == _n(hf_cap) - pos_384_vs_224 + 12 * 2_363_904 + 2 * (768 * 256 + 256) + 1538 + 1

    # sharing (BLIP's tie_encoder_decoder_weights(..., skip_key='/attention'))
    enc, dec = m.text_encoder, m.text_decoder
    assert dec.bert.embeddings is enc.embeddings
    for le, ld in zip(enc.encoder.layer, dec.bert.encoder.layer):
        assert ld.crossattention is le.crossattention and ld.intermediate is le.intermediate
        assert ld.output is le.output and ld.attention is not le.attention
    assert dec.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    with torch.device("meta"):
        untied = create("blip_base", tie_word_embeddings=False)  # salesforce/BLIP's blip_pretrain.py
    assert sum(p.numel() for p in untied.parameters() if p.requires_grad) == trainable + 30524 * 768

    sd = m.state_dict()
    for key, shape in [
        ("visual_encoder.pos_embed", (1, 197, 768)),
        ("visual_encoder.blocks.11.attn.qkv.weight", (2304, 768)),
        ("text_encoder.embeddings.word_embeddings.weight", (30524, 768)),
        ("text_encoder.encoder.layer.0.attention.self.qkv.weight", (2304, 768)),
        ("text_encoder.encoder.layer.0.crossattention.self.kv.weight", (1536, 768)),
        ("text_encoder.encoder.layer.11.output.dense.weight", (768, 3072)),
        ("text_decoder.bert.embeddings.position_embeddings.weight", (512, 768)),
        ("text_decoder.bert.encoder.layer.11.attention.self.qkv.weight", (2304, 768)),
        ("text_decoder.bert.encoder.layer.11.crossattention.self.q.weight", (768, 768)),
        ("text_decoder.cls.predictions.transform.dense.weight", (768, 768)),
        ("text_decoder.cls.predictions.decoder.weight", (30524, 768)),
        ("text_decoder.cls.predictions.bias", (30524,)),
        ("vision_proj.weight", (256, 768)), ("text_proj.weight", (256, 768)), ("itm_head.weight", (2, 768)),
        ("itc.temp", ()), ("itc.image_queue", (57600, 256)),
        ("visual_encoder_m.module.blocks.0.attn.qkv.weight", (2304, 768)),
        ("text_encoder_m.module.encoder.layer.11.crossattention.self.kv.weight", (1536, 768)),
    ]:
        assert tuple(sd[key].shape) == shape, key
    assert not any("token_type" in k for k in sd)
    assert not any(k.startswith("text_decoder_m") for k in sd)
    assert m.bos_token_id == 30522 and m.enc_token_id == 30523 and m.itc.queue_size == 57600


def test_set_fused_reaches_every_component():
    m = _micro()
    flagged = [mod for mod in m.modules() if isinstance(getattr(mod, "fused", None), bool)]
    assert {Attention, CrossAttention, MomentumEncoder, type(m.itc)} <= {type(mod) for mod in flagged}
    set_fused(m, False)
    assert all(mod.fused is False for mod in flagged)
    assert all(layer.attention.self.fused is False for layer in m.text_decoder.bert.encoder.layer)


def test_synthetic_batch_and_tokenizer_captions():
    m = _micro()
    b1, b2 = _batch(m, 4, seed=3), _batch(m, 4, seed=3)
    for k in ("images", "input_ids", "attention_mask"):
        assert torch.equal(b1[k], b2[k])
    ids, att = b1["input_ids"], b1["attention_mask"]
    assert b1["images"].shape == (4, 3, 32, 32) and ids.shape == att.shape == (4, 15)
    assert (ids[:, 0] == CLS).all() and ((ids == PAD) == (att == 0)).all()
    assert int(ids.max()) < m.bos_token_id
    tok_ids, tok_att = ByteTokenizer()(["a cat", "two dogs", "a red car", "sky"], max_length=m.text_len)
    out = m(b1["images"], tok_ids, tok_att)
    assert all(torch.isfinite(out[k]) for k in PARTS)


# ------------------------------------------------------------------------------------ parity
def _step(model, batch, fused, seed, **kw):
    set_fused(model, fused)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch, **kw)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads, copy.deepcopy(model.state_dict())


def _count_calls(monkeypatch):
    calls = {"attention": 0, "causal": 0, "contrastive": 0}
    attn, con = nn_attention.attention, nn_contrastive.contrastive_loss

    def attention(*a, **k):
        calls["attention"] += 1
        calls["causal"] += bool(k.get("causal")) and k.get("key_padding_mask") is not None
        return attn(*a, **k)

    def contrastive_loss(*a, **k):
        calls["contrastive"] += 1
        return con(*a, **k)

    monkeypatch.setattr(nn_attention, "attention", attention)
    monkeypatch.setattr(nn_contrastive, "contrastive_loss", contrastive_loss)
    return calls


def _assert_parity(m, out_e, g_e, out_f, g_f, rel=1e-4):
    diffs = {}
    for k in PARTS:
        assert torch.isfinite(out_e[k])
        torch.testing.assert_close(out_f[k], out_e[k], rtol=1e-5, atol=1e-5, msg=k)
        diffs[k] = (out_f[k] - out_e[k]).abs().item()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert set(g_e) == set(g_f) == trainable
    for n in trainable:
        err = ((g_f[n] - g_e[n]).norm() / g_e[n].norm().clamp(min=1e-8)).item()
        assert err < rel, (n, err)
    return diffs


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.7, "idx": torch.tensor([3, 1, 3, 0])}], ids=["alpha0.4", "idx"])
def test_eager_fused_parity_every_gradient(kw, monkeypatch):
    m = _micro()
    batch = _batch(m, 4)
    assert (batch["attention_mask"] == 0).any(1).sum() >= 2  # decoder under causal + padding
    m(**_batch(m, 4, seed=1))  # a non-trivial queue / momentum state
    sd0 = copy.deepcopy(m.state_dict())
    calls = _count_calls(monkeypatch)
    out_e, g_e, sd_e = _step(m, batch, False, 7, **kw)
    assert calls == {"attention": 0, "causal": 0, "contrastive": 0}  # eager: no fused op
    m.load_state_dict(sd0)
    out_f, g_f, sd_f = _step(m, batch, True, 7, **kw)
    layers = len(m.text_decoder.bert.encoder.layer)
    assert calls["causal"] == layers and calls["contrastive"] > 0 and calls["attention"] > layers
    _assert_parity(m, out_e, g_e, out_f, g_f)
    # the decoder's own self-attention and the LM head learn
    for n in ("text_decoder.bert.encoder.layer.0.attention.self.qkv.weight", "text_decoder.cls.predictions.bias",
              "text_encoder.encoder.layer.1.crossattention.self.kv.weight", "itc.temp"):
        assert g_e[n].abs().max() > 0, n
    for k in sd0:
        if k.startswith(("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")):
            assert torch.equal(sd_f[k], sd_e[k]), k
    assert torch.equal(sd_e["itc.queue_ptr"], sd_f["itc.queue_ptr"])


ops_attention = importlib.import_module("vlfast.ops.attention")  # the module (vlfast.ops.attention is the function)
_TRITON_SKIP = vlfast._backend.get_op("attention").unavailable("triton", torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.skipif(_TRITON_SKIP is not None, reason=_TRITON_SKIP or "")
def test_decoder_causal_attention_triton_backend_matches_eager(monkeypatch):
    """The decoder's causal + padding self-attention on the Triton kernels (the interpreter on CPU)."""
    m = _micro()
    batch = _batch(m, 4)
    sd0 = copy.deepcopy(m.state_dict())
    out_e, g_e, _ = _step(m, batch, False, 3)
    m.load_state_dict(sd0)
    for layer in m.text_decoder.bert.encoder.layer:
        layer.attention.self.backend = "triton"
    launches = {"forward": 0, "backward": 0}
    fwd, bwd = ops_attention._attention_forward_kernel, ops_attention._attention_backward_kernel

    def forward_kernel(*a, **k):
        launches["forward"] += 1
        return fwd(*a, **k)

    def backward_kernel(*a, **k):
        launches["backward"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(ops_attention, "_attention_forward_kernel", forward_kernel)
    monkeypatch.setattr(ops_attention, "_attention_backward_kernel", backward_kernel)
    out_f, g_f, _ = _step(m, batch, True, 3)
    layers = len(m.text_decoder.bert.encoder.layer)
    assert launches == {"forward": layers, "backward": layers}  # only the decoder's self-attention
    _assert_parity(m, out_e, g_e, out_f, g_f, rel=1e-4)


def test_lm_loss_is_blip_next_token_label_smoothed_ce():
    m = _micro()
    b = _batch(m, 4)
    torch.manual_seed(0)
    out = m(**b)
    dec, tgt = m.lm_targets(b["input_ids"], b["attention_mask"])
    assert (dec[:, 0] == m.bos_token_id).all() and (tgt[b["attention_mask"] == 0] == -100).all()
    with torch.no_grad():
        logits = m.text_decoder(dec, b["attention_mask"] == 0, m.visual_encoder.forward_features(b["images"]))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, m.vocab_size), tgt[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(out["lm"].detach(), ref, rtol=1e-5, atol=1e-6)
    # causal: changing a later token leaves earlier logits unchanged
    dec2 = dec.clone()
    dec2[:, 3] = 7
    with torch.no_grad():
        logits2 = m.text_decoder(dec2, b["attention_mask"] == 0, m.visual_encoder.forward_features(b["images"]))
    torch.testing.assert_close(logits2[:, :3], logits[:, :3])
    assert not torch.allclose(logits2[:, 3:], logits[:, 3:])
    # prompt tokens are ignored by the loss
    mp = _micro(prompt_length=3)
    assert (mp.lm_targets(b["input_ids"], b["attention_mask"])[1][:, :3] == -100).all()


# ------------------------------------------------------------------------------------ convergence
@pytest.mark.slow
def test_convergence_eager_vs_fused():
    torch.manual_seed(0)
    init = copy.deepcopy(create("blip_micro").state_dict())
    curves = {}
    for fused in (False, True):
        m = create("blip_micro", fused=fused)
        m.load_state_dict(init)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        g = torch.Generator().manual_seed(0)
        rows = []
        for step in range(30):
            batch = m.synthetic_batch(8, generator=g)
            torch.manual_seed(1000 + step)
            out = m(**batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            rows.append([out[k].item() for k in PARTS])
        curves[fused] = torch.tensor(rows, dtype=torch.float64)
    e, f = curves[False], curves[True]
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-4)
    for c in (e, f):
        assert c[-5:, 0].mean() < c[:5, 0].mean()
        assert c[-5:, 1].mean() < c[:5, 1].mean()  # ITC learns
        assert c[-5:, 3].mean() < 0.8 * c[:5, 3].mean()  # the captioning LM learns (5.4 -> 3.8)


# ------------------------------------------------------------------------------------ HF
def _tiny_hf():
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    cfg = BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6, attention_dropout=0.0),
        text_config=dict(vocab_size=263, hidden_size=64, encoder_hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, bos_token_id=261,
                         pad_token_id=PAD, sep_token_id=SEP, label_smoothing=0.1),
        image_text_hidden_size=32)
    torch.manual_seed(11)
    cap = BlipForConditionalGeneration(cfg).eval()
    ret = BlipForImageTextRetrieval(cfg).eval()
    # one tied BLIP split into HF's two models: the same vision encoder and shared text weights
    ret.vision_model.load_state_dict(cap.vision_model.state_dict())
    shared = {k: v for k, v in cap.text_decoder.bert.state_dict().items()
              if ".attention." not in k or ".crossattention." in k}
    missing = ret.text_encoder.load_state_dict(shared, strict=False).missing_keys
    assert missing and all(".attention." in k and ".crossattention." not in k for k in missing)
    return cap, ret


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_hf_strict_load_and_numerics(fused):
    cap, ret = _tiny_hf()
    m = _micro(seed=5)
    m.load_hf_state_dicts(cap.state_dict(), ret.state_dict())  # strict
    # momentum copies start as the online weights (BLIP's copy_params)
    assert torch.equal(m.text_encoder_m.module.encoder.layer[0].attention.self.qkv.weight,
                       m.text_encoder.encoder.layer[0].attention.self.qkv.weight)
    set_fused(m.eval(), fused)
    b = _batch(m, 4, seed=2)
    x, ids, att = b["images"], b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        feats = m.visual_encoder.forward_features(x)
        torch.testing.assert_close(feats, cap.vision_model(pixel_values=x).last_hidden_state, rtol=1e-5, atol=1e-5)
        dec, tgt = m.lm_targets(ids, att)
        hf = cap(pixel_values=x, input_ids=dec, attention_mask=att, labels=tgt)
        logits = m.text_decoder(dec, att == 0, feats)
        real = att.bool()
        torch.testing.assert_close(logits[real], hf.logits[real], rtol=1e-5, atol=1e-5)
        torch.manual_seed(0)
        torch.testing.assert_close(m(**b)["lm"], hf.loss, rtol=1e-5, atol=1e-5)  # label smoothing 0.1
        enc = ids.clone()
        enc[:, 0] = m.enc_token_id
        torch.testing.assert_close(m.itm_logits(x, ids, att),
                                   ret(input_ids=enc, pixel_values=x, attention_mask=att).itm_score,
                                   rtol=1e-5, atol=1e-5)
        sim = ret(input_ids=ids, pixel_values=x, attention_mask=att, use_itm_head=False).itm_score
        img = F.normalize(m.vision_proj(feats[:, 0]), dim=-1)
        txt = F.normalize(m.text_proj(m.text_encoder(ids, att == 0)[:, 0]), dim=-1)
        torch.testing.assert_close(img @ txt.t(), sim, rtol=1e-5, atol=1e-5)


def test_hf_converter_keys_and_errors():
    cap, ret = _tiny_hf()
    out = convert_hf_blip_checkpoint(cap.state_dict(), ret.state_dict())
    q = ret.state_dict()["text_encoder.encoder.layer.1.attention.self.query.weight"]
    assert torch.equal(out["text_encoder.encoder.layer.1.attention.self.qkv.weight"][:64], q)
    dq = cap.state_dict()["text_decoder.bert.encoder.layer.1.attention.self.value.weight"]
    assert torch.equal(out["text_decoder.bert.encoder.layer.1.attention.self.qkv.weight"][128:], dq)
    assert out["text_decoder.bert.encoder.layer.0.crossattention.self.kv.weight"] is \
        out["text_encoder.encoder.layer.0.crossattention.self.kv.weight"]
    assert not any("position_ids" in k or k.endswith("decoder.bias") for k in out)
    m = _micro()
    missing = set(m.state_dict()) - set(out)
    assert missing and all(k.startswith("itc.") for k in missing)
    with pytest.raises(ValueError):
        convert_hf_blip_checkpoint()
    with pytest.raises(ValueError):
        convert_hf_blip_checkpoint(cap.state_dict(), shared_from="retrieval")
    with pytest.raises(ValueError):
        convert_hf_blip_checkpoint(cap.state_dict(), ret.state_dict(), shared_from="both")
    # caption alone: the encoder's bidirectional self-attention and the ITC/ITM heads are missing
    res = m.load_hf_state_dicts(cap.state_dict(), strict=False)
    assert any(".attention.self.qkv" in k and k.startswith("text_encoder.") for k in res.missing_keys)
    assert "itm_head.weight" in res.missing_keys


# ------------------------------------------------------------------------------------ generate
def test_generate_greedy_shape_and_stop():
    m = _micro().eval()
    x = _batch(m, 3)["images"]
    seq = m.generate(x, max_length=9)
    assert seq.dtype == torch.long and seq.shape[0] == 3 and 2 <= seq.shape[1] <= 9
    assert (seq[:, 0] == m.bos_token_id).all()
    feats = m.visual_encoder.forward_features(x)
    with torch.no_grad():
        for t in range(1, seq.shape[1]):  # each token is the argmax given the prefix (until SEP)
            live = ~(seq[:, 1:t] == SEP).any(1)
            best = m.text_decoder(seq[:, :t], None, feats)[:, -1].argmax(-1)
            assert torch.equal(seq[live, t], best[live])
            assert (seq[~live, t] == PAD).all()
    # a decoder that prefers [SEP] stops at once; min_length forbids it until then
    with torch.no_grad():
        m.text_decoder.cls.predictions.bias[SEP] = 100.0
    assert torch.equal(m.generate(x, max_length=9), torch.tensor([[m.bos_token_id, SEP]] * 3))
    seq = m.generate(x, max_length=9, min_length=5)
    assert seq.shape == (3, 6) and (seq[:, 5] == SEP).all() and not (seq[:, :5] == SEP).any()
    with torch.no_grad():
        m.text_decoder.cls.predictions.bias[SEP] = -100.0
    assert m.generate(x, max_length=7).shape == (3, 7)  # never stops: max_length
    prompt = torch.tensor([[CLS, 30, 40]] * 3)
    seq = m.generate(x, max_length=6, input_ids=prompt)
    assert seq.shape == (3, 6) and torch.equal(seq[:, 1:3], prompt[:, 1:]) and (seq[:, 0] == m.bos_token_id).all()


def test_generate_bad_arguments():
    m = _micro().eval()
    x = _batch(m, 2)["images"]
    with pytest.raises(ValueError, match="only greedy"):
        m.generate(x, num_beams=3)
    with pytest.raises(TypeError):
        m.generate(x, num_beams=1.0)
    with pytest.raises(TypeError):
        m.generate(x, max_length=5.0)
    for kw in (dict(max_length=1), dict(max_length=65), dict(max_length=5, min_length=6),
               dict(input_ids=torch.ones(3, 2, dtype=torch.long)), dict(input_ids=torch.full((2, 2), 263)),
               dict(max_length=3, input_ids=torch.ones(2, 3, dtype=torch.long))):
        with pytest.raises(ValueError):
            m.generate(x, **kw)
    with pytest.raises(TypeError):
        m.generate(x, input_ids=torch.ones(2, 2))
    with pytest.raises(TypeError):
        m.generate(x.long())


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_and_leave_state_untouched():
    m = _micro()
    b = _batch(m, 4)
    imgs, ids, att = b["images"], b["input_ids"], b["attention_mask"]
    sd0 = copy.deepcopy(m.state_dict())
    bad_value = [
        dict(input_ids=ids.clone().fill_(m.vocab_size)),
        dict(input_ids=torch.where(ids == PAD, torch.full_like(ids, -1), ids)),
        dict(input_ids=ids[:, :, None]),
        dict(input_ids=ids[:, :1], attention_mask=att[:, :1]),
        dict(images=imgs[:, :, :16]), dict(images=imgs[:, :1]), dict(images=imgs[0]), dict(images=imgs[:3]),
        dict(attention_mask=att[:, :-1]), dict(attention_mask=att * 2),
        dict(images=imgs[:1], input_ids=ids[:1], attention_mask=att[:1]),  # ITM needs another pair
        dict(images=imgs[:3], input_ids=ids[:3], attention_mask=att[:3]),  # 3 does not divide the queue
        dict(input_ids=torch.ones(4, 65, dtype=torch.long), attention_mask=torch.ones(4, 65, dtype=torch.long)),
        dict(alpha=1.5),
    ]
    bad_type = [dict(input_ids=ids.float()), dict(images=imgs.long()), dict(images=imgs.numpy()),
                dict(attention_mask=att.tolist())]
    for changes, exc in ((bad_value, ValueError), (bad_type, TypeError)):
        for change in changes:
            kwargs = dict(images=imgs, input_ids=ids, attention_mask=att)
            kwargs.update(change)
            with pytest.raises(exc):
                m(**kwargs)
    sd1 = m.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    with pytest.raises(ValueError):
        m.synthetic_batch(0)
    for kw in (dict(label_smoothing=1.0), dict(prompt_length=15), dict(bos_token_id=263), dict(text_len=1)):
        with pytest.raises(ValueError):
            create("blip_micro", **kw)
    with pytest.raises(TypeError):
        create("blip_micro", global_batch=1)


# ------------------------------------------------------------------------------------ trainer
def test_train_cli_two_steps(tmp_path):
    from vlfast.cli import main

    out = str(tmp_path / "r")
    assert main(["train", "--model", "blip_micro", "--steps", "2", "--batch-size", "4", "--out", out,
                 "--no-progress", "--threads", "1"]) == 0
