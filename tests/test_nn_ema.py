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
    avg = list(ema.module.parameters()) + [b for b in ema.module.buffers() if b.is_floating_point()]
    assert all(t.dtype == torch.float32 for t in avg)
    assert len(_storages(avg)) == 1  # one contiguous buffer
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.module.training is False
    assert ema.module[1].num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("include_buffers", [True, False])
def test_update_matches_formula(include_buffers):
    model = _model(torch.bfloat16)
    ema = EMA(model, decay=0.9, include_buffers=include_buffers)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    _perturb(model)
    ema.update(model)
    cur = model.state_dict()
    for k, v in ema.module.state_dict().items():
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
