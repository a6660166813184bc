"""vlfast.patch on open_clip models (the real open_clip and timm, random weights, tiny configs).

Each case: the unpatched model against a patched deepcopy (same weights): every output and every
gradient within the fp32 tolerance, ``state_dict`` keys identical, parameters shared, patch counts
by kind, and every attention on the fused op (calls of ``vlfast.ops.attention`` counted, the
``causal=`` argument recorded: the text tower's dense causal mask must run the kernel's causal
mode, recognised once per mask, not scanned on every call).
"""

import copy

import open_clip
import pytest
import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch.profiler import ProfilerActivity, profile

import vlfast
import vlfast.integrations.open_clip as voc
import vlfast.nn.attention as vattn
from vlfast.testing import assert_close, max_abs_error

VISION = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16)  # 4 heads, 17 tokens
TEXT = dict(context_length=13, vocab_size=100, width=48, heads=4, layers=2)  # causal mask (13, 13)

_SIGLIP_TOWER = "vlfast_test_vit_siglip_tiny"
if _SIGLIP_TOWER not in timm.list_models(_SIGLIP_TOWER):
    @register_model
    def vlfast_test_vit_siglip_tiny(pretrained=False, **kwargs):
        """A SigLIP-style timm tower (no class token, latent attention 'map' pool), tiny."""
        args = dict(patch_size=8, img_size=32, embed_dim=64, depth=2, num_heads=4, class_token=False,
                    global_pool="map")
        return build_model_with_cfg(VisionTransformer, _SIGLIP_TOWER, pretrained, **dict(args, **kwargs))


@pytest.fixture
def scans(monkeypatch):
    """Value scans of masks by the causal-mask recognition."""
    found = []
    real = vattn._scan_causal
    monkeypatch.setattr(vattn, "_scan_causal", lambda mask, true_allows: found.append(mask.shape) or
                        real(mask, true_allows))
    return found


def _create(name, **cfg):
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None, **cfg).eval()


def _inputs(text_len=13):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 100, (2, text_len), generator=g)


def _tensors(out):
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point()}
    return {str(i): v for i, v in enumerate(out) if torch.is_tensor(v) and v.is_floating_point()}


def _run(model, image, text):
    model.zero_grad(set_to_none=True)
    image = image.clone().requires_grad_(True)
    outs = _tensors(model(image, text))
    loss = sum((v * torch.linspace(-1, 1, v.numel()).reshape(v.shape)).sum() for v in outs.values())
    loss.backward()
    return outs, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, image.grad


def check_parity(model, counts, spy, image, text):
    patched = copy.deepcopy(model)
    params_before = [id(p) for p in patched.parameters()]
    rep = vlfast.patch(patched, report=True)
    assert rep.model is patched
    assert rep.counts() == counts, str(rep)
    assert not rep.left, str(rep)
    assert [id(p) for p in patched.parameters()] == params_before
    assert list(patched.state_dict()) == list(model.state_dict())
    out_ref, g_ref, gx_ref = _run(model, image, text)
    spy.clear()
    out, g, gx = _run(patched, image, text)
    assert len(spy) == sum(counts.values()), spy
    assert set(out) == set(out_ref)
    for k in out_ref:
        assert_close(out[k], out_ref[k], msg=k)
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert_close(g[name], g_ref[name], grad=True, msg=name)
    assert_close(gx, gx_ref, grad=True, msg="image grad")
    return patched, (max(max_abs_error(out[k], out_ref[k]) for k in out_ref),
                     max(max_abs_error(g[n], g_ref[n]) for n in g_ref))


def test_clip_text_causal_mask_runs_the_causal_kernel(spy, scans):
    model = _create("ViT-B-16", embed_dim=32, vision_cfg=VISION, text_cfg=TEXT)
    image, text = _inputs()
    patched, _ = check_parity(model, {"torch.nn.MultiheadAttention": 4}, spy, image, text)
    vision, txt = spy[:2], spy[2:]
    assert all(c["q"] == (2, 4, 17, 16) and not c["causal"] and c["bias"] is None for c in vision)
    assert all(c["q"] == (2, 4, 13, 12) and c["causal"] and c["bias"] is None and c["kpm"] is None for c in txt)
    # recognised once: the mask buffer is sliced on every call, scanned only the first time
    assert scans == [(13, 13)]
    spy.clear()
    patched.encode_text(text).sum().backward()
    x = torch.randn(2, 9, 48)
    out = patched.transformer(x, attn_mask=patched.attn_mask[:9, :9])  # another shape: one new scan
    assert_close(out, model.transformer(x, attn_mask=model.attn_mask[:9, :9]))
    assert scans == [(13, 13), (9, 9)] and len(spy) == 4 and all(c["causal"] for c in spy)
    # an in-place change of the buffer is seen (version counter): here the mask made bidirectional
    patched.attn_mask.zero_()
    model.attn_mask.zero_()
    spy.clear()
    assert_close(patched.encode_text(text), model.encode_text(text))
    assert len(scans) == 3 and not any(c["causal"] for c in spy)


def test_clip_custom_blocks_open_clip_attention(spy, scans):
    """CustomResidualAttentionBlock (open_clip's own Attention): qk_norm, scale_heads, inner norm."""
    text_cfg = dict(TEXT, qk_norm=True, scale_heads=True, scale_attn_inner=True)
    model = _create("ViT-B-16", embed_dim=32, vision_cfg=dict(VISION, qk_norm=True), text_cfg=text_cfg)
    with torch.no_grad():  # non-trivial head scales and norms
        for name, p in model.named_parameters():
            if "head_scale" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    image, text = _inputs()
    patched, _ = check_parity(model, {"open_clip Attention": 4}, spy, image, text)
    assert isinstance(patched.transformer.resblocks[0].attn, voc.FusedOpenClipAttention)
    assert [c["causal"] for c in spy] == [False, False, True, True]
    assert scans == [(13, 13)]


def test_siglip_timm_tower(spy):
    cfg = dict(embed_dim=64, init_logit_bias=-10.0,
               vision_cfg=dict(image_size=32, timm_model_name=_SIGLIP_TOWER, timm_model_pretrained=False,
                               timm_pool="map", timm_proj="none"),
               text_cfg=dict(context_length=13, vocab_size=100, width=64, heads=4, layers=2, no_causal_mask=True,
                             proj_bias=True, pool_type="last"))
    model = _create("ViT-B-16-SigLIP", **cfg)
    assert isinstance(model.visual, open_clip.timm_model.TimmModel)
    image, text = _inputs()
    check_parity(model, {"timm Attention": 2, "timm AttentionPoolLatent": 1, "torch.nn.MultiheadAttention": 2},
                 spy, image, text)
    assert spy[2]["q"] == (2, 4, 1, 16) and spy[2]["k"] == (2, 4, 16, 16)  # map pool: latent query
    assert not any(c["causal"] for c in spy)  # SigLIP's text tower is bidirectional


def test_coca_pooler_and_decoder_cross_attention(spy):
    vision = dict(VISION, attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=5, output_tokens=True)
    model = _create("coca_ViT-B-32", embed_dim=48, vision_cfg=vision,
                    text_cfg=dict(TEXT, embed_cls=True, output_tokens=True),
                    multimodal_cfg=dict(context_length=13, vocab_size=100, width=48, heads=4, layers=2,
                                        attn_pooler_heads=4))
    with torch.no_grad():  # open_clip 3.3 leaves the decoder's projection as torch.empty (never initialized)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=48 ** -0.5)
    image, text = _inputs(text_len=12)
    check_parity(model, {"torch.nn.MultiheadAttention": 9}, spy, image, text)
    vision_calls, pooler, text_calls, decoder = spy[:2], spy[2], spy[3:5], spy[5:]
    assert all(c["q"] == (2, 4, 17, 16) for c in vision_calls)
    assert pooler["q"] == (2, 4, 5, 12) and pooler["k"] == (2, 4, 17, 12)  # learned queries, kdim != embed_dim
    # the text tower with CoCa's CLS token: causal + CLS mask per example, (B * H, L, L) -> an additive bias
    assert all(c["q"][2] == 13 and c["bias"] is not None and not c["causal"] for c in text_calls)
    self_attn, cross = decoder[0::2], decoder[1::2]
    assert all(c["causal"] and c["bias"] is None and c["q"][2] == 11 for c in self_attn)  # decoder's own mask
    assert all(c["q"] == (2, 4, 11, 12) and c["k"] == (2, 4, 4, 12) and not c["causal"] for c in cross)


def test_text_causal_on_triton_in_profiler_trace():
    """The text tower on the Triton kernels (interpreter on CPU): causal mode, forward and backward."""
    model = _create("ViT-B-16", embed_dim=16, vision_cfg=dict(VISION, layers=1, width=32),
                    text_cfg=dict(context_length=7, vocab_size=50, width=32, heads=2, layers=1))
    patched = vlfast.patch(copy.deepcopy(model), backend="triton")
    text = torch.randint(1, 50, (2, 7))
    ref = model.encode_text(text)
    ref.sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = patched.encode_text(text)
        out.sum().backward()
    ops = {e.key: e.count for e in prof.key_averages() if e.key.startswith("vlfast::")}
    assert ops.get("vlfast::attention") == 1 and ops.get("vlfast::attention_backward") == 1, ops
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for (n, p), q in zip(model.named_parameters(), patched.parameters()):
        if p.grad is not None:
            assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_left_with_reasons():
    model = _create("ViT-B-16", embed_dim=32, vision_cfg=VISION, text_cfg=dict(TEXT, scaled_cosine_attn=True))
    rep = vlfast.patch(model, report=True)
    assert rep.counts() == {"torch.nn.MultiheadAttention": 2}
    assert len(rep.left) == 2 and all("scaled cosine" in lf.reason for lf in rep.left)
    resnet = _create("RN50", embed_dim=32, vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8,
                                                           head_width=8), text_cfg=TEXT)
    rep = vlfast.patch(resnet, report=True)
    assert [lf.original for lf in rep.left] == ["open_clip.modified_resnet.AttentionPool2d"]
    assert rep.counts() == {"torch.nn.MultiheadAttention": 2}  # the text tower
