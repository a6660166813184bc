"""Attention modules (vlfast.nn.attention) and vlfast.patch against the eager formula
(vlfast.reference.attention_reference, inside timm's projections) and torch's modules."""

import copy
import logging

import pytest
import torch
from torch import nn

import vlfast.nn.attention as va
from vlfast.nn.attention import Attention, CrossAttention, MultiheadAttention
from vlfast.integrations import patch
from vlfast.reference import attention_reference

import vlfast._backend
import vlfast.kernels.attention  # noqa: F401  (a core module: a broken import fails, never skips)

# the triton checks run CPU tensors: only in Triton's interpreter (TRITON_INTERPRET=1, set by conftest without CUDA)
_TRITON_SKIP = vlfast._backend.get_op("attention").unavailable("triton", torch.device("cpu"))
needs_triton = pytest.mark.skipif(_TRITON_SKIP is not None, reason=_TRITON_SKIP or "")

TOL = dict(atol=1e-5, rtol=1e-5)


def _close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or TOL))


# ------------------------------------------------------------------ eager references
def timm_eager(m: Attention, x, key_padding_mask=None, attn_bias=None):
    """timm's ``Attention.forward`` with ``fused_attn=False`` on m's parameters: timm's projections
    around vlfast's one eager formula (timm's ``q * scale @ k^T``, masks, softmax, ``attn_drop``)."""
    B, N, C = x.shape
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    x = attention_reference(q, k, v, key_padding_mask, attn_bias, scale=m.scale,
                            dropout_p=m.attn_drop.p if m.training else 0.0)
    x = x.transpose(1, 2).reshape(B, N, C)
    return m.proj_drop(m.proj(x))


def cross_eager(m: CrossAttention, x, ctx, mask=None):
    """ALBEF / BLIP's cross-attention on m's parameters, around the eager formula."""
    B, Nq, C = x.shape
    Nk = ctx.shape[1]
    q = m.q(x).reshape(B, Nq, m.num_heads, m.head_dim).transpose(1, 2)
    k, v = m.kv(ctx).reshape(B, Nk, 2, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    out = attention_reference(q, k, v, mask, scale=m.scale, dropout_p=m.attn_drop.p if m.training else 0.0)
    return m.proj_drop(m.proj(out.transpose(1, 2).reshape(B, Nq, C)))


def _grads(module, *inputs):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None] + \
           [t.grad.clone() for t in inputs if t is not None and t.grad is not None]


def _zero(module, *inputs):
    module.zero_grad(set_to_none=True)
    for t in inputs:
        if t is not None:
            t.grad = None


# ------------------------------------------------------------------ Attention
@pytest.mark.parametrize("qkv_bias,qk_norm,keys", [
    (False, False, ["qkv.weight", "proj.weight", "proj.bias"]),
    (True, False, ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]),
    (True, True, ["qkv.weight", "qkv.bias", "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias",
                  "proj.weight", "proj.bias"]),
])
def test_attention_state_dict_matches_timm(qkv_bias, qk_norm, keys):
    m = Attention(48, num_heads=4, qkv_bias=qkv_bias, qk_norm=qk_norm)
    sd = m.state_dict()
    assert list(sd) == keys
    assert sd["qkv.weight"].shape == (144, 48) and sd["proj.weight"].shape == (48, 48)
    if qkv_bias:
        assert sd["qkv.bias"].shape == (144,)
    if qk_norm:
        assert sd["q_norm.weight"].shape == (12,)
    assert isinstance(m.attn_drop, nn.Dropout) and isinstance(m.proj_drop, nn.Dropout)
    assert m.scale == 12 ** -0.5


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_timm_forward_and_grads(qk_norm):
    m = Attention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm, backend="torch").eval()
    if qk_norm:  # non-trivial norm affine parameters
        with torch.no_grad():
            for p in list(m.q_norm.parameters()) + list(m.k_norm.parameters()):
                p.normal_()
    x = torch.randn(3, 17, 64, requires_grad=True)
    out = m(x)
    ref = timm_eager(m, x)
    _close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    got = _grads(m, x)
    _zero(m, x)
    ref.backward(g)
    for a, b in zip(got, _grads(m, x)):
        _close(a, b)


def test_attention_key_padding_mask_and_bias():
    m = Attention(32, num_heads=2, qkv_bias=True, backend="torch").eval()
    x = torch.randn(2, 9, 32, requires_grad=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 6:] = True
    kpm[1, ::3] = True
    bias = torch.randn(1, 2, 9, 9, requires_grad=True)
    out = m(x, key_padding_mask=kpm, attn_bias=bias)
    ref = timm_eager(m, x, key_padding_mask=kpm, attn_bias=bias)
    _close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    got = _grads(m, x, bias)
    _zero(m, x, bias)
    ref.backward(g)
    for a, b in zip(got, _grads(m, x, bias)):
        _close(a, b)
    # padded tokens' values do not reach any other token
    x2 = x.detach().clone()
    x2[0, 6:] += 10.0
    _close(m(x2, key_padding_mask=kpm)[0, :6], m(x.detach(), key_padding_mask=kpm)[0, :6])


def test_attention_dropout_only_in_training():
    m = Attention(32, num_heads=4, attn_drop=0.5, backend="torch")
    x = torch.randn(2, 10, 32)
    m.eval()
    _close(m(x), timm_eager(m, x))
    _close(m(x), m(x))
    m.train()
    a, b = m(x), m(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, m.eval()(x))
    m0 = Attention(32, num_heads=4, attn_drop=0.0, backend="torch").train()
    _close(m0(x), m0.eval()(x))


def test_attention_errors():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match="head dim"):
        Attention(1024, num_heads=2)
    m = Attention(32, num_heads=4)
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        m(torch.randn(5, 32))


@needs_triton
def test_attention_triton_backend():
    m = Attention(32, num_heads=2, qkv_bias=True, backend="triton").eval()
    x = torch.randn(2, 7, 32, requires_grad=True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    out = m(x, key_padding_mask=kpm)
    ref = timm_eager(m, x, key_padding_mask=kpm)
    _close(out, ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    got = _grads(m, x)
    _zero(m, x)
    ref.sum().backward()
    for a, b in zip(got, _grads(m, x)):
        _close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ CrossAttention
def test_cross_attention_shapes_mask_and_grads():
    m = CrossAttention(32, num_heads=4, kv_dim=48, qkv_bias=True, backend="torch").eval()
    assert list(m.state_dict()) == ["q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"]
    assert m.kv.weight.shape == (64, 48)
    x = torch.randn(2, 6, 32, requires_grad=True)
    ctx = torch.randn(2, 11, 48, requires_grad=True)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 8:] = True
    out = m(x, ctx, context_padding_mask=mask)
    assert out.shape == (2, 6, 32)
    ref = cross_eager(m, x, ctx, mask)
    _close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    got = _grads(m, x, ctx)
    assert x.grad.abs().sum() > 0 and ctx.grad.abs().sum() > 0
    assert torch.all(ctx.grad[0, 8:] == 0)  # padded context gets no gradient
    _zero(m, x, ctx)
    ref.backward(g)
    for a, b in zip(got, _grads(m, x, ctx)):
        _close(a, b)
    # padded context tokens do not change the output
    ctx2 = ctx.detach().clone()
    ctx2[0, 8:] = 100.0
    _close(m(x, ctx2, mask), out.detach())
    # default kv_dim = dim, qk_norm
    m2 = CrossAttention(32, num_heads=2, qk_norm=True, backend="torch")
    assert m2(torch.randn(1, 3, 32), torch.randn(1, 5, 32)).shape == (1, 3, 32)
    assert "q_norm.weight" in m2.state_dict()


def test_cross_attention_errors():
    m = CrossAttention(32, num_heads=4, kv_dim=16)
    x, ctx = torch.randn(2, 3, 32), torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="batch"):
        m(x, torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match=r"context of shape \(B, Nk, 16\)"):
        m(x, torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"x of shape \(B, Nq, 32\)"):
        m(torch.randn(2, 3, 16), ctx)
    with pytest.raises(ValueError, match="context_padding_mask must have shape"):
        m(x, ctx, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="context_padding_mask must be a bool"):  # as vlfast.ops.attention
        m(x, ctx, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="context"):
        m(x, ctx.numpy())
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(30, num_heads=4)


@needs_triton
def test_cross_attention_triton_backend():
    m = CrossAttention(32, num_heads=2, kv_dim=24, backend="triton").eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 3:] = True
    _close(m(x, ctx, mask), cross_eager(m, x, ctx, mask), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ MultiheadAttention
E, H, B, L, S = 32, 4, 2, 6, 9


def _pair(**kw):
    ref = nn.MultiheadAttention(E, H, **kw).eval()
    ours = MultiheadAttention(E, H, backend="torch", **kw).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(batch_first, self_attn, kdim=None, vdim=None, unbatched=False):
    def t(n, d):
        shape = (n, d) if unbatched else ((B, n, d) if batch_first else (n, B, d))
        return torch.randn(*shape, requires_grad=True)

    if self_attn:
        x = t(L, E)
        return x, x, x
    return t(L, E), t(S, kdim or E), t(S, vdim or E)


def _masks(kind, self_attn, unbatched=False):
    s = L if self_attn else S
    kpm = mask = None
    if kind in ("kpm_bool", "kpm_float", "both"):
        kpm = torch.zeros(B, s, dtype=torch.bool)
        kpm[0, s - 2:] = True
        kpm[1, 1] = True
        if kind == "kpm_float":
            kpm = torch.zeros(B, s).masked_fill(kpm, float("-inf")) + torch.randn(B, s) * 0.1
        if unbatched:
            kpm = kpm[0]
    if kind == "mask_bool2d" or kind == "both":
        mask = torch.zeros(L, s, dtype=torch.bool)
        mask[:, 0] = True
        mask[2, 3] = True
    if kind == "mask_float3d":
        mask = torch.randn((1 if unbatched else B) * H, L, s)
    return kpm, mask


def _check_mha(ref, ours, q, k, v, **kw):
    out, w = ours(q, k, v, need_weights=False, **kw)
    assert w is None
    exp = ref(q, k, v, need_weights=False, **kw)[0]
    _close(out, exp)
    g = torch.randn_like(out)
    out.backward(g)
    inputs = [t for t in {id(t): t for t in (q, k, v)}.values()]
    got = _grads(ours, *inputs)
    assert len(got) == len(list(ours.parameters())) + len(inputs)
    for t in inputs:
        t.grad = None
    exp.backward(g)
    want = _grads(ref, *inputs)
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["self", "self_nobias", "cross", "cross_kvdim", "bias_kv", "zero_attn"])
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "kpm_float", "mask_bool2d", "mask_float3d", "both"])
def test_mha_matches_torch(batch_first, case, masks):
    kw = dict(batch_first=batch_first)
    kdim = vdim = None
    if case == "self_nobias":
        kw["bias"] = False
    if case == "cross_kvdim":
        kdim, vdim = 24, 40
        kw.update(kdim=kdim, vdim=vdim)
    if case == "bias_kv":
        kw["add_bias_kv"] = True
    if case == "zero_attn":
        kw["add_zero_attn"] = True
    ref, ours = _pair(**kw)
    if case == "bias_kv":
        with torch.no_grad():
            ours.bias_k.normal_(), ours.bias_v.normal_()
            ref.load_state_dict(ours.state_dict())
    self_attn = case in ("self", "self_nobias", "bias_kv", "zero_attn")
    q, k, v = _inputs(batch_first, self_attn, kdim, vdim)
    kpm, mask = _masks(masks, self_attn)
    _check_mha(ref, ours, q, k, v, key_padding_mask=kpm, attn_mask=mask)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "mask_float3d"])
def test_mha_unbatched(masks, batch_first):
    ref, ours = _pair(batch_first=batch_first)  # batch_first is ignored for unbatched inputs
    q, k, v = _inputs(False, False, unbatched=True)
    kpm, mask = _masks(masks, False, unbatched=True)
    _check_mha(ref, ours, q, k, v, key_padding_mask=kpm, attn_mask=mask)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_kpm", [False, True])
def test_mha_is_causal(batch_first, with_kpm):
    ref, ours = _pair(batch_first=batch_first)
    x, _, _ = _inputs(batch_first, True)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
    kpm = _masks("kpm_bool", True)[0] if with_kpm else None
    _check_mha(ref, ours, x, x, x, attn_mask=causal, is_causal=True, key_padding_mask=kpm)
    # is_causal without attn_mask (torch raises; vlfast applies the causal mask it stands for)
    out = ours(x, x, x, need_weights=False, is_causal=True, key_padding_mask=kpm)[0]
    _close(out, ref(x, x, x, need_weights=False, attn_mask=causal, key_padding_mask=kpm)[0])
    out_w = ours(x, x, x, need_weights=True, is_causal=True, key_padding_mask=kpm)[0]
    _close(out_w, out)


def test_mha_need_weights_defers_to_torch(caplog):
    ref, ours = _pair(batch_first=True)
    q, k, v = _inputs(True, False)
    kpm, _ = _masks("kpm_bool", False)
    va._deferrals_logged.clear()
    with caplog.at_level(logging.DEBUG, logger="vlfast"):
        for avg in (True, False):
            out, w = ours(q, k, v, key_padding_mask=kpm, average_attn_weights=avg)
            eout, ew = ref(q, k, v, key_padding_mask=kpm, average_attn_weights=avg)
            assert torch.equal(out, eout) and torch.equal(w, ew)
    deferrals = [r for r in caplog.records if "need_weights=True" in r.getMessage()]
    assert len(deferrals) == 1 and deferrals[0].levelno == logging.DEBUG
    # float64 is not a fused dtype: deferred too, still torch's result
    ref64, ours64 = ref.double(), ours.double()
    q64 = q.detach().double()
    assert torch.equal(ours64(q64, q64, q64, need_weights=False)[0], ref64(q64, q64, q64, need_weights=False)[0])


def test_mha_invalid_shapes_raise_torch_errors():
    ref, ours = _pair(batch_first=True)
    q = torch.randn(B, L, E)
    bad = torch.zeros(L + 1, L, dtype=torch.bool)
    with pytest.raises(Exception) as e_ref:
        ref(q, q, q, attn_mask=bad, need_weights=False)
    with pytest.raises(type(e_ref.value)):
        ours(q, q, q, attn_mask=bad, need_weights=False)


def test_mha_is_drop_in():
    ref = nn.MultiheadAttention(E, H, 0.1, False, True, True, 24, 40, True)
    ours = MultiheadAttention(E, H, 0.1, False, True, True, 24, 40, True)
    assert isinstance(ours, nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(a.shape == b.shape for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    ours.load_state_dict(ref.state_dict(), strict=True)
    r2, o2 = nn.MultiheadAttention(E, H), MultiheadAttention(E, H)
    assert list(o2.state_dict()) == list(r2.state_dict())
    assert copy.deepcopy(o2).backend is None


def test_mha_dropout_training():
    ref, ours = _pair(batch_first=True, dropout=0.0)
    x = torch.randn(B, L, E)
    ref.train(), ours.train()
    _close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])
    _, ours = _pair(batch_first=True, dropout=0.5)
    ours.train()
    a, b = ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)
    ours.eval()
    _close(ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0])


@needs_triton
def test_mha_triton_backend():
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = MultiheadAttention(E, H, batch_first=True, backend="triton").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, E)
    kpm, mask = _masks("both", True)
    _close(ours(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)[0],
           ref(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)[0], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ patch
class _Net(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.blocks = nn.ModuleList([nn.MultiheadAttention(E, H, batch_first=batch_first) for _ in range(2)])
        self.inner = nn.Sequential(nn.Linear(E, E), nn.ModuleDict(
            {"attn": nn.MultiheadAttention(E, H, kdim=24, vdim=24, batch_first=batch_first)}))
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=batch_first,
                                                norm_first=True)
        self.batch_first = batch_first

    def forward(self, x, ctx, kpm=None):
        for blk in self.blocks:
            x = x + blk(x, x, x, need_weights=False, key_padding_mask=kpm)[0]
        x = x + self.inner[1]["attn"](self.inner[0](x), ctx, ctx, need_weights=False)[0]
        x = self.encoder(x, src_key_padding_mask=kpm)
        return self.layer(x, src_key_padding_mask=kpm)


@pytest.mark.parametrize("batch_first", [True, False])
def test_patch_model(batch_first, caplog, count_calls):
    model = _Net(batch_first)
    ref = copy.deepcopy(model)
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    ctx = torch.randn(B, S, 24) if batch_first else torch.randn(S, B, 24)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 4:] = True
    params = {n: p for n, p in model.named_parameters()}
    model.blocks[0].in_proj_weight.requires_grad_(False)
    model.eval()
    with caplog.at_level(logging.INFO, logger="vlfast"):
        out = patch(model)
    assert out is model
    assert any("replaced 6 " in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas) == 6 and all(type(m) is MultiheadAttention for m in mhas)
    assert all(not m.training for m in model.modules())
    # the same Parameter objects, requires_grad kept
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not model.blocks[0].in_proj_weight.requires_grad
    assert model.inner[1]["attn"].kdim == 24 and not model.inner[1]["attn"]._qkv_same_embed_dim

    calls = count_calls(va, "attention")
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(ref, mode)()
        for m_kpm in (None, kpm):
            _close(model(x, ctx, m_kpm), ref(x, ctx, m_kpm))
        n = len(calls)
        with torch.no_grad():  # inference: nn.TransformerEncoderLayer's fast path in eval mode
            _close(model(x, ctx, kpm), ref(x, ctx, kpm))
        assert len(calls) - n == 6  # every attention, the encoder layers' included, ran vlfast's op
    # gradients through the patched model equal the original's
    model.train(), ref.train()
    model(x, ctx, kpm).sum().backward()
    ref(x, ctx, kpm).sum().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        if a.requires_grad:
            _close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    # idempotent
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlfast"), pytest.warns(UserWarning, match="nothing to patch"):
        patch(model)
    assert any("replaced nothing" in r.getMessage() for r in caplog.records)


def test_patch_transformer_encoder_layer_train_and_eval(monkeypatch, count_calls):
    for batch_first in (True, False):
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
        ref = copy.deepcopy(layer)
        patch(layer)
        assert isinstance(layer.self_attn, MultiheadAttention)
        calls = count_calls(va, "attention")
        x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        for mode in ("train", "eval"):
            layer.train(mode == "train"), ref.train(mode == "train")
            _close(layer(x), ref(x))
            _close(layer(x, src_mask=causal, is_causal=True), ref(x, src_mask=causal, is_causal=True))
        assert len(calls) == 4
        monkeypatch.undo()


def test_patch_transformer_encoder_inference_fast_path_reaches_vlfast(count_calls):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2).eval()  # nested tensors enabled by default
    ref = copy.deepcopy(enc)
    rep = patch(enc, report=True)
    assert rep.model is enc and rep.counts() == {
        "torch.nn.MultiheadAttention": 2, "torch.nn.TransformerEncoderLayer inference fast path": 2,
        "torch.nn.TransformerEncoder nested-tensor fast path": 1}
    assert "replaced 2 torch.nn.MultiheadAttention" in str(rep)
    calls = count_calls(va, "attention")
    x = torch.randn(B, L, E)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 5:] = True
    with torch.no_grad():
        out, want = enc(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm)
    assert len(calls) == 2  # torch's fused inference path would have called neither
    # real tokens agree; torch's nested-tensor path writes zeros at padded positions, the
    # per-layer path (as in training mode) the layer's values there
    _close(out[~kpm], want[~kpm])


def test_patch_shared_module_root_and_hooks():
    shared = nn.MultiheadAttention(E, H)
    seen = []
    shared.register_forward_hook(lambda mod, inp, out: seen.append(1))
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)}).train()
    patch(model)
    assert model["a"] is model["b"][0] and isinstance(model["a"], MultiheadAttention)
    assert model["a"].training
    x = torch.randn(L, B, E)
    model["a"](x, x, x, need_weights=False)
    assert seen == [1]
    # patching an nn.MultiheadAttention itself returns its replacement
    root = nn.MultiheadAttention(E, H, bias=False, add_bias_kv=True, add_zero_attn=True, dropout=0.1).eval()
    new = patch(root)
    assert type(new) is MultiheadAttention and new.bias_k is root.bias_k and new.in_proj_bias is None
    assert new.add_zero_attn and new.dropout == 0.1 and not new.training
    _close(new(x, x, x, need_weights=False)[0], root(x, x, x, need_weights=False)[0])
    # subclasses of nn.MultiheadAttention (possibly with their own forward) are left alone
    class Custom(nn.MultiheadAttention):
        pass

    m = nn.Sequential(Custom(E, H))
    patch(m)
    assert type(m[0]) is Custom
    with pytest.raises(TypeError):
        patch("not a module")


# ------------------------------------------------------------------ the fused switch
def _switch_case(kind):
    """A module with dropout, its inputs, and the eager formula on its parameters (None: torch's module)."""
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    cpm = torch.zeros(2, 5, dtype=torch.bool)
    cpm[0, 3:] = True
    if kind == "attention":
        m = Attention(32, num_heads=4, qkv_bias=True, attn_drop=0.3, backend="torch")
        return m, lambda: m(x, key_padding_mask=kpm), lambda: timm_eager(m, x, key_padding_mask=kpm)
    if kind == "cross":
        m = CrossAttention(32, num_heads=4, kv_dim=24, qkv_bias=True, attn_drop=0.3, backend="torch")
        return m, lambda: m(x, ctx, cpm), lambda: cross_eager(m, x, ctx, cpm)
    m = MultiheadAttention(32, 4, dropout=0.3, batch_first=True, backend="torch")
    return m, lambda: m(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[0], None


@pytest.mark.parametrize("kind", ["attention", "cross", "mha"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fused_flag_selects_the_op_or_the_reference(kind, training, count_calls):
    m, run, eager = _switch_case(kind)
    m.train(training)
    assert m.fused is True
    ops, refs = count_calls(va, "attention"), count_calls(va, "attention_reference")
    out_fused = run()
    assert (len(ops), len(refs)) == (1, 0)
    m.fused = False
    torch.manual_seed(7)
    out_eager = run()
    assert (len(ops), len(refs)) == (1, 1)
    if eager is not None:  # fused=False is the reference formula bit for bit, dropout draws included
        torch.manual_seed(7)
        assert torch.equal(out_eager, eager())
    if not training:
        _close(out_fused, out_eager)
    elif eager is None:  # MultiheadAttention: eval-mode output equals torch's own module
        m.eval()
        ref = nn.MultiheadAttention(32, 4, batch_first=True)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(2, 7, 32)
        causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
        _close(m(x, x, x, need_weights=False, is_causal=True)[0], ref(x, x, x, need_weights=False, attn_mask=causal)[0])


def test_fused_constructor_argument():
    assert Attention(32, num_heads=4, fused=False).fused is False
    assert CrossAttention(32, num_heads=4, fused=False).fused is False
    assert MultiheadAttention(32, 4, fused=False).fused is False
    assert "fused=False" in repr(Attention(32, num_heads=4, fused=False))
    for make in (lambda: Attention(32, num_heads=4, fused=1), lambda: CrossAttention(32, num_heads=4, fused="no"),
                 lambda: MultiheadAttention(32, 4, fused=None)):
        with pytest.raises(TypeError, match="fused"):
            make()
    with pytest.raises(TypeError, match="dim"):
        Attention(32.0, num_heads=4)
    with pytest.raises(TypeError, match="kv_dim"):
        CrossAttention(32, num_heads=4, kv_dim="16")

