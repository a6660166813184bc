"""vlfast.patch and the "vlfast" attention implementation on Hugging Face transformers (real library, tiny configs).

Each family: the unpatched model (HF's ``sdpa``, or ``eager`` where that is all the model has)
against a patched deepcopy with the same weights: outputs and every parameter gradient within
the fp32 tolerance, ``state_dict`` keys identical, parameters the original objects, the patch
counts by kind, and the fused op seen at every attention (calls of ``vlfast.ops.attention``
counted, with what they were given: key padding masks, causal flags, biases), plus runs with
the Triton backend under the interpreter.  Padding, causal, cross-attention and bias cases are
in: CLIP's causal text with padding, SigLIP(2) with padding, BERT/RoBERTa with ~30% padding,
BERT as a decoder with cross-attention, BEiT's relative position bias (its table's gradient),
BLIP's causal decoder with cross-attention, the BLIP-2 Q-Former's padded cross-attention.
"""

import copy
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlfast  # noqa: E402
import vlfast.integrations.transformers as vhf  # noqa: E402
from vlfast.testing import (FORWARD_FACTOR, GRAD_FACTOR, assert_close, assert_within_eager_error,  # noqa: E402
                            max_abs_error)

# initializer_range 0.1 (not HF's 0.02, nor BLIP vision's 1e-10): attention patterns far from uniform
TXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=24, initializer_range=0.1)
VIS = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
           patch_size=6, initializer_range=0.1)  # 25 patches (+ CLS: 26 tokens)
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
#: every family runs on the automatic backend (torch on CPU) and, in the slow suite, on Triton (the interpreter)
BACKENDS = [None, pytest.param("triton", marks=pytest.mark.slow)]


class _Calls(list):
    expected_backend = None


@pytest.fixture
def calls(monkeypatch):
    """Every vlfast.ops.attention call made by the transformers integration: a dict of what it got."""
    seen = _Calls()
    real = vhf.attention

    def recording(q, k, v, **kw):
        kpm = kw.get("key_padding_mask")
        seen.append(dict(q=tuple(q.shape), k=tuple(k.shape), causal=kw.get("causal"), kpm=kpm,
                         padded=0 if kpm is None else int(kpm.sum()), bias=kw.get("attn_bias"),
                         backend=kw.get("backend"), dropout_p=kw.get("dropout_p")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(vhf, "attention", recording)
    yield seen
    expected = getattr(seen, "expected_backend", None)
    assert all(c["backend"] == expected for c in seen), (expected, [c["backend"] for c in seen])


def _padding(B, N, frac=0.3, min_len=2):
    """(B, N) long attention mask, right padding, about ``frac`` of the tokens padded, rows of different lengths."""
    mask = torch.ones(B, N, dtype=torch.long)
    for b in range(B):
        n_pad = min(N - min_len, round(frac * N * 2 * (b + 1) / (B + 1)))
        if n_pad:
            mask[b, N - n_pad:] = 0
    return mask


def _tensors(out):
    """The floating tensors of a model output, by name."""
    items = out.items() if hasattr(out, "items") else enumerate(out)
    found = {}
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[str(name)] = value
        elif hasattr(value, "items") or isinstance(value, (tuple, list)):
            for sub, t in _tensors(value).items():
                found[f"{name}.{sub}"] = t
    return found


def _objective(outputs):
    total = 0.0
    for t in outputs.values():
        w = torch.linspace(-1.0, 1.0, t.numel(), dtype=t.dtype).reshape(t.shape)
        total = total + (t * w).sum()
    return total


def _run(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # ViLT samples patches, ViTMAE draws noise when none is given
    out = _tensors(model(**inputs))
    _objective(out).backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def _check_parity(ref, pat, inputs, calls=None, n_calls=None, seed=0):
    """Outputs and every parameter gradient of ``pat`` against ``ref``'s (the unpatched model, same weights).

    The rule is :func:`vlfast.testing.assert_within_eager_error`: against ``ref`` run in float64,
    the patched fp32 error is at most 2x (outputs) / 3x (gradients) the unpatched fp32 error, plus
    a fraction of an fp32 ulp at the result's scale (the gradients of these tiny random models
    reach 1e4, where fp32's own rounding is 1e-3).  Returns the max abs differences patched vs
    unpatched (outputs, gradients), relative to the largest output / gradient magnitude: the report's figures.
    """
    out_r, g_r = _run(ref, inputs, seed)
    ref64 = copy.deepcopy(ref).double()
    inputs64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in inputs.items()}
    out_64, g_64 = _run(ref64, inputs64, seed)
    start = 0 if calls is None else len(calls)
    out_p, g_p = _run(pat, inputs, seed)
    if n_calls is not None:
        assert len(calls) - start == n_calls, f"{len(calls) - start} vlfast attention calls, expected {n_calls}"
    assert out_r.keys() == out_p.keys() == out_64.keys()
    worst_out = worst_grad = 0.0
    for name in out_r:
        assert_within_eager_error(out_p[name], out_r[name], out_64[name], FORWARD_FACTOR, what=name)
        worst_out = max(worst_out, max_abs_error(out_p[name], out_r[name]))
    assert g_r.keys() == g_p.keys()
    for name in g_r:
        if g_r[name] is None:
            assert g_p[name] is None, name
            continue
        assert_within_eager_error(g_p[name], g_r[name], g_64[name], GRAD_FACTOR, what=f"grad of {name}")
        worst_grad = max(worst_grad, max_abs_error(g_p[name], g_r[name]))
    # relative to the largest magnitude among all outputs / all gradients (some gradients are exactly 0
    # in theory, e.g. of the key bias, so a per-tensor ratio would be noise over noise)
    worst_out /= max(t.abs().max().item() for t in out_r.values())
    worst_grad /= max(g.abs().max().item() for g in g_r.values() if g is not None)
    return worst_out, worst_grad


def _patched(ref, calls=None, **kw):
    """A patched deepcopy of ``ref`` and its report; state_dict keys and parameter objects kept.

    With ``calls``, checks at the end of the test that every vlfast call got the patch's backend."""
    pat = copy.deepcopy(ref)
    keys = list(pat.state_dict().keys())
    params = {n: p for n, p in pat.named_parameters()}
    report = vlfast.patch(pat, report=True, **kw)
    if calls is not None:
        calls.expected_backend = kw.get("backend")
    assert report.model is pat
    assert list(pat.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in pat.named_parameters())
    return pat, report


def _log(family, report, diffs, backend):
    """The figures of the closing note (pytest -s prints them)."""
    print(f"{family} [{backend or 'auto'}]: {report.counts()} "
          f"max|d out|/max|out|={diffs[0]:.1e} max|d grad|/max|grad|={diffs[1]:.1e}")


# ---------------------------------------------------------------------------------------- registration
def test_registered_in_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    assert ALL_ATTENTION_FUNCTIONS["vlfast"] is vhf.vlfast_attention_forward
    assert AttentionInterface._global_mapping["vlfast"] is vhf.vlfast_attention_forward
    # the mask helpers consult _global_mapping: without this entry they drop padding
    assert AttentionMaskInterface._global_mapping["vlfast"] is vhf.vlfast_mask
    assert ALL_MASK_ATTENTION_FUNCTIONS["vlfast"] is vhf.vlfast_mask


def test_registration_on_import_in_a_fresh_process():
    """Importing vlfast.integrations.transformers before transformers registers both, as transformers loads."""
    import subprocess
    import sys

    code = ("import sys, vlfast.integrations.transformers\n"
            "assert 'transformers.modeling_utils' not in sys.modules\n"
            "from transformers import BertConfig, BertModel\n"
            "from transformers.masking_utils import AttentionMaskInterface as M\n"
            "m = BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, "
            "intermediate_size=8, attn_implementation='vlfast'))\n"
            "assert m.config._attn_implementation == 'vlfast' and 'vlfast' in M._global_mapping\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_model_config_and_set_attn_implementation(calls):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**TXT, **NO_DROP)
    torch.manual_seed(0)
    ref = BertModel(cfg).eval()
    a = BertModel(BertConfig(**TXT, **NO_DROP, attn_implementation="vlfast")).eval()
    b = copy.deepcopy(ref)
    b.set_attn_implementation("vlfast")
    c_cfg = BertConfig(**TXT, **NO_DROP)
    c_cfg._attn_implementation = "vlfast"
    c = BertModel(c_cfg).eval()
    for m in (a, b, c):
        assert m.config._attn_implementation == "vlfast"
    a.load_state_dict(ref.state_dict())
    c.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 99, (3, 13))
    inputs = dict(input_ids=ids, attention_mask=_padding(3, 13))
    for m in (a, b, c):
        _check_parity(ref, m, inputs, calls, n_calls=2)
    assert all(c["padded"] > 0 for c in calls)  # padding reached the kernel as a key padding mask


def test_save_and_from_pretrained_locally(tmp_path, calls):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    ref = BertForMaskedLM(BertConfig(**TXT, **NO_DROP)).eval()
    ref.save_pretrained(tmp_path)
    loaded = BertForMaskedLM.from_pretrained(tmp_path, attn_implementation="vlfast").eval()
    assert loaded.config._attn_implementation == "vlfast"
    ids = torch.randint(0, 99, (2, 11))
    _check_parity(ref, loaded, dict(input_ids=ids, attention_mask=_padding(2, 11), labels=ids), calls, n_calls=2)


# ---------------------------------------------------------------------------------------- text encoders
@pytest.mark.parametrize("family", ["BertModel", "BertForMaskedLM", "RobertaModel"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_family_padding(backend, family, calls):
    """~30% padding: the case a registration without the mask interface got 52% wrong."""
    cls = getattr(transformers, family)
    cfg_cls = transformers.RobertaConfig if family.startswith("Roberta") else transformers.BertConfig
    torch.manual_seed(0)
    ref = cls(cfg_cls(**TXT, **NO_DROP, pad_token_id=1)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 2}
    assert pat.config._attn_implementation == "vlfast" and ref.config._attn_implementation == "sdpa"
    ids = torch.randint(2, 99, (4, 17))
    mask = _padding(4, 17)
    assert 0.25 <= 1 - mask.float().mean() <= 0.35
    inputs = dict(input_ids=ids, attention_mask=mask)
    if family == "BertForMaskedLM":
        inputs["labels"] = torch.where(mask.bool(), ids, -100)
    diffs = _check_parity(ref, pat, inputs, calls, n_calls=2)
    assert all(c["kpm"] is not None and not c["causal"] and c["bias"] is None for c in calls)
    assert calls[0]["padded"] == int((mask == 0).sum())
    _log(family, report, diffs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_decoder_causal_padding_cross_attention(backend, calls):
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    ref = BertLMHeadModel(BertConfig(**TXT, **NO_DROP, is_decoder=True, add_cross_attention=True)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 4}  # 2 self + 2 cross
    ids = torch.randint(0, 99, (3, 9))
    enc = torch.randn(3, 7, 32)
    inputs = dict(input_ids=ids, attention_mask=_padding(3, 9), encoder_hidden_states=enc,
                  encoder_attention_mask=_padding(3, 7), labels=ids, use_cache=False)
    diffs = _check_parity(ref, pat, inputs, calls, n_calls=4)
    self_calls = [c for c in calls if c["k"][2] == 9]
    cross_calls = [c for c in calls if c["k"][2] == 7]
    assert len(self_calls) == 2 and all(c["causal"] and c["kpm"] is not None for c in self_calls)
    assert len(cross_calls) == 2 and all(not c["causal"] and c["kpm"] is not None for c in cross_calls)
    _log("BertLMHeadModel (decoder + cross)", report, diffs, backend)


# ---------------------------------------------------------------------------------------- CLIP / SigLIP
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_text_causal_padding_and_vision(backend, calls):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    ref = CLIPModel(CLIPConfig(text_config=dict(TXT, eos_token_id=98), vision_config=VIS, projection_dim=16)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 4}
    ids = torch.randint(1, 97, (3, 11))
    mask = _padding(3, 11)
    ids[torch.arange(3), mask.sum(1) - 1] = 98  # eos at the end of each text
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 30, 30), return_loss=True)
    diffs = _check_parity(ref, pat, inputs, calls, n_calls=4)
    text = [c for c in calls if c["q"][2] == 11]
    vision = [c for c in calls if c["q"][2] == 26]
    assert len(text) == 2 and all(c["causal"] and c["kpm"] is not None and c["bias"] is None for c in text)
    assert len(vision) == 2 and all(not c["causal"] and c["kpm"] is None and c["bias"] is None for c in vision)
    _log("CLIPModel", report, diffs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_padding(backend, calls):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    ref = SiglipModel(SiglipConfig(text_config=TXT, vision_config=VIS)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 4, "torch.nn.MultiheadAttention": 1}  # + the pooling head
    ids = torch.randint(1, 99, (3, 11))
    inputs = dict(input_ids=ids, attention_mask=_padding(3, 11), pixel_values=torch.randn(3, 3, 30, 30),
                  return_loss=True)
    diffs = _check_parity(ref, pat, inputs)
    _log("SiglipModel", report, diffs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip2_text_and_naflex_vision_padding(backend, calls):
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(0)
    vis = dict(VIS, num_patches=16, patch_size=4)
    vis.pop("image_size")
    ref = Siglip2Model(Siglip2Config(text_config=TXT, vision_config=vis)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 4, "torch.nn.MultiheadAttention": 1}
    B, P = 2, 16
    pixel_mask = torch.ones(B, P, dtype=torch.long)
    pixel_mask[1, 12:] = 0  # the second image has 12 real patches (3 x 4)
    inputs = dict(input_ids=torch.randint(1, 99, (B, 9)), attention_mask=_padding(B, 9),
                  pixel_values=torch.randn(B, P, 3 * 4 * 4), pixel_attention_mask=pixel_mask,
                  spatial_shapes=torch.tensor([[4, 4], [3, 4]]), return_loss=True)
    diffs = _check_parity(ref, pat, inputs)
    vision = [c for c in calls if c["q"][2] == P]
    assert vision and all(c["kpm"] is not None and c["padded"] == 4 for c in vision)
    _log("Siglip2Model", report, diffs, backend)


# ---------------------------------------------------------------------------------------- vision
@pytest.mark.parametrize("backend", BACKENDS)
def test_vit(backend, calls):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(**VIS, **NO_DROP)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 2}
    diffs = _check_parity(ref, pat, dict(pixel_values=torch.randn(2, 3, 30, 30)), calls, n_calls=2)
    assert all(c["kpm"] is None and c["bias"] is None and not c["causal"] for c in calls)
    _log("ViTModel", report, diffs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vit_mae_encoder_decoder_and_masking(backend, calls, monkeypatch):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    masking = []
    real_masking = vhf.random_masking

    def recording(x, ratio, **kw):
        masking.append(ratio)
        return real_masking(x, ratio, **kw)

    monkeypatch.setattr(vhf, "random_masking", recording)
    torch.manual_seed(0)
    cfg = ViTMAEConfig(**VIS, **NO_DROP, decoder_hidden_size=24, decoder_num_hidden_layers=2,
                       decoder_num_attention_heads=3, decoder_intermediate_size=29, mask_ratio=0.6)
    ref = ViTMAEForPreTraining(cfg).eval()
    pat, report = _patched(ref, calls, backend=backend)
    # the decoder's layers hold a deep copy of the config that set_attn_implementation does not reach
    assert report.counts() == {"HF attention interface": 4, "HF ViTMAE random_masking": 1}
    assert all(layer.attention.config._attn_implementation == "vlfast" for layer in pat.decoder.decoder_layers)
    assert type(pat.vit.embeddings).__name__ == "VlfastViTMAEEmbeddings"
    assert isinstance(pat.vit.embeddings, type(ref.vit.embeddings))
    noise = torch.rand(2, 25)
    inputs = dict(pixel_values=torch.randn(2, 3, 30, 30), noise=noise)
    with torch.no_grad():
        o_r, o_p = ref(**inputs), pat(**inputs)
    assert torch.equal(o_r.mask, o_p.mask) and torch.equal(o_r.ids_restore, o_p.ids_restore)
    assert o_r.mask.dtype == o_p.mask.dtype
    assert_close(o_p.loss, o_r.loss)
    calls.clear()
    diffs = _check_parity(ref, pat, inputs, calls, n_calls=4)
    assert [c["q"][2] for c in calls] == [11, 11, 26, 26]  # 10 kept patches + CLS; the decoder sees all 26
    assert masking == [0.6] * 2  # the no_grad forward and the parity run
    # without noise, the same seed gives the same mask (both draw torch.rand(B, L))
    torch.manual_seed(5)
    m_r = ref(pixel_values=inputs["pixel_values"]).mask
    torch.manual_seed(5)
    m_p = pat(pixel_values=inputs["pixel_values"]).mask
    assert torch.equal(m_r, m_p)
    _log("ViTMAEForPreTraining", report, diffs, backend)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_beit_relative_position_bias_gradient(backend, shared, calls):
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(0)
    cfg = BeitConfig(**VIS, **NO_DROP, use_relative_position_bias=not shared,
                     use_shared_relative_position_bias=shared, drop_path_rate=0.0)
    ref = BeitModel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 0.5)  # HF initialises it to zeros
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 2}
    diffs = _check_parity(ref, pat, dict(pixel_values=torch.randn(2, 3, 30, 30)), calls, n_calls=2)
    assert all(c["bias"] is not None and c["bias"].requires_grad and c["kpm"] is None for c in calls)
    tables = [n for n, p in pat.named_parameters() if "relative_position_bias_table" in n]
    assert tables and all(dict(pat.named_parameters())[n].grad.abs().sum() > 0 for n in tables)
    _log(f"BeitModel ({'shared' if shared else 'per-layer'} relative position bias)", report, diffs, backend)


# ---------------------------------------------------------------------------------------- hard-coded attention
@pytest.mark.parametrize("backend", BACKENDS)
def test_vilt_hard_coded_swap(backend, calls):
    from transformers import ViltConfig, ViltModel

    torch.manual_seed(0)
    ref = ViltModel(ViltConfig(**dict(TXT, max_position_embeddings=40), **NO_DROP, image_size=30, patch_size=6,
                               max_image_length=-1)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF ViltSelfAttention (hard-coded)": 2}
    attn = pat.encoder.layer[0].attention.attention
    assert type(attn).__name__ == "VlfastViltSelfAttention" and isinstance(attn, type(ref.encoder.layer[0]
                                                                                       .attention.attention))
    ids = torch.randint(1, 99, (3, 9))
    inputs = dict(input_ids=ids, attention_mask=_padding(3, 9), pixel_values=torch.randn(3, 3, 30, 30))
    diffs = _check_parity(ref, pat, inputs, calls, n_calls=2)
    assert all(c["kpm"] is not None and c["padded"] == int((inputs["attention_mask"] == 0).sum()) for c in calls)
    _log("ViltModel", report, diffs, backend)


def _blip_config():
    from transformers import BlipConfig

    return BlipConfig(text_config=dict(TXT, encoder_hidden_size=32, **NO_DROP, bos_token_id=1, pad_token_id=0,
                                       eos_token_id=2, sep_token_id=3),
                      vision_config=dict(VIS, attention_dropout=0.0), projection_dim=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blip_image_text_retrieval(backend, calls):
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(0)
    ref = BlipForImageTextRetrieval(_blip_config()).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF BlipAttention (hard-coded)": 2, "HF BlipTextSelfAttention (hard-coded)": 4}
    ids = torch.randint(1, 99, (3, 9))
    base = dict(input_ids=ids, attention_mask=_padding(3, 9), pixel_values=torch.randn(3, 3, 30, 30))
    worst = [0.0, 0.0]
    for itm in (True, False):
        d = _check_parity(ref, pat, dict(base, use_itm_head=itm))
        worst = [max(worst[0], d[0]), max(worst[1], d[1])]
    text_self = [c for c in calls if c["q"][2] == 9 and c["k"][2] == 9]
    cross = [c for c in calls if c["q"][2] == 9 and c["k"][2] == 26]
    assert text_self and all(c["kpm"] is not None and not c["causal"] for c in text_self)
    assert cross  # the ITM head's cross-attention to the image
    _log("BlipForImageTextRetrieval", report, worst, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blip_captioning_causal_decoder_with_cross_attention(backend, calls):
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)
    ref = BlipForConditionalGeneration(_blip_config()).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF BlipAttention (hard-coded)": 2, "HF BlipTextSelfAttention (hard-coded)": 4}
    ids = torch.randint(1, 99, (3, 9))
    inputs = dict(input_ids=ids, attention_mask=_padding(3, 9), pixel_values=torch.randn(3, 3, 30, 30), labels=ids)
    diffs = _check_parity(ref, pat, inputs, calls, n_calls=6)
    text_self = [c for c in calls if c["q"][2] == 9 and c["k"][2] == 9]
    assert len(text_self) == 2 and all(c["causal"] and c["kpm"] is not None for c in text_self)
    # generation: the swapped modules take HF's caches (self-attention grows, cross-attention reused)
    prompt = dict(pixel_values=inputs["pixel_values"][:2], input_ids=ids[:2, :3], max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(pat.generate(**prompt), ref.generate(**prompt))
    _log("BlipForConditionalGeneration", report, diffs, backend)


def test_blip_attn_implementation_vlfast_is_correct_before_and_after_patch(calls):
    """HF accepts attn_implementation='vlfast' on BLIP, whose attention ignores it: its eager code must get a mask
    it can add (the vlfast mask is eager's), and vlfast.patch must then take over every attention."""
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)
    ref = BlipForConditionalGeneration(_blip_config()).eval()
    cfg = _blip_config()
    cfg._attn_implementation = "vlfast"
    m = BlipForConditionalGeneration(cfg).eval()
    m.load_state_dict(ref.state_dict())
    assert m.text_decoder.config._attn_implementation == "vlfast"
    ids = torch.randint(1, 99, (3, 9))
    inputs = dict(input_ids=ids, attention_mask=_padding(3, 9), pixel_values=torch.randn(3, 3, 30, 30), labels=ids)
    _check_parity(ref, m, inputs, calls, n_calls=0)  # not fused yet, but correct
    pat, report = _patched(m)
    assert report.counts() == {"HF BlipAttention (hard-coded)": 2, "HF BlipTextSelfAttention (hard-coded)": 4}
    _check_parity(ref, pat, inputs, calls, n_calls=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blip2_qformer_padded_cross_attention(backend, calls):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    ref = Blip2QFormerModel(Blip2QFormerConfig(**dict(TXT), **NO_DROP, encoder_hidden_size=24,
                                               cross_attention_frequency=1)).eval()
    pat, report = _patched(ref, calls, backend=backend)
    assert report.counts() == {"HF attention interface": 4}
    enc_mask = _padding(3, 13)
    inputs = dict(query_embeds=torch.randn(3, 5, 32), encoder_hidden_states=torch.randn(3, 13, 24),
                  encoder_attention_mask=enc_mask)
    diffs = _check_parity(ref, pat, inputs, calls, n_calls=4)
    cross = [c for c in calls if c["k"][2] == 13]
    assert len(cross) == 2 and all(c["padded"] == int((enc_mask == 0).sum()) for c in cross)
    _log("Blip2QFormerModel", report, diffs, backend)


# ---------------------------------------------------------------------------------------- Triton, backend, dropout
def test_triton_backend_under_the_interpreter(calls):
    """backend='triton' reaches the kernel: padding + causal + cross-attention (BERT decoder), bias gradient (BEiT)."""
    from transformers import BeitConfig, BeitModel, BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    txt = dict(TXT, hidden_size=16, num_attention_heads=2, intermediate_size=16, num_hidden_layers=1)
    ref = BertLMHeadModel(BertConfig(**txt, **NO_DROP, is_decoder=True, add_cross_attention=True)).eval()
    pat, _ = _patched(ref, calls, backend="triton")
    ids = torch.randint(0, 99, (2, 7))
    inputs = dict(input_ids=ids, attention_mask=_padding(2, 7), encoder_hidden_states=torch.randn(2, 5, 16),
                  encoder_attention_mask=_padding(2, 5), labels=ids, use_cache=False)
    with torch.profiler.profile() as prof:
        _check_parity(ref, pat, inputs, calls, n_calls=2)
    assert any(e.name == "vlfast::attention" for e in prof.events())  # the custom op of the Triton kernel

    ref = BeitModel(BeitConfig(**dict(VIS, hidden_size=16, num_attention_heads=2, intermediate_size=16,
                                      num_hidden_layers=1, image_size=12, patch_size=4), **NO_DROP,
                               use_relative_position_bias=True, drop_path_rate=0.0)).eval()
    with torch.no_grad():
        ref.layers[0].relative_position_bias.relative_position_bias_table.normal_()
    pat, _ = _patched(ref, calls, backend="triton")
    _check_parity(ref, pat, dict(pixel_values=torch.randn(2, 3, 12, 12)), calls, n_calls=1)


def test_vlfast_backend_env_is_honoured(calls, monkeypatch):
    from transformers import ViTConfig, ViTModel

    monkeypatch.setenv("VLFAST_BACKEND", "torch")
    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(**VIS, **NO_DROP)).eval()
    pat, _ = _patched(ref)  # backend=None: automatic / VLFAST_BACKEND
    _check_parity(ref, pat, dict(pixel_values=torch.randn(2, 3, 30, 30)), calls, n_calls=2)
    monkeypatch.setenv("VLFAST_BACKEND", "no-such-backend")
    with pytest.raises(ValueError):
        pat(pixel_values=torch.randn(2, 3, 30, 30))


def test_dropout_is_attention_probability_dropout_in_training(calls):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**TXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.25))
    vlfast.patch(model)
    ids = torch.randint(0, 99, (2, 8))
    model.train()
    a, b = model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    assert not torch.equal(a, b)
    assert all(c["dropout_p"] == 0.25 for c in calls)
    model.eval()
    calls.clear()
    model(input_ids=ids)
    assert all(c["dropout_p"] == 0.0 for c in calls)


def test_patched_model_pickles_and_deep_copies(calls):
    import io

    from transformers import ViltConfig, ViltModel

    torch.manual_seed(0)
    ref = ViltModel(ViltConfig(**dict(TXT, max_position_embeddings=40), **NO_DROP, image_size=30, patch_size=6)).eval()
    pat, _ = _patched(ref)
    buf = io.BytesIO()
    torch.save(pat, buf)
    buf.seek(0)
    for copied in (torch.load(buf, weights_only=False), copy.deepcopy(pat)):
        assert type(copied.encoder.layer[0].attention.attention) is type(pat.encoder.layer[0].attention.attention)
        inputs = dict(input_ids=torch.randint(1, 99, (2, 7)), pixel_values=torch.randn(2, 3, 30, 30))
        start = len(calls)
        torch.manual_seed(1)
        a = copied(**inputs).last_hidden_state
        torch.manual_seed(1)
        b = ref(**inputs).last_hidden_state
        assert_close(a, b)
        assert len(calls) - start == 2


# ---------------------------------------------------------------------------------------- fail loudly
def test_patch_refuses_config_output_attentions():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**TXT, attn_implementation="eager", output_attentions=True))
    with pytest.raises(ValueError, match="output_attentions"):
        vlfast.patch(model)


def test_output_attentions_falls_back_openly(calls, caplog):
    from transformers import BertConfig, BertModel, ViltConfig, ViltModel

    torch.manual_seed(0)
    ref = BertModel(BertConfig(**TXT, **NO_DROP)).eval()
    ref.set_attn_implementation("eager")
    pat = copy.deepcopy(ref)
    vlfast.patch(pat)
    ids = torch.randint(0, 99, (2, 8))
    vhf._warned.clear()
    with caplog.at_level(logging.WARNING, logger="vlfast"):
        o_p = pat(input_ids=ids, attention_mask=_padding(2, 8), output_attentions=True)
    o_r = ref(input_ids=ids, attention_mask=_padding(2, 8), output_attentions=True)
    assert "output_attentions=True" in caplog.text and not calls
    assert len(o_p.attentions) == 2 and all(a is not None for a in o_p.attentions)
    for a_p, a_r in zip(o_p.attentions, o_r.attentions):
        assert_close(a_p, a_r)

    ref = ViltModel(ViltConfig(**dict(TXT, max_position_embeddings=40), **NO_DROP, image_size=30, patch_size=6)).eval()
    pat = copy.deepcopy(ref)
    vlfast.patch(pat)
    inputs = dict(input_ids=torch.randint(1, 99, (2, 7)), pixel_values=torch.randn(2, 3, 30, 30))
    torch.manual_seed(1)
    o_p = pat(**inputs, output_attentions=True)
    torch.manual_seed(1)
    o_r = ref(**inputs, output_attentions=True)
    for a_p, a_r in zip(o_p.attentions, o_r.attentions):
        assert_close(a_p, a_r)


def test_refused_arguments_raise():
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    for kw in (dict(softcap=30.0), dict(s_aux=torch.zeros(2)), dict(head_mask=torch.ones(2))):
        with pytest.raises(ValueError, match=next(iter(kw))):
            vhf.vlfast_attention_forward(module, q, q, q, None, **kw)
    with pytest.raises(TypeError, match="attention_mask"):
        vhf.vlfast_attention_forward(module, q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        vhf.vlfast_attention_forward(module, q, q, q, torch.zeros(1, 1, 3, 4))


# ---------------------------------------------------------------------------------------- the attention function itself
def _sdpa(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


@pytest.mark.parametrize("case", ["none", "bool-padding", "float-padding", "bool-causal-padding", "sliding",
                                  "float-bias", "gqa", "cross-batch-1", "fully-masked-row"])
def test_attention_function_matches_sdpa(case, calls):
    """Masks as HF's sdpa/eager helpers (or users) make them: the kernel gets the structured form where there is one."""
    torch.manual_seed(0)
    B, H, Nq, Nk, D = 2, 4, 7, 7, 8
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (Nq, Nk, Nk))
    mask, kw = None, {}
    keep_keys = _padding(B, Nk).bool()
    causal = torch.ones(Nq, Nk, dtype=torch.bool).tril()
    if case == "bool-padding":
        mask = keep_keys[:, None, None, :].expand(B, 1, Nq, Nk).contiguous()
    elif case == "float-padding":
        mask = torch.where(keep_keys, 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(B, 1, Nq, Nk)
    elif case == "bool-causal-padding":
        mask = (causal[None] & keep_keys[:, None, :])[:, None]
    elif case == "sliding":
        mask = (causal & ~torch.ones(Nq, Nk, dtype=torch.bool).tril(-3))[None, None].expand(B, 1, Nq, Nk)
    elif case == "float-bias":
        mask = torch.randn(1, H, Nq, Nk, requires_grad=True)
    elif case == "gqa":
        module.num_key_value_groups = 2
        k, v = (torch.randn(B, H // 2, Nk, D, requires_grad=True) for _ in range(2))
    elif case == "cross-batch-1":
        q = torch.randn(1, H, Nq, D, requires_grad=True)
        k, v = (torch.randn(B, H, 5, D, requires_grad=True) for _ in range(2))
        mask = keep_keys[:, None, None, :5].expand(B, 1, Nq, 5)
    elif case == "fully-masked-row":
        mask = causal[None, None].expand(B, 1, Nq, Nk).clone()
        mask[:, :, 0] = False  # sdpa outputs zeros for a query that sees nothing
    leaves = [t for t in (q, k, v, mask) if isinstance(t, torch.Tensor) and t.requires_grad]
    ref = _sdpa(module, q, k, v, mask, scaling=0.3, **kw)
    out, weights = vhf.vlfast_attention_forward(module, q, k, v, mask, scaling=0.3, **kw)
    assert weights is None and out.shape == ref.shape
    assert_close(out, ref)
    g_ref = torch.autograd.grad((ref * ref.detach().sin()).sum(), leaves)
    g_out = torch.autograd.grad((out * ref.detach().sin()).sum(), leaves)
    for a, b in zip(g_out, g_ref):
        assert_close(a, b, grad=True)
    c = calls[-1]
    expect = {"none": (False, False, False), "bool-padding": (True, False, False),
              "float-padding": (True, False, False), "bool-causal-padding": (True, True, False),
              "sliding": (False, False, True), "float-bias": (False, False, True), "gqa": (False, False, False),
              "cross-batch-1": (True, False, False), "fully-masked-row": (False, False, True)}[case]
    assert (c["kpm"] is not None, bool(c["causal"]), c["bias"] is not None) == expect
    if mask is not None and not mask.requires_grad:  # recognised once per mask tensor, not at every layer
        plan = getattr(mask, vhf._PLAN_ATTR)
        vhf.vlfast_attention_forward(module, q, k, v, mask, scaling=0.3)
        assert getattr(mask, vhf._PLAN_ATTR) is plan


def test_vlfast_mask_is_eager_compatible():
    """The vlfast mask equals eager's (so hand-written attention that adds it stays right) and carries its structure."""
    from transformers import BertConfig
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    cfg_e, cfg_v = BertConfig(), BertConfig()
    cfg_e._attn_implementation, cfg_v._attn_implementation = "eager", "vlfast"
    emb = torch.randn(3, 9, 4)
    am = _padding(3, 9)
    for make in (create_bidirectional_mask, create_causal_mask):
        kw = dict(inputs_embeds=emb, attention_mask=am)
        if make is create_causal_mask:
            kw["cache"] = None
        e, v = make(config=cfg_e, **kw), make(config=cfg_v, **kw)
        assert torch.equal(e, v)
        plan = getattr(v, vhf._PLAN_ATTR)
        assert plan.causal == (make is create_causal_mask)
        assert torch.equal(plan.key_padding_mask, ~am.bool())
    assert create_bidirectional_mask(config=cfg_v, inputs_embeds=emb, attention_mask=torch.ones(3, 9)) is None
    causal = create_causal_mask(config=cfg_v, inputs_embeds=emb, attention_mask=None, cache=None)
    assert causal is not None and getattr(causal, vhf._PLAN_ATTR).causal  # never None: hard-coded attention adds it
    assert math.isfinite(causal.min().item())
