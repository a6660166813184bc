"""DeepSpeed integration (vlfast.distributed.zero): config builder, shard-local momentum updates.

The ZeRO-3 tests run 2 CPU ranks (gloo, ``DS_ACCELERATOR=cpu``) as subprocesses; the first
DeepSpeed init on a machine JIT-builds its small shm comm op with ninja (about a minute, cached).
"""

import os
import subprocess
import sys
import textwrap

import deepspeed  # noqa: F401  (installed by the Makefile: a missing or broken one fails, never skips)
import pytest
import torch

from vlfast.distributed.zero import (ZeroMomentum, attach_zero_momentum, deepspeed_config,
                                     zero3_momentum_update_)
from vlfast.testing import fake_zero3_param, free_port


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_config_valid(stage, precision):
    cfg = deepspeed_config(stage, precision, batch_size=4, grad_accum=2, world_size=3, device="cpu")
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["bf16"]["enabled"] == (precision == "bf16") and not cfg["fp16"]["enabled"]
    assert ("stage3_param_persistence_threshold" in cfg["zero_optimization"]) == (stage == 3)


def test_config_fp16_on_gpu():
    cfg = deepspeed_config(2, "fp16", batch_size=2, world_size=1, device="cuda")
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(zero_stage=4), "zero_stage"),
    (dict(zero_stage=-1), "zero_stage"),
    (dict(precision="fp8"), "precision"),
    (dict(precision="fp16", device="cpu"), "fp16.*CPU"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-3), "batch_size"),
    (dict(batch_size=None), "batch_size"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(world_size=0), "world_size"),
    (dict(user_config={"train_batch_size": 7}), "inconsistent"),
    (dict(user_config={"train_micro_batch_size_per_gpu": 0}), "train_micro_batch_size_per_gpu"),
    (dict(user_config={"zero_optimization": {"stage": 2}}), "stage"),
    (dict(user_config={"fp16": {"enabled": True}, "bf16": {"enabled": True}}), "both"),
    (dict(user_config={"bf16": {"enabled": True}}), "precision"),
])
def test_config_invalid(kwargs, match):
    args = dict(zero_stage=3, precision="fp32", batch_size=4, world_size=2, device="cpu")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        deepspeed_config(**args)


def test_config_user_override(tmp_path):
    user = {"optimizer": {"params": {"lr": 3e-3}}, "zero_optimization": {"stage3_param_persistence_threshold": 16,
                                                                          "stage": "auto"},
            "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    cfg = deepspeed_config(3, batch_size=4, grad_accum=2, world_size=2, user_config=user, device="cpu")
    assert cfg["optimizer"]["params"]["lr"] == 3e-3
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.05  # merged, not replaced
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 16
    assert cfg["zero_optimization"]["stage"] == 3
    path = tmp_path / "ds.json"
    import json
    path.write_text(json.dumps({"gradient_clipping": 1.0}))
    cfg = deepspeed_config(1, batch_size=2, world_size=1, user_config=str(path), device="cpu")
    assert cfg["gradient_clipping"] == 1.0


# --------------------------------------------------------------------------- bf16 master (no process group)



@pytest.mark.parametrize("zero3", [False, True])
def test_bf16_master_keeps_small_updates(zero3):
    torch.manual_seed(0)
    base = torch.ones(37)
    online = base + 1e-2  # (1 - m) * 1e-2 = 1e-4 per step, far below bf16's spacing at 1.0 (2**-7)
    m, steps = 0.99, 100
    if zero3:
        mom = [fake_zero3_param(base, 1, 2, torch.bfloat16)]
        onl = [fake_zero3_param(online, 1, 2, torch.bfloat16)]
        local = lambda p: p.ds_tensor  # noqa: E731
    else:
        mom = [torch.nn.Parameter(base.bfloat16(), requires_grad=False)]
        onl = [torch.nn.Parameter(online.bfloat16(), requires_grad=False)]
        local = lambda p: p.data  # noqa: E731
    no_master = local(mom[0]).clone()
    master = None
    for _ in range(steps):
        master = zero3_momentum_update_(mom, onl, m, master=master)
        no_master.copy_((m * no_master.float() + (1 - m) * local(onl[0]).float()).bfloat16())
    assert torch.equal(no_master[:5], torch.ones(5, dtype=torch.bfloat16))  # bf16 alone loses every update
    expect = 1 + (online[0].bfloat16().float() - 1) * (1 - m ** steps)
    valid = local(mom[0])[:5].float()
    assert master[0].dtype == torch.float32
    torch.testing.assert_close(master[0][:5], expect.expand(5), atol=1e-6, rtol=0)
    assert (valid > 1).all()  # the accumulated ~5e-3 passes half of bf16 spacing (3.9e-3)


def test_plain_params_fp32_and_attach():
    from vlfast.nn import MomentumEncoder

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual_encoder = torch.nn.Linear(4, 3)
            self.visual_encoder_m = MomentumEncoder(self.visual_encoder, 0.9)
            self.base_encoder = torch.nn.Linear(5, 2)
            self.momentum_encoder = MomentumEncoder(self.base_encoder, 0.9)

    net = Net()
    with torch.no_grad():
        for p in net.visual_encoder.parameters():
            p.add_(1.0)
    zms = attach_zero_momentum(net)
    assert len(zms) == 2 and zms[0].online_module is net.visual_encoder
    assert zms[1].online_module is net.base_encoder
    before = net.visual_encoder_m.module.weight.clone()
    zms[0].update(0.9)
    torch.testing.assert_close(net.visual_encoder_m.module.weight, 0.9 * before + 0.1 * net.visual_encoder.weight)
    state = zms[0].state_dict()
    zm = ZeroMomentum(net.visual_encoder_m.module, net.visual_encoder)
    zm.load_state_dict(state)
    assert zm.master == [None, None]  # fp32: no master needed


# --------------------------------------------------------------------------- ZeRO-3 on 2 ranks

WORKER = textwrap.dedent(r'''
    import copy, os, sys, torch, deepspeed
    from vlfast.distributed.zero import (ZeroMomentum, deepspeed_config, gathered_momentum_update_,
                                         zero3_momentum_update_)
    out_path = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

    class W(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.online = online
            self.mom = copy.deepcopy(online).requires_grad_(False)
            self.mom2 = copy.deepcopy(online).requires_grad_(False)

        def forward(self, x):
            with torch.no_grad():  # like MoCo: the momentum encoders run too (persistent params get resident)
                self.mom(x); self.mom2(x)
            return self.online(x)

    init = {k: v.clone() for k, v in online.state_dict().items()}
    ref = copy.deepcopy(online)  # unpartitioned single-process reference, same init
    lr, wd, m, steps, mb = 1e-2, 0.05, 0.9, 5, 4
    cfg = deepspeed_config(3, "fp32", batch_size=mb, world_size=world, lr=lr, weight_decay=wd,
                           user_config={"zero_optimization": {"stage3_param_persistence_threshold": 16}})
    model = W()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.online.parameters()), config=cfg)
    mods = engine.module
    assert all(hasattr(p, "ds_tensor") for p in mods.parameters())
    persist = [getattr(p, "ds_persist", False) for p in mods.mom.parameters()]
    zm = ZeroMomentum(mods.mom, mods.online)
    from vlfast.distributed import ZeroEMA, make_ema
    from vlfast.nn import EMA
    ema = make_ema(mods.online, decay=0.8, warmup=True)  # partitioned model: a shard-local ZeroEMA
    assert isinstance(ema, ZeroEMA) and all(t.numel() < 64 * 32 for t in ema._avg)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(mb * world, 32, generator=g) for _ in range(steps)]
    for step, x in enumerate(data, 1):
        loss = engine(x[rank * mb:(rank + 1) * mb]).pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(mods.online, step)
        zm.update(m)
        gathered_momentum_update_(list(mods.mom2.parameters()), list(mods.online.parameters()), m)
    res = {"persist": persist, "ema": ema.state_dict()}  # collective: full tensors on every rank
    ema2 = make_ema(mods.online, decay=0.8)
    ema2.load_state_dict(res["ema"])
    res["ema_roundtrip"] = ema2.state_dict()
    for name in ("mom", "mom2", "online"):
        ps = list(getattr(mods, name).parameters())
        with deepspeed.zero.GatheredParameters(ps):
            res[name] = [p.data.clone() for p in ps]
    if rank == 0:
        momr = [p.detach().clone() for p in ref.parameters()]
        ref_ema = EMA(ref, decay=0.8, warmup=True)
        opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
        for step, x in enumerate(data, 1):
            opt.zero_grad(); ref(x).pow(2).mean().backward(); opt.step()
            ref_ema.update(ref, step)
            with torch.no_grad():
                for a, b in zip(momr, ref.parameters()):
                    a.mul_(m).add_(b, alpha=1 - m)
        res["ref_online"] = [p.detach().clone() for p in ref.parameters()]
        res["ref_mom"] = momr
        res["ref_ema"] = ref_ema.state_dict()
        res["init"] = [init[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias")]
        torch.save(res, out_path)
    # leave together and skip C++ destructors: a rank exiting while gloo/shm threads of the other
    # are still up can abort with "terminate called without an active exception"
    torch.distributed.barrier()
    from vlfast.distributed.zero import remove_cpu_shm_segments
    remove_cpu_shm_segments(os.environ["MASTER_PORT"], [rank])  # DeepSpeed leaves it in /dev/shm
    torch.distributed.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
''')


def _run_ranks(tmp_path, world=2, timeout=110):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.pt"
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(tmp_path / f"rank{rank}.log", "w+")
        procs.append((subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    failed = []
    try:
        for rank, (p, _) in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                failed.append(rank)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        logs = []
        for rank, (_, log) in enumerate(procs):
            log.seek(0)
            logs.append(f"--- rank {rank} ---\n" + log.read()[-4000:])
        pytest.fail(f"ranks {failed} failed:\n" + "\n".join(logs))
    for _, log in procs:
        log.close()
    return torch.load(out)


@pytest.mark.distributed
def test_zero3_momentum_two_ranks(tmp_path):
    res = _run_ranks(tmp_path)
    assert res["persist"] == [False, False, False, True]  # only the 8-element bias is below the threshold 16
    for a, b in zip(res["online"], res["ref_online"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b, i in zip(res["mom"], res["ref_mom"], res["init"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert (a - i).abs().max() > 1e-3  # the update is not lost
    for a, b in zip(res["mom"], res["mom2"]):  # shard-local == gathered baseline
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # ZeroEMA (shard-local) == nn.EMA of the single-process run, same state-dict keys; and it moved
    assert set(res["ema"]) == set(res["ref_ema"]) == {f"module.{k}" for k in ("0.weight", "0.bias", "2.weight",
                                                                            "2.bias")}
    for k, v in res["ref_ema"].items():
        torch.testing.assert_close(res["ema"][k], v, atol=1e-5, rtol=1e-4)
        assert torch.equal(res["ema_roundtrip"][k], res["ema"][k])
    moved = [(res["ema"][f"module.{k}"] - i).abs().max() for k, i in zip(("0.weight", "0.bias", "2.weight", "2.bias"),
                                                                          res["init"])]
    assert min(moved) > 1e-3, moved


# --------------------------------------------------------------------------- external parameters

def test_register_external_parameters():
    import vlfast.models as M
    from vlfast.distributed.zero import register_external_parameters

    model = M.create("albef_micro")
    assert register_external_parameters(model) == 1  # ALBEF's ITM reads itc.temp outside the ITC's forward
    assert any(p is model.itc.temp for p in model._external_params.values())

    class Bad(torch.nn.Module):
        def zero3_external_parameters(self):
            return [(self, torch.zeros(1))]  # not a Parameter

    with pytest.raises(TypeError, match="nn.Parameter"):
        register_external_parameters(Bad())


# --------------------------------------------------------------------------- exports, ZeroEMA on 2 ranks

def test_distributed_reexports():
    import vlfast.distributed as D
    import vlfast.distributed.zero as Z
    import vlfast.distributed.zero_ema as ZE
    import vlfast.sharding as S
    from vlfast.nn import EMA

    assert D.register_external_parameters is Z.register_external_parameters
    assert D.remove_cpu_shm_segments is Z.remove_cpu_shm_segments
    assert D.zero3_momentum_update_ is S.zero3_momentum_update_ is Z.zero3_momentum_update_
    assert D.ZeroEMA is ZE.ZeroEMA and D.make_ema is ZE.make_ema
    assert {"register_external_parameters", "remove_cpu_shm_segments", "ZeroEMA", "make_ema"} <= set(D.__all__)
    assert "vlfast.distributed.make_ema" in EMA.__doc__


WORKER_EMA = textwrap.dedent(r'''
    import os, sys, torch, deepspeed
    from vlfast.distributed.zero import deepspeed_config
    from vlfast.distributed import ZeroEMA, make_ema
    out_path = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    net.register_buffer("scratch", torch.zeros(3), persistent=False)
    cfg = deepspeed_config(3, "fp32", batch_size=4, world_size=world, lr=1e-2,
                           user_config={"zero_optimization": {"stage3_param_persistence_threshold": 16}})
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=cfg)
    model = engine.module
    ema = make_ema(model, decay=0.5)
    assert isinstance(ema, ZeroEMA)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4 * world, 32, generator=g) for _ in range(4)]

    def step(x):
        engine.backward(engine(x[rank * 4:(rank + 1) * 4]).pow(2).mean())
        engine.step()

    for i, x in enumerate(xs[:3], 1):
        step(x)
        ema.update(model, i)

    class Wrap(torch.nn.Module):
        def __init__(self, e):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.ema = e

    nested = Wrap(ema).state_dict()  # collective
    full = ema.full_state_dict()  # collective; tensors on rank 0 only, on the CPU
    if rank != 0:
        assert full == {}, list(full)
    ema2 = make_ema(model, decay=0.5)
    Wrap(ema2).load_state_dict(nested)
    roundtrip = ema2.state_dict()
    ps = list(model.parameters())

    def gathered():
        with deepspeed.zero.GatheredParameters(ps):
            return [p.data.clone() for p in ps]

    before = gathered()
    x = xs[0][rank * 4:(rank + 1) * 4]
    with torch.no_grad():
        out_train = engine(x)
        with ema.swapped_into(model):
            out_ema = engine(x)
            out_ema2 = engine(x)  # resident / prefetched copies hold the average too
        out_after = engine(x)
    after = gathered()
    step(xs[3])  # training goes on from the restored weights
    res = dict(nested=nested, full=full, roundtrip=roundtrip, before=before, after=after, x=x,
               out_train=out_train, out_ema=out_ema, out_ema2=out_ema2, out_after=out_after,
               trained=gathered())
    if rank == 0:
        torch.save(res, out_path)
    torch.distributed.barrier()
    from vlfast.distributed.zero import remove_cpu_shm_segments
    remove_cpu_shm_segments(os.environ["MASTER_PORT"], [rank])
    torch.distributed.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
''')


@pytest.mark.distributed
def test_zero3_ema_state_dict_and_swap_two_ranks(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "WORKER", WORKER_EMA)
    res = _run_ranks(tmp_path)
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    assert set(res["nested"]) == {"lin.weight", "lin.bias"} | {f"ema.module.{k}" for k in names}  # no "scratch"
    assert list(res["full"]) == [f"module.{k}" for k in names]
    for k in names:
        v = res["nested"][f"ema.module.{k}"]
        assert res["full"][f"module.{k}"].device.type == "cpu"
        assert torch.equal(res["full"][f"module.{k}"], v) and torch.equal(res["roundtrip"][f"module.{k}"], v)
    for a, b in zip(res["after"], res["before"]):
        assert torch.equal(a, b)  # the training weights are back, exactly
    assert torch.equal(res["out_after"], res["out_train"])
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    ref.load_state_dict({k: res["full"][f"module.{k}"] for k in names})
    with torch.no_grad():
        want = ref(res["x"])
    torch.testing.assert_close(res["out_ema"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["out_ema2"], want, atol=1e-5, rtol=1e-5)
    assert (res["out_ema"] - res["out_train"]).abs().max() > 1e-3
    assert any((a - b).abs().max() > 0 for a, b in zip(res["trained"], res["after"]))
