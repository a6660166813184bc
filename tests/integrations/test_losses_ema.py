"""vlfast.nn.ClipLoss / SigLipLoss against open_clip's own classes, vlfast.nn.EMA against timm's ModelEmaV3.

The losses: values and every gradient (features, ``logit_scale``, ``logit_bias``) equal
open_clip's, in one process and on 2 gloo ranks for ``ClipLoss``'s four ``local_loss`` x
``gather_with_grad`` combinations and ``SigLipLoss``'s four ``dist_impl``; output dtypes as
open_clip's (with and without autocast); the fused op is what runs (call counts, and the
Triton backend under the interpreter).  The EMA: the same averages as ``ModelEmaV3`` over
several steps (warmup, ``exclude_buffers``, positional arguments), state dicts that load both
ways, and the EMA of a bf16 model, which takes the model's bf16 inputs while averaging in
float32; ``dtype=None`` of a bf16 model reproduces timm's stochastic rounding bit for bit.
"""

import copy

import open_clip.loss as oc
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.utils.model_ema import ModelEmaV3

import vlfast.nn.contrastive as vc
import vlfast.nn.ema as vema
from vlfast.nn import EMA, ClipLoss, SigLipLoss
from vlfast.testing import run_gloo_ranks, assert_close

WHAT = ("loss", "image grad", "text grad", "logit_scale grad", "logit_bias grad")


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name) -> calls``: the global ``name`` of ``module`` wrapped to record each call."""

    def install(module, name):
        calls, real = [], getattr(module, name)

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return calls

    return install


def _unit(n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d), dim=1).to(dtype)


def _run(loss_fn, img, txt, scale, bias, *, output_dict=False, siglip=False):
    """Loss and gradients of fresh leaves (img, txt, scale, bias; bias None: not passed)."""
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    if siglip:
        out = loss_fn(*leaves, b, output_dict=output_dict)
    else:
        out = loss_fn(*leaves, logit_bias=b, output_dict=output_dict)
    loss = out["contrastive_loss"] if output_dict else out
    if output_dict:
        assert set(out) == {"contrastive_loss"}
    loss.backward()
    grads = [t.grad for t in leaves] + ([] if b is None else [b.grad])
    return [loss.detach()] + grads


def _compare(got, want, msg, dtype=torch.float32):
    assert len(got) == len(want)
    for g, w, what in zip(got, want, WHAT):
        assert g is not None, f"{msg}: no {what}"
        assert g.dtype == w.dtype, f"{msg}: {what} dtype {g.dtype}, open_clip's {w.dtype}"
        assert_close(g, w, dtype, msg=f"{msg}: {what}")


# ---------------------------------------------------------------- losses, one process
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_open_clip(with_bias, count_calls):
    img, txt = _unit(7, 16), _unit(7, 16)
    scale, bias = torch.tensor(12.5), (torch.tensor(-2.0) if with_bias else None)
    fused = count_calls(vc, "clip_loss")
    eager = count_calls(vc, "clip_loss_reference")
    for output_dict in (False, True):
        want = _run(oc.ClipLoss(), img, txt, scale, bias, output_dict=output_dict)
        got = _run(ClipLoss(), img, txt, scale, bias, output_dict=output_dict)
        _compare(got, want, f"ClipLoss output_dict={output_dict}")
        # open_clip's positional arguments: (local_loss, gather_with_grad, cache_labels, rank, world_size)
        got = _run(ClipLoss(False, False, True, 0, 1), img, txt, scale, bias, output_dict=output_dict)
        _compare(got, want, "ClipLoss(False, False, True, 0, 1)")
    assert (len(fused), len(eager)) == (4, 0)  # the tile-wise op, never the eager formula
    got = _run(ClipLoss(fused=False), img, txt, scale, bias)
    _compare(got, want, "ClipLoss(fused=False)")
    assert len(eager) == 1
    # the Triton kernels (in the interpreter without a GPU) give the same
    _compare(_run(ClipLoss(backend="triton"), img, txt, scale, bias), want, "ClipLoss(backend='triton')")


def test_siglip_loss_matches_open_clip(count_calls):
    img, txt = _unit(9, 16), _unit(9, 16)
    scale, bias = torch.tensor(10.0), torch.tensor(-6.0)
    fused, eager = count_calls(vc, "siglip_loss"), count_calls(vc, "siglip_loss_reference")
    for output_dict in (False, True):
        want = _run(oc.SigLipLoss(), img, txt, scale, bias, output_dict=output_dict, siglip=True)
        for m in (SigLipLoss(), SigLipLoss(False, 0, 1, "gather"), SigLipLoss(fused=False),
                  SigLipLoss(backend="triton")):
            _compare(_run(m, img, txt, scale, bias, output_dict=output_dict, siglip=True), want, repr(m))
    assert (len(fused), len(eager)) == (6, 2)  # 3 fused modules and the eager one, twice
    assert SigLipLoss().dist_impl == oc.SigLipLoss().dist_impl == "bidir"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_loss_dtype_is_open_clips(dtype, autocast):
    img, txt = _unit(6, 16, dtype), _unit(6, 16, dtype)
    scale, bias = torch.tensor(8.0), torch.tensor(-4.0)
    x64, y64 = img.double(), txt.double()
    for mine, theirs, args in ((ClipLoss(), oc.ClipLoss(), (scale,)), (ClipLoss(), oc.ClipLoss(), (scale, bias)),
                               (SigLipLoss(), oc.SigLipLoss(), (scale, bias))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, want = mine(img, txt, *args), theirs(img, txt, *args)
        assert got.dtype == want.dtype, f"{type(mine).__name__} {dtype} autocast={autocast}"
        exact = theirs(x64, y64, *(a.double() for a in args))  # open_clip's formula in float64
        # the op does not lower fp32 features to bf16 under autocast: within bf16's tolerance of it, or better
        assert_close(got, exact.to(got.dtype), torch.bfloat16 if autocast else dtype)


def test_clip_loss_arguments():
    m = ClipLoss(False)
    assert (m.local_loss, m.gather_with_grad, m.gather) == (False, False, None)  # open_clip's first argument
    m = ClipLoss(True, True, True, 0, 1)
    assert (m.local_loss, m.gather_with_grad, m.cache_labels, m.rank, m.world_size) == (True, True, True, 0, 1)
    m = ClipLoss(gather=True)  # vlfast's data-parallel form
    assert (m.local_loss, m.gather_with_grad) == (True, True)
    assert ClipLoss(gather=False, group=None, backend="torch").gather is False  # today's keywords
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="gather=True"):
        ClipLoss(local_loss=True, gather=True)
    with pytest.raises(ValueError, match="gather=False"):
        ClipLoss(world_size=2, gather=False)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(TypeError, match="local_loss"):
        ClipLoss(1)
    with pytest.raises(TypeError, match="world_size"):
        ClipLoss(world_size=2.0)
    img, txt = _unit(4, 8), _unit(4, 8)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        ClipLoss(world_size=2, rank=0)(img, txt, 1.0)
    # labels as open_clip's get_ground_truth, cached with cache_labels
    m = ClipLoss(cache_labels=True)
    lab = m.get_ground_truth(torch.device("cpu"), 5)
    assert torch.equal(lab, torch.arange(5)) and m.get_ground_truth(torch.device("cpu"), 5) is lab
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        SigLipLoss(world_size=2, rank=1)(img, txt, 1.0, 0.0)


# ---------------------------------------------------------------- losses, 2 gloo ranks
def _dist_checks(rank, world):
    torch.manual_seed(0)  # the same global batch on every rank
    N, D = 3, 8
    img, txt = _unit(world * N, D), _unit(world * N, D)
    scale, bias = torch.tensor(7.0), torch.tensor(-2.0)
    rows = slice(rank * N, (rank + 1) * N)
    x, y = img[rows], txt[rows]
    for local_loss in (False, True):
        for gwg in (False, True):
            theirs = oc.ClipLoss(local_loss, gwg, False, rank, world)
            for b in (None, bias):
                want = _run(theirs, x, y, scale, b)
                # open_clip's arguments; rank / world size from torch.distributed; the eager formula
                for mine in (ClipLoss(local_loss, gwg, False, rank, world), ClipLoss(local_loss, gwg),
                             ClipLoss(local_loss=local_loss, gather_with_grad=gwg, fused=False)):
                    _compare(_run(mine, x, y, scale, b), want,
                             f"rank {rank} {mine!r} bias={b is not None} vs open_clip")
    # world_size=1 never gathers, as open_clip's default; gather=False neither
    want = _run(oc.ClipLoss(), x, y, scale, None)
    for mine in (ClipLoss(world_size=1), ClipLoss(gather=False)):
        _compare(_run(mine, x, y, scale, None), want, f"rank {rank} {mine!r} (local)")
    for impl in SigLipLoss.DIST_IMPLS:
        want = _run(oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl), x, y, scale, bias, siglip=True)
        for mine in (SigLipLoss(False, rank, world, impl), SigLipLoss(dist_impl=impl),
                     SigLipLoss(rank=rank, world_size=world, dist_impl=impl, fused=False)):
            _compare(_run(mine, x, y, scale, bias, siglip=True), want, f"rank {rank} {mine!r} vs open_clip")
    # a rank / world size that contradicts the process group: ValueError on every rank, before any collective
    with pytest.raises(ValueError, match=f"rank {rank} of {world}"):
        ClipLoss(rank=world - 1 - rank, world_size=world)(x, y, scale)
    with pytest.raises(ValueError, match=f"rank {rank} of {world}"):
        SigLipLoss(rank=rank, world_size=world + 1)(x, y, scale, bias)


@pytest.mark.distributed
def test_losses_on_two_gloo_ranks_match_open_clip():
    run_gloo_ranks(_dist_checks, world=2, timeout=120)


# ---------------------------------------------------------------- EMA vs timm's ModelEmaV3
_MODELS = {}


def _timm_model(dtype=torch.float32):
    """timm's ``test_resnet`` (0.47 M parameters, BatchNorm buffers), random weights, a fresh copy per call."""
    if not _MODELS:
        torch.manual_seed(0)
        _MODELS["base"] = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    return copy.deepcopy(_MODELS["base"]).to(dtype)


def _train_step(model, scale=1e-2):
    """Move the weights and the BatchNorm statistics (a train-mode forward), as a training step would."""
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16, dtype=next(model.parameters()).dtype))
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _same_state(ours, theirs, dtype=torch.float32, exact=False):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # timm's keys (module.*), in its order
    for k in a:
        if exact or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            assert_close(a[k].to(b[k].dtype), b[k], dtype, msg=k)


@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_ema_matches_model_ema_v3_with_warmup(exclude_buffers, count_calls):
    model = _timm_model()
    theirs = ModelEmaV3(model, 0.995, 0.3, 2, True, 1.0, 0.75, exclude_buffers=exclude_buffers)
    ours = EMA(model, 0.995, 0.3, 2, True, 1.0, 0.75, exclude_buffers=exclude_buffers)  # timm's positional order
    assert ours.include_buffers is not exclude_buffers and ours.warmup and ours.use_warmup
    op, loop = count_calls(vema, "ema_update_"), count_calls(vema, "model_ema_update_")
    for step in range(5):
        _train_step(model)
        assert ours.get_decay(step) == theirs.get_decay(step)
        theirs.update(model, step)
        ours.update(model, step)
    assert (len(op), len(loop)) == (5, 0)  # one fused pass per update
    _same_state(ours, theirs)
    if exclude_buffers:  # buffers copied, not averaged
        assert torch.equal(ours.module.bn1.running_mean, model.bn1.running_mean)
    else:
        assert not torch.equal(ours.module.bn1.running_mean, model.bn1.running_mean)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(ours(x), ours.module(x))  # forward runs the averaged module
    assert_close(ours(x), theirs(x))
    # the eager loop and the Triton kernel (interpreter) give the same averages
    for kw in (dict(fused=False),) + ((dict(backend="triton"),) if exclude_buffers else ()):
        other = EMA(model, 0.9, exclude_buffers=exclude_buffers, **kw)
        ref = ModelEmaV3(model, 0.9, exclude_buffers=exclude_buffers)
        _train_step(model)
        other.update(model)
        ref.update(model)
        _same_state(other, ref)


def test_ema_state_dicts_load_both_ways():
    for dtype in (torch.float32, torch.bfloat16):
        model = _timm_model(dtype)
        ours, theirs = EMA(model, 0.9), ModelEmaV3(model, 0.9)
        for step in range(3):
            _train_step(model)
            ours.update(model, step)
            theirs.update(model, step)
        sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
        assert list(sd_ours) == list(sd_theirs)
        # ours -> timm (into its model-dtype module: cast), timm -> ours (strict)
        into_timm = ModelEmaV3(_timm_model(dtype), 0.9)
        into_timm.load_state_dict(sd_ours)
        for k, v in into_timm.state_dict().items():
            assert torch.equal(v, sd_ours[k].to(v.dtype)), k
        into_ours = EMA(_timm_model(dtype), 0.9)
        into_ours.load_state_dict(sd_theirs)
        for k, v in into_ours.state_dict().items():
            assert torch.equal(v, sd_theirs[k].to(v.dtype)), k
        assert all(p.dtype == dtype for p in into_ours.module.parameters())
        # and ours -> ours keeps the float32 averages exactly, also with assign=True
        for assign in (False, True):
            again = EMA(_timm_model(dtype), 0.9)
            again.load_state_dict(sd_ours, assign=assign)
            assert all(torch.equal(v, sd_ours[k]) for k, v in again.state_dict().items())
            assert all(p.dtype == dtype for p in again.module.parameters())
            _train_step(model)
            again.update(model)  # still one pass over the re-homed buffers


def test_ema_of_bf16_model_takes_its_inputs_and_averages_in_fp32():
    model = _timm_model(torch.bfloat16)
    ours = EMA(model, 0.999)  # vlfast's default dtype="auto": float32 averages, a bf16 module
    timm_bf16 = ModelEmaV3(model, 0.999)  # timm's default: bf16 averages, stochastic rounding
    timm_fp32 = ModelEmaV3(model, 0.999, dtype=torch.float32)  # timm's float32 average (a float32 module)
    for _ in range(5):
        _train_step(model, scale=1e-3)  # updates of 1e-6: below bf16 resolution
        for e in (ours, timm_bf16, timm_fp32):
            e.update(model)
    assert all(p.dtype == torch.bfloat16 for p in ours.module.parameters())
    # the averages are float32, and the float32 average of timm
    _same_state(ours, timm_fp32)
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    out, out_timm = ours(x), timm_bf16(x)  # the model's own bf16 inputs
    assert out.dtype == out_timm.dtype == model(x).dtype == torch.bfloat16
    ref = timm_fp32(x.float())
    assert_close(out, ref.to(out.dtype), torch.bfloat16)
    assert_close(out_timm, ref.to(out.dtype), torch.bfloat16)
    # its module is the rounding of the float32 average
    for n, p in ours.module.named_parameters():
        assert torch.equal(p, ours.state_dict()["module." + n].to(torch.bfloat16)), n
    # timm's meaning of an explicit dtype: the module in that dtype
    explicit = EMA(model, 0.999, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in explicit.module.parameters())
    assert explicit(x.float()).dtype == torch.float32


@pytest.mark.parametrize("foreach", [True, False])
def test_ema_dtype_none_reproduces_timms_stochastic_rounding(foreach):
    model = _timm_model(torch.bfloat16)
    ours = EMA(model, 0.99, dtype=None, foreach=foreach, stochastic_rounding_seed=3)
    theirs = ModelEmaV3(model, 0.99, foreach=foreach, stochastic_rounding_seed=3)
    assert all(p.dtype == torch.bfloat16 for p in ours._averaged())
    for _ in range(3):
        _train_step(model)
        ours.update(model)
        theirs.update(model)
    _same_state(ours, theirs, exact=True)
    # without stochastic rounding: round to nearest once per update (timm: lerp_ in bf16)
    ours = EMA(model, 0.99, dtype=None, stochastic_rounding=False)
    theirs = ModelEmaV3(model, 0.99, stochastic_rounding=False)
    _train_step(model)
    ours.update(model)
    theirs.update(model)
    _same_state(ours, theirs, torch.bfloat16)


def test_ema_arguments():
    model = _timm_model()
    ema = EMA(model, 0.9, warmup=True, include_buffers=False)  # today's vlfast keywords
    assert ema.use_warmup and ema.exclude_buffers and ema.foreach and ema.stochastic_rounding
    assert isinstance(ema.module, type(model)) and not ema.module.training
    with pytest.raises(ValueError, match="warmup=False contradicts use_warmup=True"):
        EMA(model, use_warmup=True, warmup=False)
    with pytest.raises(ValueError, match="include_buffers=True contradicts exclude_buffers=True"):
        EMA(model, exclude_buffers=True, include_buffers=True)
    with pytest.raises(TypeError, match="dtype"):
        EMA(model, dtype="float32")
    with pytest.raises(TypeError, match="foreach"):
        EMA(model, foreach=None)
    with pytest.raises(ValueError, match="min_decay"):
        EMA(model, min_decay=1.5)
    with pytest.raises(ValueError, match="update_after_step"):
        EMA(model, update_after_step=-1)
    # timm's set(): the EMA becomes the model
    _train_step(model)
    ema.set(model)
    assert all(torch.equal(v, model.state_dict()[k[len("module."):]]) for k, v in ema.state_dict().items())
    # a copy (timm users deep-copy EMAs) works and updates on its own
    twin = copy.deepcopy(ema)
    _train_step(model)
    twin.update(model)
    assert not torch.equal(twin.module.fc.weight, ema.module.fc.weight)
