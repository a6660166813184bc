"""vlfast.nn.EMA, vlfast.nn.MomentumEncoder and vlfast.schedules."""

import math

import pytest
import torch
from torch import nn

from vlfast.nn import EMA, MomentumEncoder
from vlfast.schedules import cosine_momentum


def _model(dtype=torch.float32):
    m = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.GELU(), nn.Linear(13, 3))
    m(torch.randn(5, 7))  # populate BatchNorm running statistics
    return m.to(dtype)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
            else:
                b.add_(1)


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_flat_fp32_copy_of_bf16_model():
    model = _model(torch.bfloat16)
    ema = EMA(model, decay=0.99)
    avg = ema._averaged()  # float32 masters; the module keeps the model's bf16 (one twin buffer)
    assert all(t.dtype == torch.float32 for t in avg)
    assert len(_storages(avg)) == 1  # one contiguous buffer
    mod = list(ema.module.parameters()) + [b for b in ema.module.buffers() if b.is_floating_point()]
    assert all(t.dtype == torch.bfloat16 for t in mod) and len(_storages(mod)) == 1
    assert all(v.dtype == torch.float32 for k, v in ema.state_dict().items() if "num_batches" not in k)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.module.training is False
    assert ema.module[1].num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("include_buffers", [True, False])
def test_update_matches_formula(include_buffers):
    model = _model(torch.bfloat16)
    ema = EMA(model, decay=0.9, include_buffers=include_buffers)
    before = {k[len("module."):]: v.clone() for k, v in ema.state_dict().items()}  # the float32 averages
    _perturb(model)
    ema.update(model)
    cur = model.state_dict()
    for k, v in ((k[len("module."):], v) for k, v in ema.state_dict().items()):
        avg_it = k in dict(model.named_parameters()) or (include_buffers and v.is_floating_point())
        if avg_it:
            want = before[k].double() * 0.9 + cur[k].double() * 0.1
            torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(v, cur[k].to(v.dtype))


def test_decay_schedule_like_timm_v3():
    model = _model()
    ema = EMA(model, decay=0.999, warmup=True, warmup_power=0.75, min_decay=0.1, update_after_step=3)
    assert ema.get_decay(None) == 0.999
    assert ema.get_decay(0) == 0.0 and ema.get_decay(4) == 0.0  # reset until update_after_step + 1
    s = 7 - 3 - 1
    assert ema.get_decay(7) == pytest.approx(max(min(1 - (1 + s) ** -0.75, 0.999), 0.1))
    assert ema.get_decay(10 ** 9) == 0.999
    plain = EMA(model, decay=0.99)
    assert plain.get_decay(1) == 0.0 and plain.get_decay(2) == 0.99


def test_first_step_resets_to_model():
    model = _model()
    ema = EMA(model, decay=0.99)
    _perturb(model)
    ema.update(model, step=0)
    for a, b in zip(ema.module.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_state_dict_roundtrip_and_copy_to():
    model = _model()
    ema = EMA(model, decay=0.5)
    _perturb(model)
    ema.update(model)
    sd = ema.state_dict()
    assert all(k.startswith("module.") for k in sd)  # timm ModelEmaV3 layout
    other = EMA(_model(), decay=0.5)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k])
    avg = [t for t in list(other.module.parameters()) + list(other.module.buffers()) if t.is_floating_point()]
    assert len(_storages(avg)) == 1  # still flat after loading
    target = _model()
    other.copy_to(target)
    for k, v in target.state_dict().items():
        assert torch.equal(v, sd["module." + k].to(v.dtype))


def test_to_keeps_flat_storage():
    ema = EMA(_model(), decay=0.5)
    ema.double()
    avg = list(ema.module.parameters())
    assert all(p.dtype == torch.float64 for p in avg) and len(_storages(avg)) == 1
    model = _model()
    ema.update(model)  # float64 average of a float32 model


def test_wrong_model_and_args():
    ema = EMA(_model(), decay=0.5)
    with pytest.raises(ValueError, match="no tensor named"):
        ema.update(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        EMA(_model(), decay=2.0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        EMA(torch.zeros(3))
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        EMA(_model(), dtype=torch.int32)


def test_momentum_encoder():
    online = _model()
    menc = MomentumEncoder(online, momentum=0.9)
    assert all(not p.requires_grad for p in menc.module.parameters())
    x = torch.randn(4, 7, requires_grad=True)
    menc.module.eval()
    assert not menc(x).requires_grad
    k0 = [p.clone() for p in menc.module.parameters()]
    _perturb(online)
    menc.update(online)
    for k, a, q in zip(menc.module.parameters(), k0, online.parameters()):
        torch.testing.assert_close(k, a * 0.9 + q.detach() * 0.1)
    menc.update(online, momentum=0.0)
    for k, q in zip(menc.module.parameters(), online.parameters()):
        assert torch.equal(k, q)
    with pytest.raises(ValueError, match="momentum encoder has"):
        menc.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        menc.update(online, momentum=1.5)


def test_cosine_momentum():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(500, 100, 0.99) == pytest.approx(1.0)
    for step in (1, 37, 50, 99):
        epoch_frac = step / 100
        moco_v3 = 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch_frac)) * (1.0 - 0.99)
        assert cosine_momentum(step, 100, 0.99) == pytest.approx(moco_v3, abs=1e-15)
    assert cosine_momentum(50, 100, 0.996, final=0.9995) == pytest.approx((0.996 + 0.9995) / 2)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_momentum(1, 0, 0.99)
    with pytest.raises(ValueError, match="step"):
        cosine_momentum(-1, 10, 0.99)
    with pytest.raises(ValueError, match="base"):
        cosine_momentum(1, 10, 1.5)


def test_flat_views_are_aligned_for_vector_loads():
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 1))  # odd sizes: 15, 5, 5, 1 elements
    ema = EMA(model, decay=0.5)
    for p in ema.module.parameters():
        assert p.data_ptr() % 64 == 0
    ema.update(model)


# --------------------------------------------------------------------------- ZeroEMA (fake ZeRO-3 parameters)

import copy  # noqa: E402
import types  # noqa: E402

from vlfast.distributed import ZeroEMA, make_ema  # noqa: E402
from vlfast.testing import fake_zero3_param  # noqa: E402


class _Tied(nn.Module):
    """Linear, BatchNorm (with a non-persistent buffer), a weight tied to the first layer's, a shared module."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.bn.register_buffer("scratch", torch.randn(6), persistent=False)
        self.dec = nn.Linear(4, 6, bias=False)
        self.dec.weight = self.enc.weight  # tied
        self.head = nn.Linear(6, 2)
        self.head2 = self.head  # the same module under two names
        self.bn(torch.randn(5, 6))


def _z3_twin(dtype=torch.float32, model=None):
    """A plain model and a copy whose parameters are fake ZeRO-3 ones (world 1) with the same values."""
    plain = model if model is not None else _Tied()
    z3 = copy.deepcopy(plain)
    fakes = {}
    for mod in z3.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in fakes:
                    fakes[id(p)] = fake_zero3_param(p.detach(), 0, 1, dtype)
                mod._parameters[leaf] = fakes[id(p)]
    return plain, z3


def _z3_model(dtype=torch.float32):
    return _z3_twin(dtype)


def _perturb_z3(model):
    with torch.no_grad():
        for p in model.parameters():
            p.ds_tensor.add_(torch.randn_like(p.ds_tensor, dtype=torch.float32).to(p.ds_tensor.dtype))
        for b in model.buffers():
            b.add_(torch.rand_like(b) if b.is_floating_point() else torch.ones_like(b))


def _full_of(p):
    return p.ds_tensor.float()[:p.ds_numel].view(tuple(p.ds_shape))


class _Wrapper(nn.Module):
    def __init__(self, ema):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.ema = ema


def test_zero_ema_state_dict_nests_with_prefix_and_destination():
    plain, z3 = _z3_model()
    ema = make_ema(z3, decay=0.5)
    assert isinstance(ema, ZeroEMA)
    _perturb_z3(z3)
    ema.update(z3)
    flat = ema.state_dict()
    sd = _Wrapper(ema).state_dict()
    assert {k for k in sd if k.startswith("ema.")} == {"ema." + k for k in flat}
    assert "lin.weight" in sd
    for k, v in flat.items():
        assert torch.equal(sd["ema." + k], v) and not sd["ema." + k].requires_grad
    dest = {"other": 1}
    out = ema.state_dict(destination=dest, prefix="x.", keep_vars=True)
    assert out is dest and dest["other"] == 1 and set(dest) == {"other"} | {"x." + k for k in flat}
    # load through a wrapper, into a ZeroEMA that holds something else
    _, z3b = _z3_model()
    w2 = _Wrapper(make_ema(z3b, decay=0.5))
    assert w2.ema._avg[0].data_ptr() != ema._avg[0].data_ptr()
    w2.load_state_dict(sd)
    assert all(torch.equal(v, flat[k]) for k, v in w2.ema.state_dict().items())
    # strictness goes through nn.Module: missing / unexpected keys under the EMA's prefix
    bad = dict(sd)
    bad.pop("ema.module.enc.weight")
    bad["ema.module.nope"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*ema.module.enc.weight"):
        w2.load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*ema.module.nope"):
        w2.load_state_dict(bad)
    res = w2.load_state_dict(bad, strict=False)
    assert "ema.module.enc.weight" in res.missing_keys and "ema.module.nope" in res.unexpected_keys
    shape = dict(sd)
    shape["ema.module.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="size mismatch for ema.module.head.weight"):
        w2.load_state_dict(shape)
    # nn.EMA nested the same way loads from / into the ZeroEMA's wrapper
    wp = _Wrapper(EMA(plain, decay=0.5))
    assert set(wp.state_dict()) == set(sd)
    wp.load_state_dict(sd)
    w2.load_state_dict(wp.state_dict())
    for k, v in sd.items():
        assert torch.equal(wp.state_dict()[k].to(v.dtype), v)
        assert torch.equal(w2.state_dict()[k], v)


def test_zero_ema_keys_match_nn_ema_without_non_persistent_buffers():
    plain, z3 = _z3_model()
    ema, ref = make_ema(z3, decay=0.5), EMA(plain, decay=0.5)
    assert "module.bn.scratch" not in ref.state_dict()  # nn.Module drops non-persistent buffers
    assert list(ema.state_dict()) == list(ref.state_dict())  # same keys, same order (tied and shared names too)
    assert "module.dec.weight" in ema.state_dict() and "module.head2.bias" in ema.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v.to(ema.state_dict()[k].dtype))
    ref.load_state_dict(ema.state_dict())
    ema.load_state_dict(ref.state_dict())
    # the non-persistent buffer is still averaged (and restored by copy_to)
    i = len(ema._param_names) + ema._avg_buffer_names.index("bn.scratch")
    before = ema._avg[i].clone()
    _perturb_z3(z3)
    ema.update(z3)
    torch.testing.assert_close(ema._avg[i], 0.5 * before + 0.5 * z3.bn.scratch)


def test_zero_ema_to_and_double_move_the_average():
    _, z3 = _z3_model(torch.bfloat16)
    ema = make_ema(z3, decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema._avg)
    ints = [t for t in ema._copies if not t.is_floating_point()]
    assert ints  # num_batches_tracked
    assert ema.double() is ema
    assert all(t.dtype == torch.float64 for t in ema._avg)
    assert all(t.dtype == torch.int64 for t in ints) and all(t.dtype == torch.int64 for t in ema._copies)
    _perturb_z3(z3)
    ema.update(z3)  # float64 average of bf16 shards
    assert all(v.dtype in (torch.float64, torch.int64) for v in ema.state_dict().values())
    ema.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in ema._avg)
    ema.to("meta")
    assert all(t.device.type == "meta" for t in ema._avg + ema._copies)


def test_zero_ema_full_state_dict_gathers_one_parameter_at_a_time(monkeypatch):
    import vlfast.distributed.zero_ema as E

    _, z3 = _z3_model()
    ema = make_ema(z3, decay=0.5)
    _perturb_z3(z3)
    ema.update(z3)
    ref = ema.state_dict()
    calls = []
    gather = E.gather_full
    monkeypatch.setattr(E, "gather_full", lambda p, shard: calls.append(p) or gather(p, shard))
    full = ema.full_state_dict()
    assert list(full) == list(ref) and all(torch.equal(full[k], v) and full[k].device.type == "cpu"
                                           for k, v in ref.items())
    n = len(list(z3.parameters()))  # the tied weight is gathered once
    assert len(calls) == n
    monkeypatch.setattr(ZeroEMA, "_rank", staticmethod(lambda: 1))
    calls.clear()
    assert ema.full_state_dict() == {}  # rank 1 keeps nothing ...
    assert len(calls) == n  # ... but takes part in every gather
    assert list(ema.full_state_dict(rank0_only=False)) == list(ref)


class _FakeEngine:
    def __init__(self, rank=0, world=1):
        self.rank, self.world_size = rank, world

    def barrier(self):
        pass

    def save(self, path):
        pass

    def load(self, path):
        pass


def test_save_checkpoint_gathers_zero_ema_on_rank0_only(tmp_path, monkeypatch):
    from vlfast.training import checkpoint as ckpt

    plain, z3 = _z3_model()
    ema = make_ema(z3, decay=0.5)
    _perturb_z3(z3)
    ema.update(z3)
    ref = ema.state_dict()

    def boom(*a, **k):
        raise AssertionError("state_dict() gathers the whole EMA on every rank")

    monkeypatch.setattr(ZeroEMA, "state_dict", boom)
    path = ckpt.CheckpointManager(str(tmp_path)).save(3, _FakeEngine(), {}, ema=ema)
    saved = torch.load(f"{path}/ema.pt", map_location="cpu")
    assert list(saved) == list(ref) and all(torch.equal(saved[k], v) for k, v in ref.items())
    # rank 1 of 2 takes part in the gathers and keeps nothing; plain EMA: no state_dict on rank 1
    used = []
    monkeypatch.setattr(ZeroEMA, "full_state_dict", lambda self, **kw: used.append(kw) or {})
    ckpt.CheckpointManager(str(tmp_path / "r1")).save(3, _FakeEngine(rank=1, world=2), {}, ema=ema)
    assert used and used[0].get("rank0_only", True)
    plain_ema = EMA(plain, decay=0.5)
    monkeypatch.setattr(EMA, "state_dict", boom)
    ckpt.CheckpointManager(str(tmp_path / "r1")).save(4, _FakeEngine(rank=1, world=2), {}, ema=plain_ema)
    # load: ema.pt is memory-mapped
    monkeypatch.undo()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: loads.append((str(f), kw)) or real_load(f, *a, **kw))
    _, z3b = _z3_model()
    emab = make_ema(z3b, decay=0.5)
    ckpt.CheckpointManager.load(path, _FakeEngine(), emab)
    assert any(f.endswith("ema.pt") and kw.get("mmap") and kw.get("map_location") == "cpu" and kw.get("weights_only")
               for f, kw in loads)
    assert all(torch.equal(v, ref[k]) for k, v in emab.state_dict().items())


def test_zero_ema_refuses_quantized_and_hpz_shards():
    from vlfast.sharding import check_plain_shards

    _, z3 = _z3_model()
    z3.head.weight.ds_tensor.ds_quant_scale = torch.ones(1)  # ZeRO++ zero_quantized_nontrainable_weights
    with pytest.raises(ValueError, match=r"'head.weight'.*zero_quantized_nontrainable_weights"):
        make_ema(z3)
    _, z3 = _z3_model()
    for p in z3.parameters():
        p.ds_secondary_tensor = None  # what DeepSpeed sets without hpZ
    ema = make_ema(z3, decay=0.5)
    ema.copy_to(z3)
    z3.enc.bias.ds_secondary_tensor = z3.enc.bias.ds_tensor.clone()  # hpZ: gathers read this
    ema = make_ema(z3, decay=0.5)  # reading the primary shards is fine
    ema.update(z3)
    with pytest.raises(ValueError, match=r"'enc.bias'.*zero_hpz_partition_size"):
        ema.copy_to(z3)
    with pytest.raises(ValueError, match=r"'enc.bias'.*zero_hpz_partition_size"):
        with ema.swapped_into(z3):
            pass
    with pytest.raises(ValueError, match=r"update: ZeRO-3 parameter #1.*zero_hpz_partition_size"):
        check_plain_shards([z3.enc.weight, z3.enc.bias], "update")
    check_plain_shards([z3.enc.bias], "read", write=False)


def test_ema_subclass_refuses_partitioned_model():
    class MyEMA(EMA):
        pass

    class MyZeroEMA(ZeroEMA):
        pass

    _, z3 = _z3_model()
    with pytest.raises(TypeError, match=r"MyEMA.*partitioned.*make_ema\(model.*ZeroEMA"):
        MyEMA(z3)
    with pytest.raises(TypeError, match=r"EMA got a model.*partitioned.*vlfast.distributed.make_ema"):
        EMA(z3)  # never silently another class
    assert type(MyZeroEMA(z3)) is MyZeroEMA
    assert type(make_ema(z3)) is ZeroEMA
    assert type(make_ema(_model())) is EMA
    assert type(MyEMA(_model())) is MyEMA


def test_zero_ema_swapped_into_restores_the_model():
    _, z3 = _z3_model(torch.bfloat16)
    ema = make_ema(z3, decay=0.5)
    _perturb_z3(z3)
    ema.update(z3)
    # a persistent parameter resident in full (its data is the gather of the shards)
    res = z3.head.bias
    res.ds_status = types.SimpleNamespace(name="AVAILABLE")
    res.data = _full_of(res).to(res.dtype)
    shards = {n: p.ds_tensor.clone() for n, p in z3.named_parameters()}
    buffers = {n: b.clone() for n, b in z3.named_buffers()}
    resident = res.data.clone()
    avg = {k[len("module."):]: v for k, v in ema.state_dict().items()}

    def check_average():
        for n, p in z3.named_parameters():
            assert torch.equal(p.ds_tensor, avg[n].reshape(-1).to(p.dtype)), n
        assert torch.equal(res.data, avg["head.bias"].to(res.dtype))
        for n, b in z3.named_buffers():
            if n != "bn.scratch":
                assert torch.equal(b, avg[n].to(b.dtype)), n

    def check_restored():
        for n, p in z3.named_parameters():
            assert torch.equal(p.ds_tensor, shards[n]), n  # exact (the bf16 originals, not a round trip)
        assert torch.equal(res.data, resident)
        for n, b in z3.named_buffers():
            assert torch.equal(b, buffers[n]), n

    with ema.swapped_into(z3) as m:
        assert m is z3
        check_average()
    check_restored()
    with pytest.raises(KeyError):
        with ema.swapped_into(z3):
            check_average()
            raise KeyError("evaluation failed")
    check_restored()
    # a parameter gathered during the block (e.g. prefetched) is re-gathered from the restored shard
    late = z3.enc.weight
    with ema.swapped_into(z3):
        late.ds_status = types.SimpleNamespace(name="AVAILABLE")
        late.data = _full_of(late).to(late.dtype)
        assert torch.equal(late.data, avg["enc.weight"].to(late.dtype))
    assert torch.equal(late.data, shards["enc.weight"].view(late.data.shape))
    check_restored()
    assert "optimizer" in ZeroEMA.copy_to.__doc__ and "swapped_into" in ZeroEMA.copy_to.__doc__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_fused_flag_runs_the_eager_loop(dtype, monkeypatch):
    import vlfast.nn.ema as E
    from vlfast.ops import ema_update_
    from vlfast.reference.ema import model_ema_update_

    model = _model().to(dtype)
    fused, eager = EMA(model, decay=0.9), EMA(model, decay=0.9, fused=False)
    assert fused.fused and not eager.fused
    calls = []
    monkeypatch.setattr(E, "ema_update_", lambda *a, **k: calls.append("op") or ema_update_(*a, **k))
    monkeypatch.setattr(E, "model_ema_update_", lambda *a: calls.append("loop") or model_ema_update_(*a))
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        fused.update(model)
        eager.update(model)
    assert calls == ["op", "loop"] * 3
    for (k, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)
    with pytest.raises(TypeError, match="fused must be a bool"):
        EMA(model, fused=1)


def test_momentum_encoder_fused_flag():
    online = _model()
    enc = MomentumEncoder(online, momentum=0.5, fused=False)
    assert not enc.fused
    with pytest.raises(TypeError, match="fused must be a bool"):
        MomentumEncoder(online, fused="yes")
