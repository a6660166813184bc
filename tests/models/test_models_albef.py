"""ALBEF reference model (vlfast.models.albef): structure, eager/fused parity, convergence, input errors."""

import copy

import pytest
import torch

from vlfast.models import create, list_models, set_fused
from vlfast.models.albef import ALBEF
from vlfast.models.tokenizer import CLS, MASK, PAD, SEP, ByteTokenizer
from vlfast.nn import Attention, CrossAttention, MomentumEncoder

PARTS = ("loss", "itc", "itm", "mlm")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The micro model's ops are tiny: intra-op threads only add OpenMP spin-waits (10x slower on a busy host)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n(module):
    return sum(p.numel() for p in module.parameters())


def _micro(seed=0, **kw):
    torch.manual_seed(seed)
    return create("albef_micro", **kw)


def _batch(model, n=4, seed=0):
    return model.synthetic_batch(n, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ structure
def test_registered():
    names = list_models()
    assert "albef_base" in names and "albef_micro" in names


def test_albef_base_meta_parameter_count_and_names():
    with torch.device("meta"):
        m = create("albef_base")
    assert isinstance(m, ALBEF)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    # ViT-B/16 without head
    assert _n(m.visual_encoder) == 85_798_656
    # BERT-base: embeddings 23,837,184; 6 text layers x 7,087,872; 6 fusion layers x 9,451,776
    # (+ cross-attention 2,363,904); MLM head 592,128 + bias 30,522 (decoder tied to the word embeddings)
    assert _n(m.text_encoder.embeddings) == 23_837_184
    assert _n(m.text_encoder.encoder.layer[0]) == 7_087_872
    assert _n(m.text_encoder.encoder.layer[6]) == 9_451_776
    assert _n(m.text_encoder) == 123_697_722
    assert _n(m.vision_proj) == _n(m.text_proj) == 768 * 256 + 256
    assert _n(m.itm_head) == 768 * 2 + 2
    # + temp: ALBEF's model_pretrain.py has the same count (~209.9M trainable)
    assert trainable == 209_891_645
    # momentum copies are frozen and as large as their online networks
    assert _n(m.visual_encoder_m) == _n(m.visual_encoder)
    assert _n(m.text_encoder_m) == _n(m.text_encoder)
    assert not any(p.requires_grad for n, p in m.named_parameters() if "_m." in n)

    sd = m.state_dict()
    for key, shape in [
        ("visual_encoder.patch_embed.proj.weight", (768, 3, 16, 16)),
        ("visual_encoder.pos_embed", (1, 197, 768)),
        ("visual_encoder.blocks.11.attn.qkv.weight", (2304, 768)),
        ("vision_proj.weight", (256, 768)),
        ("text_encoder.embeddings.word_embeddings.weight", (30522, 768)),
        ("text_encoder.embeddings.position_embeddings.weight", (512, 768)),
        ("text_encoder.embeddings.token_type_embeddings.weight", (2, 768)),
        ("text_encoder.embeddings.LayerNorm.weight", (768,)),
        ("text_encoder.encoder.layer.0.attention.self.qkv.weight", (2304, 768)),
        ("text_encoder.encoder.layer.0.attention.output.LayerNorm.bias", (768,)),
        ("text_encoder.encoder.layer.5.intermediate.dense.weight", (3072, 768)),
        ("text_encoder.encoder.layer.6.crossattention.self.q.weight", (768, 768)),
        ("text_encoder.encoder.layer.6.crossattention.self.kv.weight", (1536, 768)),
        ("text_encoder.encoder.layer.11.crossattention.output.LayerNorm.weight", (768,)),
        ("text_encoder.encoder.layer.11.output.dense.weight", (768, 3072)),
        ("text_encoder.cls.predictions.transform.dense.weight", (768, 768)),
        ("text_encoder.cls.predictions.decoder.weight", (30522, 768)),
        ("text_encoder.cls.predictions.bias", (30522,)),
        ("text_proj.weight", (256, 768)),
        ("itm_head.weight", (2, 768)),
        ("itc.temp", ()),
        ("itc.image_queue", (65536, 256)),
        ("itc.text_queue", (65536, 256)),
        ("itc.queue_ptr", (1,)),
        ("visual_encoder_m.module.blocks.0.attn.qkv.weight", (2304, 768)),
        ("text_encoder_m.module.encoder.layer.11.crossattention.self.kv.weight", (1536, 768)),
        ("vision_proj_m.module.weight", (256, 768)),
        ("text_proj_m.module.weight", (256, 768)),
    ]:
        assert tuple(sd[key].shape) == shape, key
    assert not any("layer.5.crossattention" in k for k in sd)
    assert not any("layer.12." in k for k in sd)
    assert m.text_encoder.cls.predictions.decoder.weight is m.text_encoder.embeddings.word_embeddings.weight
    assert (m.text_encoder_m.module.cls.predictions.decoder.weight
            is m.text_encoder_m.module.embeddings.word_embeddings.weight)
    assert m.visual_encoder_m.momentum == 0.995 and m.itc.queue_size == 65536 and m.itc.dim == 256


def test_set_fused_reaches_every_component():
    m = _micro()
    flagged = [mod for mod in m.modules() if isinstance(getattr(mod, "fused", None), bool)]
    kinds = {type(mod) for mod in flagged}
    assert {Attention, CrossAttention, MomentumEncoder, type(m.itc)} <= kinds
    # attention inside the momentum copies is switched too
    assert any(isinstance(mod, CrossAttention) for mod in m.text_encoder_m.modules())
    set_fused(m, False)
    assert all(mod.fused is False for mod in flagged)
    set_fused(m, True)
    assert all(mod.fused is True for mod in flagged)


def test_synthetic_batch():
    m = _micro()
    b1, b2 = _batch(m, 4, seed=3), _batch(m, 4, seed=3)
    for k in ("images", "input_ids", "attention_mask"):
        assert torch.equal(b1[k], b2[k])
    assert b1["images"].shape == (4, 3, 32, 32)
    ids, att = b1["input_ids"], b1["attention_mask"]
    assert ids.shape == att.shape == (4, m.text_len) and ids.dtype == torch.long
    assert (ids[:, 0] == CLS).all() and ((ids == PAD) == (att == 0)).all()
    assert int(ids.max()) < m.vocab_size
    # a ByteTokenizer batch works as input
    tok_ids, tok_att = ByteTokenizer()(["a cat", "two dogs", "a red car", "sky"], max_length=m.text_len)
    out = m(b1["images"], tok_ids, tok_att)
    assert torch.isfinite(out["loss"])


def test_mask_tokens_bert_scheme():
    m = _micro(mlm_probability=0.5)
    b = _batch(m, 8)
    ids, att = b["input_ids"].repeat(8, 1), b["attention_mask"].repeat(8, 1)
    torch.manual_seed(0)
    masked, labels = m.mask_tokens(ids, att)
    chosen = labels != -100
    special = (ids == PAD) | (ids == CLS) | (ids == SEP) | (ids == MASK) | (att == 0)
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.sum().item() / (~special).sum().item()
    assert 0.4 < rate < 0.6
    to_mask = (masked[chosen] == MASK).float().mean().item()
    assert 0.7 < to_mask < 0.9
    # same seed, same draws
    torch.manual_seed(0)
    masked2, labels2 = m.mask_tokens(ids, att)
    assert torch.equal(masked, masked2) and torch.equal(labels, labels2)
    # data-parallel ranks: the draws of a row depend on its global row index, not on the split
    full, full_labels = m.mask_tokens(ids, att, seed=123)  # 64 rows = 2 ranks x 32
    for offset in (0, 32):
        rows = slice(offset, offset + 32)
        part, part_labels = m.mask_tokens(ids[rows], att[rows], seed=123, row_offset=offset)
        assert torch.equal(part, full[rows]) and torch.equal(part_labels, full_labels[rows])
    other, _ = m.mask_tokens(ids, att, seed=124)
    assert not torch.equal(other, full)


def test_counter_draws_are_uniform_and_sample_by_weight():
    from vlfast.models.albef import _counter_uniform, _sample_rows

    u = _counter_uniform(7, 1, torch.arange(1000), 1000).double()
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    # neighbouring rows / columns / streams / seeds are uncorrelated
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:]),
                 (u, _counter_uniform(7, 2, torch.arange(1000), 1000).double()),
                 (u, _counter_uniform(8, 1, torch.arange(1000), 1000).double())):
        assert abs(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()) < 5e-3
    # Gumbel-max sampling follows the weights (zero weight: never drawn)
    w = torch.tensor([[0.0, 1.0, 2.0, 5.0]]).expand(20000, 4)
    idx = _sample_rows(w, 3, 5, torch.arange(20000))
    freq = torch.bincount(idx, minlength=4).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.125, 0.25, 0.625], dtype=torch.float64), atol=0.015, rtol=0)


# ------------------------------------------------------------------------------------ parity
def _step(model, batch, fused, seed, **kw):
    set_fused(model, fused)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch, **kw)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads, copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.0}, {"alpha": 0.7, "idx": torch.tensor([3, 1, 3, 0])}],
                         ids=["alpha0.4", "alpha0", "alpha0.7-idx"])
def test_eager_fused_parity(kw):
    m = _micro()
    batch = _batch(m, 4)
    # a non-trivial starting state: one step moves the queue pointer and fills some queue rows
    set_fused(m, True)
    m(**_batch(m, 4, seed=1))
    m.zero_grad(set_to_none=True)
    sd0 = copy.deepcopy(m.state_dict())

    m.load_state_dict(sd0)
    out_e, g_e, sd_e = _step(m, batch, False, 7, **kw)
    m.load_state_dict(sd0)
    out_f, g_f, sd_f = _step(m, batch, True, 7, **kw)

    for k in PARTS:
        assert torch.isfinite(out_e[k])
        torch.testing.assert_close(out_f[k], out_e[k], rtol=1e-5, atol=1e-5, msg=k)

    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert set(g_e) == set(g_f) == trainable
    for n in trainable:
        denom = g_e[n].norm().clamp(min=1e-8)
        assert ((g_f[n] - g_e[n]).norm() / denom).item() < 1e-4, n
    assert g_e["itc.temp"].abs().item() > 0  # the temperature learns

    # momentum weights: identical update in both modes; queues: same rows written at the same place
    for k in sd0:
        if k.startswith(("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")):
            assert torch.equal(sd_f[k], sd_e[k]), k  # ema_update_ and the eager loop agree bit for bit
    assert torch.equal(sd_e["itc.queue_ptr"], sd_f["itc.queue_ptr"])
    assert int(sd_e["itc.queue_ptr"]) == (int(sd0["itc.queue_ptr"]) + 4) % 64
    assert torch.equal(sd_e["itc.idx_queue"], sd_f["itc.idx_queue"])
    p = int(sd0["itc.queue_ptr"])
    for q in ("itc.image_queue", "itc.text_queue"):
        torch.testing.assert_close(sd_f[q], sd_e[q], rtol=0, atol=1e-5)
        assert not torch.allclose(sd_e[q][p:p + 4], sd0[q][p:p + 4])
        assert torch.equal(sd_e[q][:p], sd0[q][:p]) and torch.equal(sd_e[q][p + 4:], sd0[q][p + 4:])
    if "idx" in kw:
        assert torch.equal(sd_e["itc.idx_queue"][p:p + 4], kw["idx"])


def test_momentum_update_matches_albef_formula():
    m = _micro()
    with torch.no_grad():
        for p in m.text_encoder.parameters():
            p.add_(0.1)
    before = {n: p.clone() for n, p in m.text_encoder_m.module.named_parameters()}
    online = dict(m.text_encoder.named_parameters())
    m(**_batch(m, 4))
    for n, p in m.text_encoder_m.module.named_parameters():
        torch.testing.assert_close(p, before[n] * 0.995 + online[n].detach() * 0.005, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ convergence
def test_convergence_eager_vs_fused():
    torch.manual_seed(0)
    init = copy.deepcopy(create("albef_micro").state_dict())
    curves = {}
    for fused in (False, True):
        m = create("albef_micro", fused=fused)
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
        assert c[-5:, 3].mean() < c[:5, 3].mean()  # MLM learns


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_and_leave_state_untouched():
    m = _micro()
    b = _batch(m, 4)
    imgs, ids, att = b["images"], b["input_ids"], b["attention_mask"]
    sd0 = copy.deepcopy(m.state_dict())
    bad = [
        dict(input_ids=ids.clone().fill_(m.vocab_size)),
        dict(input_ids=torch.where(ids == PAD, torch.full_like(ids, -1), ids)),
        dict(input_ids=ids.float()),
        dict(input_ids=ids[:, :, None]),
        dict(images=imgs[:, :, :16]),
        dict(images=imgs[:, :1]),
        dict(images=imgs[0]),
        dict(images=imgs[:3]),
        dict(images=imgs.long()),
        dict(attention_mask=att[:, :-1]),
        dict(attention_mask=att * 2),
        dict(images=imgs[:1], input_ids=ids[:1], attention_mask=att[:1]),  # ITM needs another pair
        dict(images=imgs[:3], input_ids=ids[:3], attention_mask=att[:3]),  # 3 does not divide the queue
        dict(input_ids=torch.ones(4, 65, dtype=torch.long), attention_mask=torch.ones(4, 65, dtype=torch.long)),
        dict(alpha=1.5),
    ]
    for change in bad:
        kwargs = dict(images=imgs, input_ids=ids, attention_mask=att)
        kwargs.update(change)
        with pytest.raises(ValueError):
            m(**kwargs)
    sd1 = m.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    with pytest.raises(ValueError):
        m.synthetic_batch(0)
    with pytest.raises(ValueError):
        create("albef_micro", mlm_probability=1.5)


# ------------------------------------------------------------------------------------ checkpoints
def _to_original_albef(sd, text_layers):
    """Our state_dict in salesforce/ALBEF's layout (HF BERT names, (dim, K) queues, no itc prefix)."""
    out = {}
    for k, t in sd.items():
        if k.startswith("itc."):
            leaf = k[4:]
            if leaf == "idx_queue":
                continue
            out[leaf] = t.t().contiguous() if leaf.endswith("_queue") else t
            continue
        k = k.replace("_m.module.", "_m.")
        if k.startswith(("text_encoder.", "text_encoder_m.")):
            head, rest = k.split(".", 1)
            if not rest.startswith("cls."):
                rest = "bert." + rest
            if ".attention.self.qkv." in rest:
                for part, chunk in zip(("query", "key", "value"), t.chunk(3, 0)):
                    out[f"{head}.{rest.replace('.qkv.', f'.{part}.')}"] = chunk.clone()
                continue
            if ".crossattention.self.kv." in rest:
                for part, chunk in zip(("key", "value"), t.chunk(2, 0)):
                    out[f"{head}.{rest.replace('.kv.', f'.{part}.')}"] = chunk.clone()
                continue
            rest = rest.replace(".crossattention.self.q.", ".crossattention.self.query.")
            rest = rest.replace(".self.proj.", ".output.dense.")
            k = f"{head}.{rest}"
            if rest == "cls.predictions.bias":
                out[f"{head}.cls.predictions.decoder.bias"] = t
        out[k] = t
    for head in ("text_encoder", "text_encoder_m"):
        out[f"{head}.bert.embeddings.position_ids"] = torch.arange(64)[None]
    return out


def test_convert_albef_checkpoint_roundtrip():
    from vlfast.models.albef import convert_albef_checkpoint

    src = _micro(seed=1)
    src(**_batch(src, 4))  # move queues / pointer / momentum weights
    original = _to_original_albef(src.state_dict(), text_layers=2)
    assert "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight" in original
    assert "text_encoder_m.bert.encoder.layer.0.attention.self.query.weight" in original
    assert original["image_queue"].shape == (32, 64)
    dst = _micro(seed=2)
    dst.load_state_dict(convert_albef_checkpoint(original))
    a, b = src.state_dict(), dst.state_dict()
    for k in a:
        if k == "itc.idx_queue":
            assert (b[k] == -100).all()
        else:
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ data parallel
def _losses_of(model, batch, seed):
    torch.manual_seed(seed)
    out = model(**batch)
    return torch.stack([out[k].detach() for k in ("loss", "itc", "itm", "mlm")])


def _dp_worker(rank, world, port, path):
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        res = {}
        for gb in (False, True):
            model = _micro(global_batch=gb)
            batch = _batch(model, 8, seed=1)
            rows = slice(rank * 4, (rank + 1) * 4)
            local = {k: v[rows] for k, v in batch.items()}
            torch.manual_seed(5 + rank)  # per-rank RNG streams; the global-batch draws share rank 0's seed
            if rank == 0:
                torch.manual_seed(5)
            out = model(**local)
            res[gb] = torch.stack([out[k].detach() for k in ("loss", "itc", "itm", "mlm")])
        torch.save(res, f"{path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_global_batch_two_ranks(tmp_path):
    """2 gloo ranks of 4 samples: global_batch=True averages to one process's loss on all 8 (every
    term); global_batch=False is ALBEF's per-GPU model: each rank's loss is one process's on its 4."""
    import torch.multiprocessing as mp

    from vlfast.testing import free_port

    port = free_port()
    path = str(tmp_path / "res")
    mp.start_processes(_dp_worker, args=(2, port, path), nprocs=2, join=True, start_method="spawn")
    res = [torch.load(f"{path}.{r}") for r in range(2)]
    model = _micro(global_batch=True)
    batch = _batch(model, 8, seed=1)
    whole = _losses_of(model, batch, 5)
    torch.testing.assert_close((res[0][True] + res[1][True]) / 2, whole, atol=1e-5, rtol=1e-5)
    for r in range(2):
        model = _micro(global_batch=False)
        local = {k: v[r * 4:(r + 1) * 4] for k, v in batch.items()}
        torch.testing.assert_close(res[r][False], _losses_of(model, local, 5 + r), atol=1e-5, rtol=1e-5)
