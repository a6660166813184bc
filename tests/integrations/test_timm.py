"""vlfast.patch on timm models (the real timm, random weights, tiny configs) and timm's contract on vlfast.nn.Attention.

Each case: the unpatched model against a patched deepcopy (same weights): outputs and every
gradient (parameters and input) within the fp32 tolerance, ``state_dict`` keys identical, the
patched model's parameters the original objects, the patch counts by kind, and the fused op
seen at every attention (calls of ``vlfast.ops.attention`` counted, or, with the Triton backend
under the interpreter, the ``vlfast::attention`` custom op in a profiler trace).
"""

import copy

import pytest
import timm
import timm.layers
import timm.layers.pos_embed_sincos
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import vlfast
import vlfast.integrations.timm as vtimm
from vlfast.models import set_fused
from vlfast.testing import assert_close, max_abs_error

TINY = dict(pretrained=False, depth=2, embed_dim=48, num_heads=3, img_size=32, patch_size=8, num_classes=5)


def _loss(out):
    out = out[0] if isinstance(out, tuple) else out
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * w).sum()


def _run(model, x, **kw):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, **kw)
    _loss(out).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return (out[0] if isinstance(out, tuple) else out), grads, x.grad


def check_parity(model, x, counts, spy, *, backend=None, **call_kw):
    """Patch a deepcopy of ``model``; compare with ``model``; return (report, max output diff, max grad diff)."""
    patched = copy.deepcopy(model)
    params_before = [id(p) for p in patched.parameters()]
    rep = vlfast.patch(patched, report=True, backend=backend)
    patched = rep.model  # the model itself, or its replacement when the root module is an attention
    assert rep.counts() == counts, str(rep)
    assert [id(p) for p in patched.parameters()] == params_before  # shared, not copied
    assert list(patched.state_dict()) == list(model.state_dict())
    out_ref, g_ref, gx_ref = _run(model, x, **call_kw)
    spy.clear()
    out, g, gx = _run(patched, x, **call_kw)
    assert len(spy) == sum(counts.values()), spy  # every attention on the fused op, once per forward
    assert_close(out, out_ref, msg="output")
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert_close(g[name], g_ref[name], grad=True, msg=name)
    assert_close(gx, gx_ref, grad=True, msg="input grad")
    diffs = [max_abs_error(g[n], g_ref[n]) for n in g_ref] + [max_abs_error(gx, gx_ref)]
    return rep, max_abs_error(out, out_ref), max(diffs)


def _tiny(name="vit_tiny_patch16_224", **over):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **over}).eval()


def _perturb_norms(model):
    """Non-trivial affine parameters of every norm (timm initializes them to 1 / 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


# ------------------------------------------------------------------ ViT family
@pytest.mark.parametrize("variant", ["plain", "qk_norm", "registers_no_cls", "fused_attn_off", "map_pool"])
def test_vit_variants(variant, spy):
    over = {"plain": {}, "qk_norm": dict(qk_norm=True),
            "registers_no_cls": dict(class_token=False, reg_tokens=3, global_pool="avg"),
            "fused_attn_off": {}, "map_pool": dict(global_pool="map")}[variant]
    model = _perturb_norms(_tiny(**over))
    if variant == "fused_attn_off":  # timm's eager path in the reference; the patched model still ends in vlfast
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    counts = {"timm Attention": 2}
    if variant == "map_pool":
        counts["timm AttentionPoolLatent"] = 1
    x = torch.randn(2, 3, 32, 32)
    rep, _, _ = check_parity(model, x, counts, spy)
    assert not rep.left
    n_tokens = 16 + (3 if variant == "registers_no_cls" else 1)
    assert spy[0]["q"] == (2, 3, n_tokens, 16) and not spy[0]["causal"]
    if variant == "map_pool":
        assert spy[-1]["q"] == (2, 3, 1, 16) and spy[-1]["k"] == (2, 3, 16, 16)  # latent query on the patches


def test_deit_distilled(spy):
    model = _tiny("deit_tiny_distilled_patch16_224")
    check_parity(model, torch.randn(2, 3, 32, 32), {"timm Attention": 2}, spy)
    assert spy[0]["q"][2] == 18  # patches + class + distillation token


def test_vit_masks_through_the_model(spy):
    """timm's VisionTransformer.forward(x, attn_mask, is_causal): a per-batch bool mask runs as the kernel's
    key padding mask, is_causal as its causal mode, a float mask as an additive bias (with its gradient)."""
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.ones(2, 1, 1, 17, dtype=torch.bool)
    keep[0, ..., 11:] = False
    keep[1, ..., 3:6] = False
    check_parity(model, x, {"timm Attention": 2}, spy, attn_mask=keep)
    assert all(c["kpm"] is not None and c["bias"] is None and not c["causal"] for c in spy)
    assert torch.equal(spy[0]["kpm"], ~keep.view(2, 17))
    check_parity(model, x, {"timm Attention": 2}, spy, is_causal=True)
    assert all(c["causal"] and c["kpm"] is None and c["bias"] is None for c in spy)
    bias = torch.randn(1, 3, 17, 17)
    check_parity(model, x, {"timm Attention": 2}, spy, attn_mask=bias)
    assert all(c["bias"] is not None and not c["causal"] for c in spy)


def test_eva02_rope(spy, monkeypatch):
    model = _perturb_norms(_tiny("eva02_tiny_patch14_224", patch_size=8))
    ropes = []
    real = timm.layers.pos_embed_sincos.apply_rot_embed_cat

    def counting(x, emb, half=False):
        ropes.append(tuple(x.shape))
        return real(x, emb, half=half)

    # the patched module looks the rotation up at each call; timm's own EvaAttention bound it at import
    monkeypatch.setattr(timm.layers.pos_embed_sincos, "apply_rot_embed_cat", counting)
    x = torch.randn(2, 3, 32, 32)
    rep, _, _ = check_parity(model, x, {"timm EvaAttention": 2}, spy)
    assert len(ropes) == 2 * 2  # q and k of both layers: rotary embeddings applied inside the fused module
    assert isinstance(rep.model.blocks[0].attn, vtimm.FusedRopeAttention)
    assert "blocks.0.attn.q_bias" in model.state_dict() and "blocks.0.attn.k_bias" not in model.state_dict()
    # EVA's own attn_mask argument: per-batch padding
    keep = torch.ones(2, 1, 1, 17, dtype=torch.bool)
    keep[1, ..., 9:] = False
    check_parity(model, x, {"timm EvaAttention": 2}, spy, attn_mask=keep)
    assert all(c["kpm"] is not None for c in spy)


def test_pe_core_attention_rope_and_map_pool(spy):
    """EVA with attn_type="rope" (timm.layers.AttentionRope, PE-Core) and its latent attention pool."""
    model = _perturb_norms(_tiny("vit_pe_core_tiny_patch16_384", patch_size=8))
    check_parity(model, torch.randn(2, 3, 32, 32), {"timm AttentionRope": 2, "timm AttentionPoolLatent": 1}, spy)


def test_grouped_query_attention_rope(spy):
    m = timm.layers.AttentionRope(48, num_heads=4, qkv_fused=False, num_kv_heads=2, qk_norm=True,
                                  norm_layer=nn.LayerNorm, num_prefix_tokens=1).eval()
    rope = torch.randn(9, 24)  # (tokens after the prefix, 2 * head_dim): sin | cos
    x = torch.randn(2, 10, 48)
    patched = vlfast.patch(copy.deepcopy(m))
    assert isinstance(patched, vtimm.FusedRopeAttention)
    assert list(patched.state_dict()) == list(m.state_dict())
    spy.clear()
    assert_close(patched(x, rope=rope), m(x, rope=rope))
    assert spy[0]["k"] == (2, 4, 10, 12)  # kv heads repeated for the kernel


@pytest.mark.parametrize("mask", ["none", "padding", "dense_bool", "float", "causal"])
def test_attention_module_all_options(mask, spy):
    """timm.layers.Attention with every constructor option, and each kind of SDPA mask."""
    m = timm.layers.Attention(40, num_heads=4, attn_head_dim=12, dim_out=24, qkv_bias=True, qk_norm=True,
                              scale_norm=True, proj_bias=False, gated=True, norm_layer=nn.LayerNorm).eval()
    _perturb_norms(m)
    x = torch.randn(3, 7, 40)
    kw = {}
    if mask == "padding":
        kw["attn_mask"] = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0, 1] * 3 + [1]], dtype=torch.bool)[:, None, None]
    elif mask == "dense_bool":
        kw["attn_mask"] = torch.rand(3, 1, 7, 7) > 0.3
        kw["attn_mask"][..., 0] = True  # no fully masked row (SDPA gives NaN there)
    elif mask == "float":
        kw["attn_mask"] = torch.randn(1, 4, 7, 7)
    elif mask == "causal":
        kw["is_causal"] = True
    check_parity(m, x, {"timm Attention": 1}, spy, **kw)
    call = spy[0]
    assert call["q"] == (3, 4, 7, 12)
    assert (call["kpm"] is not None) == (mask == "padding")
    assert (call["bias"] is not None) == (mask in ("dense_bool", "float"))
    assert call["causal"] == (mask == "causal")


def test_float_mask_gradient(spy):
    m = timm.layers.Attention(32, num_heads=2, qkv_bias=True).eval()
    patched = vlfast.patch(copy.deepcopy(m))
    x = torch.randn(2, 5, 32)
    bias = torch.randn(2, 2, 5, 5, requires_grad=True)
    m(x, attn_mask=bias).sum().backward()
    ref = bias.grad.clone()
    bias.grad = None
    patched(x, attn_mask=bias).sum().backward()
    assert_close(bias.grad, ref, grad=True)


# ------------------------------------------------------------------ vlfast.nn.Attention takes timm's contract
@pytest.mark.parametrize("over", [{}, dict(qk_norm=True), dict(class_token=False, reg_tokens=2, global_pool="avg")])
def test_attn_layer_vlfast_attention(over, spy):
    ref = _perturb_norms(_tiny(**over))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", attn_layer=vlfast.nn.Attention, **{**TINY, **over}).eval()
    assert all(isinstance(b.attn, vlfast.nn.Attention) for b in model.blocks)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_ref, g_ref, _ = _run(ref, x)
    spy.clear()
    out, g, _ = _run(model, x)
    assert len(spy) == 2
    assert_close(out, out_ref)
    for name in g_ref:
        assert_close(g[name], g_ref[name], grad=True, msg=name)
    # timm's call: attn_mask / is_causal through the model
    keep = torch.ones(2, 1, 1, model.patch_embed.num_patches + model.num_prefix_tokens, dtype=torch.bool)
    keep[0, ..., -4:] = False
    assert_close(model(x, attn_mask=keep), ref(x, attn_mask=keep))
    assert_close(model(x, is_causal=True), ref(x, is_causal=True))


def test_vlfast_attention_timm_constructor_and_call():
    kw = dict(attn_head_dim=12, dim_out=24, qkv_bias=True, qk_norm=True, scale_norm=True, proj_bias=False,
              gated=True, norm_layer=nn.LayerNorm)
    ref = timm.layers.Attention(40, 4, **kw)
    m = vlfast.nn.Attention(40, 4, **kw, backend="torch")
    assert list(m.state_dict()) == list(ref.state_dict())
    assert all(m.state_dict()[k].shape == v.shape for k, v in ref.state_dict().items())
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 40)
    assert_close(m(x), ref(x))
    assert_close(m(x, None, True), ref(x, None, True))  # timm's positional call
    assert m.fused_attn is True
    m.fused_attn = False
    assert m.fused is False
    assert_close(m(x), ref(x))
    meta = vlfast.nn.Attention(40, 4, device="meta", dtype=torch.bfloat16)
    assert meta.qkv.weight.is_meta and meta.qkv.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="attn_head_dim"):  # vlfast 0.1's positional qkv_bias
        vlfast.nn.Attention(32, 4, True)
    with pytest.raises(ValueError, match="is_causal"):
        m(x, attn_mask=torch.ones(6, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="attn_mask"):
        m(x, attn_mask=torch.ones(6, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, attn_mask=torch.ones(3, 6, dtype=torch.bool))


def test_causal_bool_mask_recognised(spy):
    """A dense (N, N) causal mask (SDPA convention: True = attend) runs the kernel's causal mode."""
    m = vlfast.nn.Attention(32, 2)
    ref = timm.layers.Attention(32, 2)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 32)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    assert_close(m(x, attn_mask=mask), ref(x, attn_mask=mask))
    assert spy[-1]["causal"] and spy[-1]["bias"] is None


# ------------------------------------------------------------------ backend, fused flag, leaves, versions
def test_triton_backend_in_profiler_trace():
    """Triton kernels (the interpreter on CPU): vlfast::attention and its backward in the trace."""
    model = _tiny(depth=1, embed_dim=32, num_heads=2, img_size=16)
    patched = vlfast.patch(copy.deepcopy(model), backend="triton")
    assert patched.blocks[0].attn.backend == "triton"
    x = torch.randn(2, 3, 16, 16)
    out_ref, g_ref, _ = _run(model, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, g, _ = _run(patched, x)
    ops = {e.key: e.count for e in prof.key_averages() if e.key.startswith("vlfast::")}
    assert ops.get("vlfast::attention") == 1 and ops.get("vlfast::attention_backward") == 1, ops
    assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    for name in g_ref:
        assert_close(g[name], g_ref[name], atol=1e-4, rtol=1e-4, msg=name)


def test_backend_and_set_fused(spy, monkeypatch):
    model = _tiny("eva02_tiny_patch14_224", patch_size=8, global_pool="map")
    patched = vlfast.patch(copy.deepcopy(model), backend="torch")
    x = torch.randn(1, 3, 32, 32)
    patched(x)
    assert {c["backend"] for c in spy} == {"torch"}
    refs = []
    real = vtimm.attention_reference
    monkeypatch.setattr(vtimm, "attention_reference", lambda *a, **k: refs.append(1) or real(*a, **k))
    set_fused(patched, False)
    assert patched.blocks[0].attn.fused_attn is False
    spy.clear()
    assert_close(patched(x), model(x))
    assert (len(spy), len(refs)) == (0, 3)  # 2 EVA layers + the map pool on the eager formula


def test_left_with_reasons():
    diff = _tiny(attn_layer="diff")
    with pytest.warns(UserWarning, match="nothing to patch"):
        rep = vlfast.patch(diff, report=True)
    assert [lf.reason for lf in rep.left] == [vtimm._LEFT["timm.layers.diff_attention.DiffAttention"]] * 2

    class MyAttention(timm.layers.Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x, attn_mask, is_causal) * 2

    sub = _tiny(attn_layer=MyAttention)
    with pytest.warns(UserWarning, match="nothing to patch"):
        rep = vlfast.patch(sub, report=True)
    assert len(rep.left) == 2 and "subclass of timm.layers.attention.Attention" in rep.left[0].reason
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1,), num_heads=(2,),
                             embed_dim=16, img_size=28, window_size=7)
    with pytest.warns(UserWarning, match="nothing to patch"):
        rep = vlfast.patch(swin, report=True)
    assert rep.left and all(lf.reason == vtimm._GENERIC for lf in rep.left)


def test_patch_twice_and_attention_false():
    model = _tiny()
    vlfast.patch(model)
    with pytest.warns(UserWarning, match="nothing to patch"):
        assert len(vlfast.patch(model, report=True)) == 0
    fresh = _tiny()
    with pytest.warns(UserWarning, match="nothing to patch"):
        vlfast.patch(fresh, attention=False)
    assert type(fresh.blocks[0].attn) is timm.layers.Attention


def test_hooks_and_mode_carried_over():
    model = _tiny()
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda mod, inp, out: seen.append(type(mod).__name__))
    model.blocks[0].attn.qkv.register_forward_hook(lambda mod, inp, out: seen.append("qkv"))
    model.train()
    patched = vlfast.patch(model)
    assert patched.blocks[0].attn.training
    patched(torch.randn(1, 3, 32, 32))
    assert seen == ["qkv", "Attention"] and isinstance(patched.blocks[0].attn, vlfast.nn.Attention)


def test_untested_version_warns(monkeypatch):
    import vlfast.integrations._core as core

    monkeypatch.setattr(core, "library_version", lambda dist: "0.9.0")
    monkeypatch.setattr(core, "_warned_versions", set())
    with pytest.warns(UserWarning, match="timm 0.9.0 is not a version"):
        vlfast.patch(_tiny())
