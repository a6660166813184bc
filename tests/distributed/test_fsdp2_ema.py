"""``vlfast.nn.EMA`` and ``vlfast.nn.MomentumEncoder`` on a PyTorch FSDP2 (``fully_shard``) model, outside the
CLI, on 2 gloo CPU ranks.

The model is an online tower and its :class:`~vlfast.nn.MomentumEncoder` (MoCo's / ALBEF's shape) with odd
sizes: 13 rows split 7 / 6 over the ranks, a 1-row head whose shard on rank 1 is empty, a 0-dim parameter
that ``fully_shard`` leaves replicated, a float buffer (averaged) and an integer one (copied).  Each rank
runs the sharded model beside a one-process copy of the unsharded model and checks, at every step:

* the EMA's shards, gathered, equal the one-process ``vlfast.nn.EMA`` of the unsharded model and a float64
  formula applied to the gathered weights (fp32 rounding); the same for the momentum weights;
* bf16 parameters: the averages are fp32 masters equal to the float64 formula, not the bf16-rounded steps
  (which the same comparison rejects), and the bf16 weights are the masters' rounding;
* no collective runs during an update (``c10d`` / ``_c10d_functional`` ops counted by a dispatch mode,
  ``torch.distributed`` gathers and ``DTensor.full_tensor`` counted by wrappers; the same counter sees the
  gathers of ``full_state_dict``);
* ``state_dict`` round trips of the sharded EMA (its own shards, the gathered full tensors, into a
  one-process EMA), and ``copy_to``;
* an update while FSDP has unsharded the parameters (after ``unshard()``, inside the forward) raises the
  documented ``RuntimeError`` and writes nothing.
"""

import collections
import contextlib
import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlfast.nn import EMA, MomentumEncoder
from vlfast.testing import assert_close, run_gloo_ranks, tolerance

WORLD = 2
DECAY, MOMENTUM, STEPS, LR = 0.8, 0.7, 4, 0.1
BATCH = 3  # per rank
#: namespaces of the dispatched collective ops (torch.distributed's calls, DTensor's functional ones)
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")
#: relative size of the bf16 run's perturbations: (1 - m) times them is below half a bf16 ulp for many weights
BF16_STEP = 2e-3
#: bf16's spacing relative to a value (at most; 8 significant bits)
BF16_ULP = 2.0 ** -7


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + torch.tanh(self.fc(x)))


class _Tower(nn.Module):
    """(N, 7) -> (N, 1): odd widths (13 rows: 7 / 6 per rank; the head's 1 row: none on rank 1), a 0-dim
    ``scale`` (replicated: ``fully_shard`` refuses 0-dim parameters), a float and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(7, 13)
        self.blocks = nn.ModuleList(_Block(13) for _ in range(2))
        self.head = nn.Linear(13, 1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("stat", torch.randn(5))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.scale


class _Pair(nn.Module):
    """An online tower and its momentum copy; ``forward`` runs the online one (MoCo's query path)."""

    def __init__(self):
        super().__init__()
        self.online = _Tower()
        self.momentum = MomentumEncoder(self.online, MOMENTUM)

    def forward(self, x):
        return self.online(x)


def _shard(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` every block (the momentum copy's too), then the root; 0-dim parameters stay replicated."""
    from torch.distributed.fsdp import fully_shard

    ignored = {p for p in model.parameters() if p.dim() == 0}
    for mod in model.modules():
        if isinstance(mod, _Block):
            fully_shard(mod, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def _reshard(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a DTensor gathered: collective), detached."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _rows(full: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's rows of ``full`` as FSDP2's ``Shard(0)`` lays them out (``torch.chunk``: ranks past the
    last chunk hold none): the test's own slicing, not vlfast.sharding's."""
    parts = torch.chunk(full, WORLD, dim=0) if full.dim() else (full,)
    return parts[rank] if rank < len(parts) else full[:0]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _tensors(model: nn.Module, floating: bool = True) -> dict:
    """name -> tensor of the floating (``floating``) or other parameters and buffers."""
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return {n: t for n, t in out.items() if t.is_floating_point() == floating}


class _CollectiveOps(TorchDispatchMode):
    def __init__(self, calls: collections.Counter):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in COLLECTIVE_NAMESPACES:
            self.calls[f"op {func.overloadpacket}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_communication():
    """Counts, in the Counter it yields, every collective op dispatched (:class:`_CollectiveOps`) and
    every call of torch.distributed's gather / broadcast / reduce functions and of DTensor's
    ``full_tensor`` / ``redistribute``."""
    from torch.distributed.tensor import DTensor

    calls: collections.Counter = collections.Counter()
    names = [(dist, n) for n in ("all_gather_into_tensor", "all_gather_single", "all_gather", "broadcast",
                                 "all_reduce", "reduce_scatter_tensor", "reduce_scatter_single")
             if hasattr(dist, n)]
    names += [(DTensor, "full_tensor"), (DTensor, "redistribute")]
    originals = [(owner, n, getattr(owner, n)) for owner, n in names]

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for owner, n, fn in originals:
        setattr(owner, n, counted(n, fn))
    try:
        with _CollectiveOps(calls):
            yield calls
    finally:
        for owner, n, fn in originals:
            setattr(owner, n, fn)


def _build(dtype: torch.dtype, rank: int):
    """(sharded model, its one-process twin): the same initial weights on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    ref = _Pair().to(dtype)
    net = _shard(copy.deepcopy(ref), init_device_mesh("cpu", (WORLD,)))
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):  # the layout the test assumes
        assert hasattr(p, "to_local") == (p.dim() > 0), name  # 0-dim: replicated
        if p.dim():
            assert tuple(p.to_local().shape) == tuple(_rows(q, rank).shape), name
    assert _local(net.online.head.weight).shape[0] == (1 if rank == 0 else 0)
    return net, ref


def _fp32_step(net, ref, net_opt, ref_opt, x, rank):
    """One SGD step of the online tower: one process on the global batch ``x``, each rank on its half
    (FSDP averages the gradients over the ranks; the replicated 0-dim one is averaged here)."""
    for model, opt, batch in ((ref, ref_opt, x), (net, net_opt, x.chunk(WORLD)[rank])):
        opt.zero_grad()
        model(batch).square().mean().backward()
        if model is net:
            g = net.online.scale.grad
            dist.all_reduce(g)
            g.div_(WORLD)
        opt.step()


@torch.no_grad()
def _bf16_step(net, ref, gen, rank):
    """Perturb the online weights by the same random amounts in both models (bf16 rounding alike)."""
    for (_, p), q in zip(net.online.named_parameters(), ref.online.parameters()):
        delta = BF16_STEP * torch.randn(q.shape, generator=gen) * (q.float().abs() + 1e-2)
        q.add_(delta)
        _local(p).add_(_rows(delta, rank) if p.dim() else delta)


@torch.no_grad()
def _perturb_buffers(model, step):
    model.online.stat.mul_(0.5).add_(0.25 * step)
    model.online.count.add_(1)


def _averages(ema: EMA) -> dict:
    """The EMA's averages (fp32 masters where the module is bf16) by the model's tensor names."""
    return {k[len("module."):]: v for k, v in ema.state_dict().items()}


def _check_update(rank, dtype):
    tol = dict(dtype=torch.float32)  # fp32 rounding (the averages / masters are fp32 in both runs)
    net, ref = _build(dtype, rank)
    ema, ema_ref = EMA(net, DECAY), EMA(ref, DECAY)
    with pytest.raises(RuntimeError, match="holds this rank's shards"):
        ema(torch.randn(2, 7, dtype=dtype))
    # independent references: float64 formulas on the gathered weights, and bf16-rounded steps
    avg64 = {n: _full(t).double() for n, t in _tensors(net).items()}
    mom64 = {n: _full(p).double() for n, p in net.momentum.module.named_parameters()}
    mom_bf16 = {n: _full(p) for n, p in net.momentum.module.named_parameters()}
    avg_bf16 = {n: _full(t) for n, t in _tensors(net).items()}
    gen = torch.Generator().manual_seed(1)
    net_opt = torch.optim.SGD(net.online.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.online.parameters(), lr=LR)
    bf16_gap = 0.0
    for step in range(1, STEPS + 1):
        if dtype == torch.float32:
            _fp32_step(net, ref, net_opt, ref_opt, torch.randn(WORLD * BATCH, 7, generator=gen), rank)
        else:
            _bf16_step(net, ref, gen, rank)
        _perturb_buffers(net, step)
        _perturb_buffers(ref, step)
        for n, p in ref.online.named_parameters():  # the set-up: both runs hold the same weights
            assert_close(_full(dict(net.online.named_parameters())[n]), p, **tol, msg=f"online {n}")
        online = {n: _full(p).double() for n, p in net.online.named_parameters()}

        with _count_communication() as calls:
            net.momentum.update(net.online)
            ema.update(net)
        assert not calls, f"rank {rank}: communication during the shard-local updates: {dict(calls)}"
        ref.momentum.update(ref.online)
        ema_ref.update(ref)

        # momentum weights: one process's MomentumEncoder and the float64 formula
        for n, p in net.momentum.module.named_parameters():
            mom64[n] = MOMENTUM * mom64[n] + (1 - MOMENTUM) * online[n]
            mom_bf16[n] = (MOMENTUM * mom_bf16[n].float() + (1 - MOMENTUM) * online[n].float()).to(dtype)
            got, one = _full(p), dict(ref.momentum.module.named_parameters())[n]
            if dtype == torch.float32:
                assert_close(got, one, **tol, msg=f"momentum {n} vs 1 proc")
                assert_close(got, mom64[n], **tol, msg=f"momentum {n} vs float64")
            else:  # both the rounding of fp32 masters (checked tightly below): at most one bf16 ulp apart
                assert_close(got, one, atol=0, rtol=BF16_ULP, msg=f"momentum {n} vs 1 proc")
        if dtype != torch.float32:  # the fp32 masters: this rank's rows of the formula, the weights their rounding
            names = [n for n, _ in net.momentum.module.named_parameters()]
            masters = net.momentum.master_state()
            assert masters is not None and len(masters) == len(names)
            ref_masters = dict(zip(names, ref.momentum.master_state()))
            for n, p, master in zip(names, net.momentum.module.parameters(), masters):
                assert master.dtype == torch.float32, n
                want = _rows(mom64[n], rank) if p.dim() else mom64[n]
                assert_close(master.view(want.shape), want, **tol, msg=f"momentum master {n} vs float64")
                assert_close(master.view(want.shape), _rows(ref_masters[n], rank) if p.dim() else ref_masters[n],
                             **tol, msg=f"momentum master {n} vs 1 proc")
                assert torch.equal(_local(p), master.view(want.shape).to(dtype)), f"momentum {n}: not its master"
                bf16_gap = max(bf16_gap, (mom_bf16[n].double() - mom64[n]).abs().max().item())

        # the EMA: gathered averages vs one process's EMA and the float64 formula
        current = {n: _full(t).double() for n, t in _tensors(net).items()}
        avg64 = {n: DECAY * avg64[n] + (1 - DECAY) * current[n] for n in avg64}
        avg_bf16 = {n: (DECAY * avg_bf16[n].float() + (1 - DECAY) * current[n].float()).to(dtype) for n in avg64}
        ema_gap = max((avg_bf16[n].double() - avg64[n]).abs().max().item() for n in avg64)
        full = ema.full_state_dict(rank0_only=False)
        one = ema_ref.state_dict()
        assert set(full) == set(one) == {"module." + n for n in list(avg64) + list(_tensors(net, False))}
        for n in avg64:
            got = full["module." + n]
            assert got.dtype == torch.float32, n  # fp32 masters of bf16 weights
            assert_close(got, one["module." + n], **tol, msg=f"EMA {n} vs 1 proc")
            assert_close(got, avg64[n], **tol, msg=f"EMA {n} vs float64")
        for n, t in _tensors(net, False).items():
            assert torch.equal(full["module." + n], t), f"copied buffer {n}"
    if dtype != torch.float32:
        # the bf16-rounded steps are far from the formulas the masters follow: the comparisons above reject them
        t32 = tolerance(torch.float32)
        scale = max(t.abs().max().item() for t in list(avg64.values()) + list(mom64.values()))
        assert min(bf16_gap, ema_gap) > 10 * (t32.atol + t32.rtol * scale), (bf16_gap, ema_gap, scale)
        mod = dict(ema.module.named_parameters())
        for n, avg in _averages(ema).items():
            if n in mod:
                assert mod[n].dtype == dtype and torch.equal(mod[n], avg.to(dtype)), f"EMA module {n}"
    return net, ref, ema, ema_ref


def _check_state_dict(net, ref, ema, rank, dtype):
    local = {k: v.clone() for k, v in ema.state_dict().items()}
    full = ema.full_state_dict(rank0_only=False)
    kept = ema.full_state_dict()  # rank0_only=True by default (collective all the same)
    assert (kept == {}) if rank else (set(kept) == set(full)), sorted(kept)
    sharded = {n: p for n, p in net.named_parameters() if hasattr(p, "to_local")}
    assert len(sharded) > 10
    for key, value in local.items():
        assert value.dtype == full[key].dtype, key
        p = sharded.get(key[len("module."):])
        if p is None:  # replicated: the same tensor on every rank
            assert torch.equal(value, full[key]), key
        else:
            assert tuple(full[key].shape) == tuple(p.shape) and torch.equal(value, _rows(full[key], rank)), key
    # this rank's shards, and the gathered full tensors (sliced on load), into a fresh EMA of the sharded model
    for kind in ("local shards", "full tensors"):
        source = local if kind == "local shards" else ema.full_state_dict(rank0_only=False)
        fresh = EMA(net, DECAY)
        assert any(not torch.equal(v, local[k]) for k, v in fresh.state_dict().items())  # it starts elsewhere
        fresh.load_state_dict(source)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, local[k]), (kind, k)
        # the masters were loaded at full precision: the next update is the same as the original's
        with torch.no_grad():
            for p in net.online.parameters():
                _local(p).mul_(0.9)
        ema.update(net)
        fresh.update(net)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, ema.state_dict()[k]), (kind, "after an update", k)
        local = {k: v.clone() for k, v in ema.state_dict().items()}
    # the gathered state dict into a one-process EMA of the unsharded model
    full = ema.full_state_dict(rank0_only=False)
    one = EMA(ref, DECAY)
    one.load_state_dict(full)
    for k, v in one.state_dict().items():
        assert torch.equal(v, full[k]), k
    # copy_to writes the averages into the sharded model (cast to its dtype)
    ema.copy_to(net)
    for n, t in _tensors(net).items():
        assert torch.equal(_full(t), full["module." + n].to(dtype)), n


def _check_unsharded_refused(net, ema, dtype):
    def snapshot():
        return ({k: v.clone() for k, v in ema.state_dict().items()},
                [_local(p).clone() for p in net.momentum.module.parameters()])

    def unchanged(before):
        after = snapshot()
        assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())
        assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))

    before = snapshot()
    net.unshard()  # the root's parameters (inp, head of both towers) become FSDP's unsharded tensors
    try:
        assert not hasattr(net.online.inp.weight, "to_local")
        with pytest.raises(RuntimeError, match=r"parameter\(s\) of the FSDP2 model are unsharded right now"):
            ema.update(net)
        with pytest.raises(RuntimeError, match="not sharded DTensors right now"):
            net.momentum.update(net.online)
    finally:
        _reshard(net)
    unchanged(before)
    # inside the forward: a pre-hook of a block runs after FSDP's (which unsharded it)
    errors = []

    def update_inside(module, args):
        for fn in (lambda: ema.update(net), lambda: net.momentum.update(net.online)):
            try:
                fn()
            except RuntimeError as exc:  # recorded for the assertions below; the forward goes on
                errors.append(str(exc))

    handle = net.online.blocks[0].register_forward_pre_hook(update_inside)
    try:
        with torch.no_grad():
            net(torch.randn(2, 7, dtype=dtype))
    finally:
        handle.remove()
        _reshard(net)  # a forward without backward leaves the root unsharded
    assert len(errors) == 2 and "unsharded right now" in errors[0] and "not sharded DTensors" in errors[1], errors
    unchanged(before)


def _check_counter_sees_gathers(ema):
    """The communication counter is not blind: it sees the gathers of full_state_dict and a plain gather."""
    with _count_communication() as calls:
        ema.full_state_dict(rank0_only=False)
    assert calls["full_tensor"] > 0 and calls["op _c10d_functional.all_gather_into_tensor"] > 0, dict(calls)
    with _count_communication() as calls:
        dist.all_gather_single(torch.empty(WORLD * 3), torch.ones(3))
    assert calls["all_gather_single"] == 1 and any(k.startswith("op c10d.") for k in calls), dict(calls)


def _ranks(rank, world, dtype_name):
    assert world == WORLD
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    net, ref, ema, _ = _check_update(rank, dtype)
    _check_counter_sees_gathers(ema)
    _check_unsharded_refused(net, ema, dtype)
    _check_state_dict(net, ref, ema, rank, dtype)


@pytest.mark.distributed
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_fsdp2_ema_and_momentum_are_shard_local(dtype_name):
    run_gloo_ranks(functools.partial(_ranks, dtype_name=dtype_name), world=WORLD, timeout=120)
