"""``vlfast train --zero``: DeepSpeed engine on 2 CPU ranks (``--nproc 2``) vs the single-process run,
ZeRO-3 momentum encoders (shard-local update), bad input."""

import json
import os

import deepspeed  # noqa: F401  (installed by the Makefile: a missing or broken one fails, never skips)
import pytest
import torch

from vlfast.testing import fake_zero3_param

from _train_run import _losses, _run, kill_and_resume  # shared with the FSDP2 tests


# --------------------------------------------------------------------------- MomentumEncoder on ZeRO-3 shards



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_momentum_encoder_updates_zero3_shards(dtype):
    from vlfast.nn import MomentumEncoder

    online = torch.nn.Linear(5, 3)
    enc = MomentumEncoder(online, 0.9)
    base = {n: p.detach().clone() for n, p in enc.module.named_parameters()}
    target = {n: p.detach() + 1.0 for n, p in online.named_parameters()}
    # partition both networks as ZeRO-3 would (rank 1 of 2)
    for mod, src in ((enc.module, base), (online, target)):
        for n, _ in list(mod.named_parameters()):
            mod._parameters[n] = fake_zero3_param(src[n], 1, 2, dtype)
    for _ in range(3):
        enc.update(online)
    assert enc._zero_master is not None and "_zero_master" not in enc.state_dict()
    for n, p in enc.module.named_parameters():
        assert p.data.numel() == 0  # no gather happened
        full = base[n].reshape(-1)
        size = p.ds_tensor.numel()
        mine = torch.zeros(size)
        n_valid = max(0, min(size, full.numel() - size))
        mine[:n_valid] = full[size:size + n_valid]
        tgt = torch.zeros(size)
        tgt[:n_valid] = target[n].reshape(-1)[size:size + n_valid]
        if dtype == torch.bfloat16:
            mine, tgt = mine.bfloat16().float(), tgt.bfloat16().float()
        expect = 0.9 ** 3 * mine + (1 - 0.9 ** 3) * tgt
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(p.ds_tensor.float(), expect, atol=tol, rtol=0)
        if n_valid:
            assert (p.ds_tensor.float()[:n_valid] - mine[:n_valid]).abs().max() > 0.1  # update not lost


def test_momentum_encoder_plain_unchanged():
    from vlfast.nn import MomentumEncoder

    online = torch.nn.Linear(4, 2)
    enc = MomentumEncoder(online, 0.5)
    before = enc.module.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    enc.update(online)
    torch.testing.assert_close(enc.module.weight, 0.5 * before + 0.5 * online.weight)
    assert "_zero_master" not in enc.__dict__


# --------------------------------------------------------------------------- 2 ranks vs 1 process

def _no_key_bias(name, t):
    """``t`` without the key third of a fused qkv bias: softmax is invariant to the key bias, so its
    exact gradient is 0 and Adam turns the rounding noise there into lr-sized, run-dependent steps."""
    t = t.double()
    if name.endswith(("in_proj_bias", "qkv.bias")):
        third = t.numel() // 3
        t = torch.cat([t[:third], t[2 * third:]])
    return t


def _rel_diff(a, b, init):
    """(|a - b|, |a - init|) over the float tensors of two state dicts (init: the start)."""
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(((_no_key_bias(k, a[k]) - _no_key_bias(k, b[k])) ** 2).sum() for k in keys).sqrt().item()
    moved = sum(((_no_key_bias(k, a[k]) - _no_key_bias(k, init[k])) ** 2).sum() for k in keys).sqrt().item()
    return diff, moved


@pytest.mark.distributed
@pytest.mark.parametrize("model", ["clip_micro", "albef_micro"])
def test_zero_stages_match_single_process(tmp_path, model):
    """5 steps on 2 ranks under ZeRO 0, 1, 2 and 3 == one process on the same global batch: per-step
    losses, and (ZeRO-3, shard-local updates) the momentum encoders' and the EMA's weights."""
    import vlfast.models as M
    from vlfast.training.trainer import _seed_all

    common = ("--model", model, "--steps", "5", "--batch-size", "8", "--lr", "1e-3", "--ema", "0.9")
    runs = {"single": ()}
    runs.update({f"zero{z}": ("--nproc", "2", "--zero", str(z)) for z in (0, 1, 2, 3)})
    if model == "albef_micro":
        # ZeRO-3 tuned for memory: nothing persistent or kept, small prefetch buckets; the momentum
        # parameters are being prefetched when the forward starts (the update must come first)
        cfg = tmp_path / "prefetch.json"
        cfg.write_text(json.dumps({"zero_optimization": {
            "stage": "auto", "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
            "stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 2000}}))
        runs["zero3_prefetch"] = ("--nproc", "2", "--zero", "3", "--deepspeed-config", str(cfg))
    losses = {}
    for name, extra in runs.items():
        out = str(tmp_path / name)
        r = _run(*common, "--out", out, *extra)
        assert r.returncode == 0, f"{name}:\n{r.stderr[-4000:]}"
        losses[name] = _losses(out)
        assert len(losses[name]) == 5
        root = os.path.join(out, "checkpoints")
        with open(os.path.join(root, "latest")) as f:
            assert f.read().strip() == "step_5"
        assert not [n for n in os.listdir(root) if n.startswith(".tmp")]
        assert os.path.isfile(os.path.join(root, "step_5", "model.pt"))
    ref = torch.tensor(losses["single"], dtype=torch.float64)
    for name in runs:
        got = torch.tensor(losses[name], dtype=torch.float64)
        assert ((got - ref).abs() / ref.abs()).max() < 1e-4, (name, losses[name], losses["single"])

    def load(name, file):
        return torch.load(os.path.join(tmp_path, name, "checkpoints", "step_5", file), map_location="cpu")

    _seed_all(0)
    init = M.create(model).state_dict()
    # Adam turns rounding differences of (near-)zero gradients -- e.g. attention key biases -- into
    # lr-sized steps, so the weights are compared relative to how far they moved from the start
    single_ema, z3_ema = load("single", "ema.pt"), load("zero3", "ema.pt")
    assert set(single_ema) == set(z3_ema) == {"module." + k for k in init}
    ema_init = {"module." + k: v for k, v in init.items()}
    diff, moved = _rel_diff(z3_ema, single_ema, ema_init)
    assert moved > 1e-2 and diff < 1e-3 * moved, ("EMA", diff, moved)
    diff, _ = _rel_diff(z3_ema, load("zero0", "ema.pt"), ema_init)  # shard-local == replicated
    assert diff < 1e-5 * moved, ("EMA ZeRO-3 vs ZeRO-0", diff, moved)
    if model == "albef_micro":
        single_w, z3_w = load("single", "model.pt"), load("zero3", "model.pt")
        momentum = [k for k in init if "_m." in k]
        assert len(momentum) > 50
        diff, moved = _rel_diff({k: z3_w[k] for k in momentum}, single_w, init)
        assert moved > 1e-3 and diff < 1e-3 * moved, ("momentum encoders", diff, moved)


def _momentum_weights(path):
    import vlfast.models as M

    model = M.create("moco_v3_micro")
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return {n: p.detach().clone() for n, p in model.momentum_encoder.named_parameters()}


@pytest.mark.distributed
def test_moco_zero3_momentum_matches_replicated(tmp_path):
    """ZeRO-3's shard-local momentum update == the replicated (ZeRO-0) one on the same 2 ranks
    (MoCo's BatchNorm heads use per-rank batch statistics, so both differ from one process)."""
    import vlfast.models as M
    from vlfast.training.trainer import _seed_all

    common = ("--model", "moco_v3_micro", "--steps", "5", "--batch-size", "8", "--nproc", "2", "--lr", "1e-2")
    weights = {}
    for stage in ("0", "3"):
        out = str(tmp_path / f"z{stage}")
        r = _run(*common, "--zero", stage, "--out", out)
        assert r.returncode == 0, r.stderr[-4000:]
        weights[stage] = _momentum_weights(os.path.join(out, "checkpoints", "step_5", "model.pt"))
    _seed_all(0)
    init = {n: p.detach().clone() for n, p in M.create("moco_v3_micro").momentum_encoder.named_parameters()}
    # Adam at lr 1e-2 turns rounding differences of near-zero gradients into ~lr-sized steps of the
    # online weights, so compare the momentum weights relative to how far they moved
    w3 = torch.cat([w.reshape(-1) for w in weights["3"].values()])
    w0 = torch.cat([weights["0"][n].reshape(-1) for n in weights["3"]])
    w_init = torch.cat([init[n].reshape(-1) for n in weights["3"]])
    moved3, moved0 = (w3 - w_init).norm().item(), (w0 - w_init).norm().item()
    assert moved3 > 1e-3  # the ZeRO-3 momentum update is not lost
    assert abs(moved3 - moved0) < 0.02 * moved0
    assert (w3 - w0).norm().item() < 0.02 * moved0, ((w3 - w0).norm().item(), moved0)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,match", [
    (("--zero", "4"), "invalid ZeRO stage"),
    pytest.param(("--zero", "x"), "invalid ZeRO stage", marks=pytest.mark.slow),  # each case: a process, ~4 s
    pytest.param(("--nproc", "2"), "needs --zero", marks=pytest.mark.slow),
    pytest.param(("--nproc", "3", "--zero", "1"), "not divisible", marks=pytest.mark.slow),
    pytest.param(("--deepspeed-config", "ds.json"), "needs --zero", marks=pytest.mark.slow),
])
def test_bad_zero_args(tmp_path, args, match):
    r = _run("--model", "clip_micro", "--steps", "1", "--batch-size", "8", "--out", str(tmp_path / "o"), *args,
             timeout=60)
    assert r.returncode == 2
    assert match in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if "error:" in x]) == 1


@pytest.mark.distributed
def test_zero3_resume_matches_uninterrupted(tmp_path):
    out = str(tmp_path / "r")
    common = ("--model", "clip_micro", "--batch-size", "8", "--nproc", "2", "--zero", "3", "--out", out)
    r = _run(*common, "--steps", "3")
    assert r.returncode == 0, r.stderr[-4000:]
    ref = _losses(out)
    r = _run(*common, "--steps", "5", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr
    losses = _losses(out)
    assert len(losses) == 5 and losses[:3] == ref
    single = str(tmp_path / "single")
    r = _run("--model", "clip_micro", "--batch-size", "8", "--steps", "5", "--out", single)
    assert r.returncode == 0, r.stderr[-4000:]
    ref5 = torch.tensor(_losses(single), dtype=torch.float64)
    got = torch.tensor(losses, dtype=torch.float64)
    assert ((got - ref5).abs() / ref5.abs()).max() < 1e-4


# --------------------------------------------------------------------------- bf16 under ZeRO

def _full_masters(ckpt, model):
    """``{param name: fp32 master}`` of the momentum encoders, rebuilt from the per-rank files
    (ZeRO-3: each rank's flat shard, or the full tensor of a persistent parameter)."""
    import vlfast.models as M

    net = M.create(model)
    files = sorted(f for f in os.listdir(ckpt) if f.startswith("momentum_masters_rank"))
    per_rank = [torch.load(os.path.join(ckpt, f), map_location="cpu") for f in files]
    out = {}
    for enc_name in per_rank[0]:
        for i, (pname, p) in enumerate(net.get_submodule(enc_name).module.named_parameters()):
            parts = [r[enc_name][i] for r in per_rank]
            assert all(t is not None and t.dtype == torch.float32 for t in parts)
            full = parts[0] if parts[0].numel() == p.numel() else torch.cat([t.reshape(-1) for t in parts])
            out[f"{enc_name}.module.{pname}"] = full.reshape(-1)[:p.numel()].reshape(p.shape)
    return out


@pytest.mark.distributed
def test_bf16_zero3_momentum_masters(tmp_path):
    """bf16 weights under ZeRO-3: losses track the single-process bf16-autocast run, and the momentum
    encoders' fp32 master shards (saved per rank) carry the update that bf16 weights would round away
    (m = 0.995: each step moves a weight by far less than half a bf16 ulp)."""
    import vlfast.models as M
    from vlfast.training.trainer import _seed_all

    common = ("--model", "albef_micro", "--steps", "5", "--batch-size", "8", "--lr", "1e-3", "--precision", "bf16")
    losses = {}
    for name, extra in {"single": (), "zero3": ("--nproc", "2", "--zero", "3")}.items():
        r = _run(*common, "--out", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr[-4000:]
        losses[name] = torch.tensor(_losses(str(tmp_path / name)), dtype=torch.float64)
    assert torch.isfinite(losses["zero3"]).all()
    # bf16 weights (DeepSpeed) vs fp32 weights under autocast (one process): close, not equal
    assert ((losses["zero3"] - losses["single"]).abs() / losses["single"]).max() < 5e-2, losses
    ckpt = tmp_path / "zero3" / "checkpoints" / "step_5"
    masters = _full_masters(str(ckpt), "albef_micro")
    assert len(masters) > 50
    _seed_all(0)
    init = M.create("albef_micro").state_dict()
    single = torch.load(tmp_path / "single" / "checkpoints" / "step_5" / "model.pt", map_location="cpu")
    # the masters start from the bf16-rounded weights; their update tracks the fp32 one of one process
    d_zero = torch.cat([(masters[k] - init[k].bfloat16().float()).reshape(-1) for k in masters]).double()
    d_single = torch.cat([(single[k] - init[k]).reshape(-1) for k in masters]).double()
    assert d_single.norm() > 1e-2
    assert (d_zero - d_single).norm() < 0.25 * d_single.norm(), ((d_zero - d_single).norm(), d_single.norm())


@pytest.mark.distributed
def test_bf16_zero3_resume_matches_uninterrupted(tmp_path):
    """Resume restores the per-rank fp32 momentum masters (and DeepSpeed's bf16 optimizer state)."""
    common = ("--model", "albef_micro", "--batch-size", "8", "--precision", "bf16", "--lr", "1e-3", "--nproc", "2",
              "--zero", "3", "--ema", "0.9")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r = _run(*common, "--steps", "5", "--out", full)
    assert r.returncode == 0, r.stderr[-4000:]
    r = _run(*common, "--steps", "3", "--out", part)
    assert r.returncode == 0, r.stderr[-4000:]
    assert os.path.isfile(os.path.join(part, "checkpoints", "step_3", "momentum_masters_rank1.pt"))
    r = _run(*common, "--steps", "5", "--out", part, "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert _losses(part) == _losses(full)
    ema = [torch.load(os.path.join(o, "checkpoints", "step_5", "ema.pt"), map_location="cpu") for o in (full, part)]
    assert set(ema[0]) == set(ema[1]) and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])  # ZeroEMA too


# --------------------------------------------------------------------------- real data on 2 ranks

@pytest.mark.distributed
def test_csv_data_two_ranks_match_single_process(tmp_path):
    """Each rank decodes only its rows; bad images found by either rank are skipped by both, so the
    batches (and the skipped count and data position at every step) equal one process's."""
    from test_train_cli import _png

    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for i in range(9):
        _png(d / f"img{i}.png", (25 * i, 255 - 25 * i, (60 * i) % 256))
        rows.append((f"img{i}.png", f"picture {i} of {'red green blue'.split()[i % 3]}"))
    (d / "corrupt.png").write_bytes(b"not an image")
    rows.insert(2, ("corrupt.png", "broken"))  # in rank 1's half of the first batch
    rows.insert(5, ("missing.png", "gone"))    # in rank 0's half of the second batch
    with open(d / "data.csv", "w") as f:
        f.write("image,caption\n")
        f.writelines(f"{img},{cap}\n" for img, cap in rows)
    common = ("--model", "clip_micro", "--data", f"csv:{d / 'data.csv'}", "--steps", "4", "--batch-size", "4",
              "--no-shuffle", "--workers", "1")  # file order: the bad rows fall where the comments say
    recs = {}
    for name, extra in {"single": (), "zero0": ("--nproc", "2", "--zero", "0")}.items():
        out = str(tmp_path / name)
        r = _run(*common, "--out", out, *extra)
        assert r.returncode == 0, r.stderr[-4000:]
        assert r.stderr.count("skipping unreadable image") == 2, r.stderr[-4000:]  # each warned once, by one rank
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs[name] = [json.loads(line) for line in f if line.strip()]
    for a, b in zip(recs["single"], recs["zero0"], strict=True):
        assert (a["skipped_images"], a["data_position"]) == (b["skipped_images"], b["data_position"])
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"]), (a, b)
    assert recs["zero0"][-1]["skipped_images"] == 2


# --------------------------------------------------------------------------- SIGKILL on 2 ranks

@pytest.mark.distributed
def test_zero3_kill_and_resume_matches_uninterrupted(tmp_path):
    """Launcher and both ZeRO-3 ranks killed with SIGKILL once a checkpoint exists (a half-written
    checkpoint folder left as well); the resumed run logs the uninterrupted run's losses."""
    kill_and_resume(tmp_path, ("--zero", "3"), torn="deepspeed")


# --------------------------------------------------------------------------- fp32 masters follow outside writes

@pytest.mark.parametrize("zero3", [False, True])
def test_momentum_master_reseeded_after_outside_write(zero3):
    """A master must not revert momentum weights written by load_state_dict / a checkpoint load."""
    from vlfast.nn import MomentumEncoder

    online = torch.nn.Linear(4, 3).bfloat16()
    enc = MomentumEncoder(online, 0.9)
    if zero3:  # one rank: the shard is the whole (padded) tensor
        for mod in (enc.module, online):
            for n, p in list(mod.named_parameters()):
                mod._parameters[n] = fake_zero3_param(p.detach().float(), 0, 1, torch.bfloat16)

    def weight(mod):
        p = mod.weight
        return (p.ds_tensor[:p.ds_numel].view(p.ds_shape) if zero3 else p.detach()).float()

    enc.update(online)
    assert enc.master_state() is not None
    with torch.no_grad():  # an outside write: in place on the weights DeepSpeed/torch would write
        if zero3:
            enc.module.weight.ds_tensor.fill_(5.0)
        else:
            enc.module.weight.copy_(torch.full_like(enc.module.weight, 5.0))
    enc.update(online)
    expect = 0.9 * 5.0 + 0.1 * weight(online)
    torch.testing.assert_close(weight(enc.module), expect.bfloat16().float(), atol=0, rtol=0)


def test_zero3_momentum_update_refuses_zeropp_shards():
    from vlfast.distributed.zero import zero3_momentum_update_

    online = fake_zero3_param(torch.randn(6), 0, 1, torch.float32)
    mom = fake_zero3_param(torch.randn(6), 0, 1, torch.float32)
    mom.ds_secondary_tensor = torch.zeros(6)  # ZeRO++ hpZ: gathers read this, not ds_tensor
    with pytest.raises(ValueError, match="hpZ"):
        zero3_momentum_update_([mom], [online], 0.9)
    mom.ds_secondary_tensor = None
    mom.ds_tensor.ds_quant_scale = torch.ones(1)  # ZeRO++ quantized frozen weights
    with pytest.raises(ValueError, match="quantized"):
        zero3_momentum_update_([mom], [online], 0.9)
