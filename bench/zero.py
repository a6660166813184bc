"""Sharded-training benchmarks: training step time per ZeRO stage and under FSDP2, the momentum update under
ZeRO-3 and the EMA update under FSDP2.

DeepSpeed needs a process group, so everything here runs in subprocesses (one per
rank) and the providers are :class:`~.harness.SelfTimed`: the figures are measured
by the ranks themselves and read back by this process.  The ranks use every
device of the run: on CPU, ``RANKS_CPU`` ranks (gloo, ``DS_ACCELERATOR=cpu``) with
``cores // ranks`` threads each; on CUDA one rank per GPU (NCCL allows one rank per
GPU), so on a single GPU the ZeRO stages run as 1 rank and the momentum-update
case, which needs 2 or more ranks, is reported unavailable (its goal NOT MEASURED;
``--device cpu`` measures it on CPU ranks).  The first DeepSpeed start on a machine JIT-builds its CPU comm op (about a
minute, cached afterwards); the timeouts allow for it.  The training runs are
``vlfast train --nproc N`` itself (torchrun's launcher starts the ranks) with a free
``MASTER_PORT`` chosen here; the update workers are started here as ranks with the
launcher's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``,
that ``MASTER_PORT``).  Knowing the port, the shared-memory segments DeepSpeed's CPU comm op
leaves in ``/dev/shm`` are removed after each run
(:func:`vlfast.distributed.zero.remove_cpu_shm_segments`).

Cases:

* ``zero`` / ``momentum update ZeRO-3 ...``: the momentum (MoCo/ALBEF/BYOL) update of a
  MoCo v3 momentum encoder (``vlfast.models`` ``moco_v3_vit_small`` on CPU,
  ``moco_v3_vit_base`` on CUDA) after ``deepspeed.initialize`` at ZeRO-3, timed on
  every rank.  Providers: ``gathered`` (baseline: DeepSpeedExamples'
  ``moving_average``, one ``GatheredParameters`` all-gather + broadcast per
  parameter pair, :func:`vlfast.distributed.zero.gathered_momentum_update_`) and
  ``shard-local`` (:func:`vlfast.distributed.zero.zero3_momentum_update_`: each rank
  averages its own shards, no communication; with bf16 weights, through the fp32
  masters it returns, which are kept between calls).  Each timed call lies between
  two barriers; a call's time is the longest over the ranks; the reported time is
  the median over ``reps`` calls after ``warmup`` untimed ones.  The update is
  timed right after ``deepspeed.initialize``, before any forward: every parameter
  is partitioned, none is resident in full.  ``fp32`` and ``bf16`` (DeepSpeed bf16:
  bf16 momentum weights) run in the same ranks, one after the other.
  Target: ``shard-local`` at least 5x faster than ``gathered`` with 2 or more ranks.
* ``zero`` / ``EMA update FSDP2 ...``: ``vlfast.nn.EMA`` of the whole model (the same one as the
  ZeRO-3 case, momentum encoder included; parameters and float buffers averaged, the other
  buffers copied) sharded by PyTorch FSDP2 (:func:`vlfast.training.fsdp.shard_model`:
  ``fully_shard`` per block, then the root), timed on every rank exactly as the ZeRO-3 case
  (same ranks, barriers, medians, configuration).  Providers: ``gather-then-update`` (baseline:
  what an EMA without shard-local support does -- ``full_tensor()`` of every sharded parameter
  (one all-gather each), one fused :func:`vlfast.ops.ema_update_` over the full tensors into
  fp32 averages kept in full on every rank (so the previous average needs no gather), then this
  rank's slice of each average copied into the sharded EMA's shards with
  :func:`vlfast.sharding.local_from_full`) and ``shard-local`` (``ema.update(model)``: one fused
  call over this rank's shards, ``p.to_local()``, no communication).  ``bf16``: the model
  itself in bf16 before sharding (bf16 sharded parameters, fp32 averages in both providers:
  ``EMA``'s masters); ``fp32``: an fp32 model.  After timing, each rank checks that both
  providers hold the same averages (a slicing mistake of the baseline would show).
  Target: ``shard-local`` at least 3x faster than ``gather-then-update`` with 2 or more ranks
  (see :data:`EMA_FSDP2_GOAL`).
* ``zero`` / ``<model> train step``: ``vlfast train --zero Z --nproc N`` for Z = 0..3
  (``zero0``: DeepSpeed with ZeRO off, the baseline), ``vlfast train --fsdp --nproc N``
  (``fsdp2``: PyTorch FSDP2) and one process without
  DeepSpeed (``1 process``, using every core, or one GPU), on synthetic data.  The
  time is the median of the ``step_time_s`` that rank 0 logs in ``metrics.jsonl``
  (synthetic batch, forward, backward, optimizer step, loss all-reduce; on CPU fp32,
  on CUDA bf16) over the steps after the
  first ``SKIP_STEPS``; ``items/s`` is samples/s: the global batch over that time.

``--quick`` runs the MoCo v3 micro model (fp32 only) for both update cases, and ZeRO 0 and 3 on 3 steps.

The worker that times the updates is this module run as a script on each rank
(``python -m vlfast.bench.zero --worker --engine {zero3,fsdp2} ...``); rank 0 prints one line
``RESULT_TAG + json`` on stdout, which :func:`measure_momentum_update` parses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vlfast.comm import free_port
from vlfast.distributed.zero import remove_cpu_shm_segments

from .harness import Case, Measured, SelfTimed, Target, register

#: prefix of the result line rank 0 of the momentum worker prints on stdout
RESULT_TAG = "VLFAST_BENCH_ZERO_RESULT "
#: MoCo v3's momentum (the value does not change the time)
MOMENTUM = 0.99
#: ranks on CPU (one per core on the 2-core reference machine)
RANKS_CPU = 2
#: (model, precisions, warm-up calls, timed calls) of the momentum-update case
MOMENTUM_CONFIG = {
    "quick": ("moco_v3_micro", ("fp32",), 1, 3),
    "cpu": ("moco_v3_vit_small", ("fp32", "bf16"), 1, 7),
    "cuda": ("moco_v3_vit_base", ("fp32", "bf16"), 3, 20),
}
#: (model, global batch, steps, ZeRO stages, precision, with the 1-process run) of the train-step case
TRAIN_CONFIG = {
    "quick": ("clip_micro", 4, 3, (0, 3), "fp32", False),
    "cpu": ("clip_micro", 16, 30, (0, 1, 2, 3), "fp32", True),
    "cuda": ("clip_vit_b16", 256, 20, (0, 1, 2, 3), "bf16", True),
}
#: steps left out of the step time (start-up: allocator, DeepSpeed buffers); fewer when there are few steps
SKIP_STEPS = 2
#: seconds a subprocess run may take (the first DeepSpeed start builds an op for about a minute)
TIMEOUT_S = 900.0
#: minimum speedup of the shard-local update over the gathered one (2 or more ranks)
MOMENTUM_GOAL = 5.0
#: minimum speedup of the shard-local FSDP2 EMA update over gather-then-update (2 or more ranks), from the
#: cost MOMENTUM_GOAL implies.  Its baseline moves each updated element through three full-size collectives
#: (all-gathers of the momentum and the online parameter, a broadcast back) and updates it once, and is to
#: take 5 shard-local updates: 3 C + 1 >= 5, so one full-size collective counts as C = 4/3 shard-local
#: updates.  gather-then-update has one collective (the parameter's all-gather) and updates the full
#: tensors, ``world`` shard-local updates: 4/3 + 2 = 3.3 with 2 ranks, rounded down to 3 (the copies of
#: the slices, about one more update, are left as margin).
EMA_FSDP2_GOAL = 3.0
#: the shard-local update cases: engine -> (case name prefix, what is updated, baseline provider, goal)
UPDATE_CASES = {
    "zero3": ("momentum update ZeRO-3", "momentum", "gathered", MOMENTUM_GOAL),
    "fsdp2": ("EMA update FSDP2", "EMA", "gather-then-update", EMA_FSDP2_GOAL),
}

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- subprocesses


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _world_size(device: torch.device) -> int:
    return torch.cuda.device_count() if device.type == "cuda" else RANKS_CPU


def _threads_per_rank(device: torch.device, world: int) -> int:
    return max(1, _cores() // world) if device.type == "cpu" else 1


def _child_env(device: torch.device, threads: int) -> dict[str, str]:
    """Environment of a subprocess: no launcher variables of ours, the device pinned down."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    if device.type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: keep the ranks off the GPUs
    return env


def _tail(path: Path, n: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-n:]


def _run_procs(cmds: Sequence[tuple[list[str], dict[str, str]]], logdir: Path, what: str,
               timeout: float = TIMEOUT_S) -> list[str]:
    """Run the commands concurrently; return their stdouts.

    When one exits non-zero the others are stopped (they would wait forever in a
    collective) and RuntimeError is raised with the tail of every log; the same after
    ``timeout`` seconds.
    """
    procs = []
    try:
        for i, (cmd, env) in enumerate(cmds):
            out, err = open(logdir / f"proc{i}.out", "w"), open(logdir / f"proc{i}.err", "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL),
                          out, err))
        deadline = time.monotonic() + timeout
        failed: list[str] = []
        pending = list(range(len(procs)))
        while pending:
            for i in list(pending):
                code = procs[i][0].poll()
                if code is None:
                    continue
                pending.remove(i)
                if code != 0:
                    failed.append(f"process {i} exited with code {code}")
            if failed or time.monotonic() > deadline:
                if not failed:
                    failed.append(f"timed out after {timeout:.0f} s")
                break
            time.sleep(0.05)
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            out.close()
            err.close()
    if failed:
        logs = "\n".join(f"--- process {i} ({' '.join(cmds[i][0][:6])} ...) stdout/stderr tail ---\n"
                         f"{_tail(logdir / f'proc{i}.out')}\n{_tail(logdir / f'proc{i}.err')}"
                         for i in range(len(procs)))
        # the summary last too: the results table shows an error's last line
        raise RuntimeError(f"{what}: {'; '.join(failed)}\n{logs}\n{what}: {'; '.join(failed)}")
    return [(logdir / f"proc{i}.out").read_text(errors="replace") for i in range(len(procs))]


def _launch_ranks(cmd: list[str], device: torch.device, world: int, threads: int, logdir: Path, what: str,
                  timeout: float = TIMEOUT_S) -> list[str]:
    """Run ``cmd`` as ``world`` local ranks (the variables torchrun gives each rank); their stdouts."""
    port = str(free_port())
    cmds = []
    for rank in range(world):
        env = _child_env(device, threads)
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmds.append((cmd, env))
    try:
        return _run_procs(cmds, logdir, what, timeout)
    finally:  # every rank has exited (_run_procs stops them all)
        remove_cpu_shm_segments(port, range(world))


class _Once:
    """Calls ``fn`` on first use and keeps its result for later calls.

    When ``fn`` raises, the first call raises that exception (reported in full) and
    later calls raise a RuntimeError that names it, without running ``fn`` again.
    """

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.done, self.value, self.error = fn, False, None, None

    def __call__(self) -> Any:
        if not self.done:
            self.done = True
            try:
                self.value = self.fn()
            except Exception as exc:
                self.error = exc
                raise
        if self.error is not None:
            last = str(self.error).strip().splitlines()
            raise RuntimeError("the shared measurement failed (reported in full above): "
                               f"{type(self.error).__name__}: {last[-1] if last else ''}")
        return self.value


# --------------------------------------------------------------------------- shard-local updates (ZeRO-3, FSDP2)


def parse_result(stdout: str) -> dict[str, Any]:
    """The JSON of the (last) ``RESULT_TAG`` line in ``stdout``; ValueError when there is none."""
    lines = [line[len(RESULT_TAG):] for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        raise ValueError(f"no line starting with {RESULT_TAG.strip()!r} in the worker's stdout")
    return json.loads(lines[-1])


def measure_momentum_update(device: torch.device, model: str, precisions: Sequence[str], warmup: int,
                            reps: int, world: int | None = None, timeout: float = TIMEOUT_S,
                            engine: str = "zero3") -> dict[str, Any]:
    """Run the update worker on ``world`` ranks; return rank 0's result.

    ``engine``: ``"zero3"`` (the momentum-encoder update after ``deepspeed.initialize`` at ZeRO-3,
    ``gathered`` vs ``shard-local``) or ``"fsdp2"`` (``vlfast.nn.EMA`` of the FSDP2-sharded model,
    ``gather-then-update`` vs ``shard-local``); see the module docstring.

    The result maps ``"results"`` to one dict per precision (``precision``, ``dtype`` (of the
    updated weights), ``tensors``, ``numel`` (elements updated, in full), ``shard_numel``
    (elements on rank 0), ``local_ms`` / ``gathered_ms`` (every timed call of the shard-local
    update / of the baseline, longest over the ranks) and their medians ``local_median_ms`` /
    ``gathered_median_ms``, and ``max_rss_mb``: rank 0's peak resident memory so far), plus
    ``engine``, ``world``, ``model``, ``warmup`` and ``reps``.
    """
    if engine not in UPDATE_CASES:
        raise ValueError(f"engine must be one of {sorted(UPDATE_CASES)}, got {engine!r}")
    world = _world_size(device) if world is None else world
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    threads = _threads_per_rank(device, world)
    cmd = [sys.executable, "-m", __name__, "--worker", "--engine", engine, "--model", model, "--precisions",
           ",".join(precisions), "--warmup", str(warmup), "--reps", str(reps), "--momentum", str(MOMENTUM),
           "--device", device.type, "--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="vlfast-bench-zero-") as tmp:
        outs = _launch_ranks(cmd, device, world, threads, Path(tmp),
                             f"{UPDATE_CASES[engine][0]} worker ({model}, {world} ranks)", timeout)
    return parse_result(outs[0])


def _max_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _zero3_results(args, device: torch.device, timed: Callable[[Callable[[], Any]], list[float]]) -> list[dict]:
    """The ZeRO-3 momentum-update measurement of every precision (``gathered`` vs ``shard-local``)."""
    import deepspeed
    import torch.distributed as dist

    from vlfast import models
    from vlfast.distributed import compat
    from vlfast.distributed.zero import (attach_zero_momentum, deepspeed_config, gathered_momentum_update_,
                                         is_zero3_param, zero3_momentum_update_)

    results = []
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        net = models.create(args.model).to(device).train()
        cfg = deepspeed_config(3, precision, batch_size=1, world_size=dist.get_world_size(), device=device.type)
        trainable = [p for p in net.parameters() if p.requires_grad]
        with compat.zero_dim_broadcast():  # DeepSpeed's broadcast fails on 0-dim parameters
            engine, *_ = deepspeed.initialize(model=net, model_parameters=trainable, config=cfg)
        pairs = attach_zero_momentum(engine.module)
        if not pairs:
            raise RuntimeError(f"model {args.model!r} has no vlfast.nn.MomentumEncoder to update")
        mom = [p for zm in pairs for p in zm.momentum_module.parameters()]
        onl = [p for zm in pairs for p in zm.online_module.parameters()]
        if not all(is_zero3_param(p) for p in mom + onl):
            raise RuntimeError("after deepspeed.initialize at ZeRO-3 some parameters are not partitioned")
        state: dict[str, Any] = {"master": None}

        def shard_local() -> None:
            state["master"] = zero3_momentum_update_(mom, onl, args.momentum, master=state["master"])

        def gathered() -> None:
            gathered_momentum_update_(mom, onl, args.momentum)

        local_ms = timed(shard_local)
        gathered_ms = timed(gathered)
        results.append(dict(
            max_rss_mb=_max_rss_mb(), precision=precision, dtype=str(mom[0].dtype).replace("torch.", ""),
            tensors=len(mom), numel=sum(p.ds_numel for p in mom), shard_numel=sum(p.ds_tensor.numel() for p in mom),
            local_ms=local_ms, gathered_ms=gathered_ms,
            local_median_ms=statistics.median(local_ms), gathered_median_ms=statistics.median(gathered_ms)))
        del shard_local, gathered, engine, pairs, net  # the closures hold the rest (mom, onl, state)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _fsdp2_result(args, device: torch.device, timed: Callable[[Callable[[], Any]], list[float]], mesh,
                  precision: str) -> dict:
    """The FSDP2 EMA-update measurement of one precision (``gather-then-update`` vs ``shard-local``)."""
    from vlfast import models
    from vlfast.nn import EMA
    from vlfast.ops import ema_update_
    from vlfast.sharding import is_dtensor, local_from_full, shard_spec
    from vlfast.training.fsdp import shard_model

    torch.manual_seed(0)
    net = models.create(args.model).to(device)
    if precision == "bf16":
        net = net.to(torch.bfloat16)  # bf16 parameters (sharded as bf16); the averages stay fp32
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    shard_model(net, mesh)
    ema = EMA(net, decay=args.momentum)  # shard-local: this rank's shards, fp32 masters of bf16 ones
    with torch.no_grad():  # the baseline's state: fp32 averages kept in full on every rank
        avg = {n: (p.full_tensor() if is_dtensor(p) else p).to(torch.float32, copy=True)
               for n, p in net.named_parameters()}
        avg.update({n: b.to(torch.float32, copy=True) for n, b in net.named_buffers() if b.is_floating_point()})
        shards = {n: torch.empty_like(p.to_local(), dtype=torch.float32) for n, p in net.named_parameters()
                  if is_dtensor(p)}
    specs = {n: shard_spec(p) for n, p in net.named_parameters() if is_dtensor(p)}
    copies = [(n, b) for n, b in net.named_buffers() if not b.is_floating_point()]
    copied = {n: b.clone() for n, b in copies}

    @torch.no_grad()
    def gather_then_update() -> None:
        current = {n: p.full_tensor() if is_dtensor(p) else p for n, p in net.named_parameters()}
        current.update(net.named_buffers())
        ema_update_(list(avg.values()), [current[n] for n in avg], args.momentum)
        for n, spec in specs.items():  # keep this rank's slice (the sharded EMA's layout)
            shards[n].copy_(local_from_full(avg[n], spec))
        for n, b in copies:
            copied[n].copy_(b)

    local_ms = timed(lambda: ema.update(net))
    gathered_ms = timed(gather_then_update)
    # both providers made warmup + reps updates of the same weights: the same averages (up to the module's
    # rounding of them in bf16); a baseline keeping another rank's rows would differ far more
    mine = dict(ema.module.named_parameters())
    rtol = 1e-5 if precision == "fp32" else 2.0 ** -7
    for n, shard in shards.items():
        if not torch.allclose(shard, mine[n].float(), rtol=rtol, atol=1e-6):
            raise RuntimeError(f"gather-then-update and shard-local disagree on {n!r}")
    params = [p for p in net.parameters() if p.is_floating_point()]
    return dict(
        max_rss_mb=_max_rss_mb(), precision=precision, dtype=str(params[0].dtype).replace("torch.", ""),
        tensors=len(avg), numel=sum(t.numel() for t in avg.values()),
        shard_numel=sum(p.to_local().numel() if is_dtensor(p) else p.numel() for p in params),
        local_ms=local_ms, gathered_ms=gathered_ms,
        local_median_ms=statistics.median(local_ms), gathered_median_ms=statistics.median(gathered_ms))


def _fsdp2_results(args, device: torch.device, timed: Callable[[Callable[[], Any]], list[float]]) -> list[dict]:
    """:func:`_fsdp2_result` of every precision, over a 1-D mesh of every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    results = []
    for precision in args.precisions.split(","):
        results.append(_fsdp2_result(args, device, timed, mesh, precision))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _worker_main(argv: Sequence[str]) -> int:
    """One rank of an update measurement (see the module docstring and :func:`measure_momentum_update`)."""
    ap = argparse.ArgumentParser(prog="python -m vlfast.bench.zero --worker")
    ap.add_argument("--worker", action="store_true", required=True)
    ap.add_argument("--engine", choices=sorted(UPDATE_CASES), default="zero3")
    ap.add_argument("--model", required=True)
    ap.add_argument("--precisions", required=True, help="comma-separated: fp32,bf16")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--momentum", type=float, default=MOMENTUM)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")

    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.engine == "zero3":
        import logging

        import deepspeed

        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    else:
        from vlfast.training.fsdp import init_process_group

        init_process_group(device)  # gloo on the CPU, NCCL on CUDA (one GPU per LOCAL_RANK)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Callable[[], Any]) -> list[float]:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.reps):
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            sync()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a call lasts until its slowest rank is done
        return [1e3 * v for v in t.tolist()]

    results = (_zero3_results if args.engine == "zero3" else _fsdp2_results)(args, device, timed)
    if rank == 0:
        print(RESULT_TAG + json.dumps(dict(engine=args.engine, model=args.model, world=world, warmup=args.warmup,
                                           reps=args.reps, results=results)), flush=True)
    # leave together (a rank exiting while gloo threads of another are up can abort it)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


def _update_cases(device: torch.device, quick: bool, engine: str):
    """The cases of one shard-local update (:data:`UPDATE_CASES`), one per precision, sharing one worker run."""
    title, what, baseline, goal = UPDATE_CASES[engine]
    model, precisions, warmup, reps = MOMENTUM_CONFIG["quick" if quick else device.type]
    world = _world_size(device)

    def target(ranks: str) -> Target:
        return Target(f"shard-local {what} update at least {goal:g}x faster than {baseline} "
                      f"({ranks})", "shard-local", baseline=baseline, minimum=goal)

    if device.type == "cuda" and world < 2:
        reason = (f"needs 2 or more CUDA devices (one NCCL rank per GPU); found {world}: "
                  "run on a multi-GPU machine, or with --device cpu")
        for precision in precisions:
            yield Case(op="zero", name=f"{title} {precision}", shape=f"{model}, 2+ ranks",
                       dtype=precision, providers={}, baselines=[baseline], candidates=["shard-local"],
                       unavailable={baseline: reason, "shard-local": reason},
                       targets=[] if quick else [target("2+ ranks")])
        return
    run = _Once(lambda: measure_momentum_update(device, model, precisions, warmup, reps, world, engine=engine))

    def provider(precision: str, key: str) -> SelfTimed:
        def measure() -> Measured:
            res = next((r for r in run()["results"] if r["precision"] == precision), None)
            if res is None:
                raise RuntimeError(f"the worker returned no {precision} result")
            return Measured(ms=res[f"{key}_median_ms"], runs=len(res[f"{key}_ms"]))

        return SelfTimed(measure)

    for precision in precisions:
        targets = [target(f"{world} ranks")] if world >= 2 and not quick else []
        yield Case(op="zero", name=f"{title} {precision}", shape=f"{model}, {world} ranks",
                   dtype=precision, providers={baseline: provider(precision, "gathered"),
                                               "shard-local": provider(precision, "local")},
                   baselines=[baseline], candidates=["shard-local"], targets=targets)


# --------------------------------------------------------------------------- train step per ZeRO stage


def step_time_from_metrics(path: Path | str, skip: int = SKIP_STEPS) -> tuple[float, int]:
    """(median ``step_time_s`` in ms over the steps after the first ``skip``, steps counted).

    ``skip`` is lowered to keep at least one step.  ValueError when the file has no step.
    """
    times = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                times.append((int(rec["step"]), float(rec["step_time_s"])))
    if not times:
        raise ValueError(f"{path} holds no step")
    times.sort()
    skip = max(0, min(skip, len(times) - 1))
    kept = [t for _, t in times[skip:]]
    return 1e3 * statistics.median(kept), len(kept)


def measure_train_step(device: torch.device, model: str, batch: int, steps: int, precision: str,
                       zero: int | str | None, world: int, timeout: float = TIMEOUT_S) -> Measured:
    """``vlfast train`` on synthetic data (``--zero zero --nproc world``; ``zero="fsdp"``: ``--fsdp --nproc
    world``; one process when ``zero`` is None); the median step time of rank 0's ``metrics.jsonl``
    (``--log-every 1``: each step's own time; see :func:`step_time_from_metrics`)."""
    if zero is None:
        threads = _cores() if device.type == "cpu" else 1
    else:
        threads = _threads_per_rank(device, world)
    with tempfile.TemporaryDirectory(prefix="vlfast-bench-zero-train-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "vlfast", "train", "--model", model, "--steps", str(steps), "--batch-size",
               str(batch), "--precision", precision, "--no-progress", "--seed", "0", "--out", str(out),
               "--log-every", "1"]
        if device.type == "cpu":
            cmd += ["--threads", str(threads)]
        if zero == "fsdp":
            cmd += ["--fsdp", "--nproc", str(world)]
        elif zero is not None:
            cmd += ["--zero", str(zero), "--nproc", str(world)]
        flag = "--fsdp" if zero == "fsdp" else f"--zero {zero}"
        what = f"vlfast train --model {model} " + ("(1 process)" if zero is None else f"{flag} ({world} ranks)")
        logs = Path(tmp) / "logs"
        logs.mkdir()
        env = _child_env(device, threads)
        port = env["MASTER_PORT"] = str(free_port())  # `--nproc` uses it: the ranks' port is known here
        try:  # distributed: `vlfast train --nproc` starts the ranks (torchrun's launcher), as a user runs it
            _run_procs([(cmd, env)], logs, what, timeout)
        finally:
            if zero is not None:
                remove_cpu_shm_segments(port, range(world))  # DeepSpeed's CPU segments (a failed run leaves them)
        metrics = out / "metrics.jsonl"
        if not metrics.is_file():
            raise RuntimeError(f"{what} wrote no {metrics}")
        ms, runs = step_time_from_metrics(metrics)
    return Measured(ms=ms, runs=runs)


def _train_cases(device: torch.device, quick: bool):
    model, batch, steps, stages, precision, single = TRAIN_CONFIG["quick" if quick else device.type]
    world = _world_size(device)
    if device.type == "cuda" and world < 1:
        raise RuntimeError("no CUDA device")
    if batch % world:
        batch = world * max(1, batch // world)  # the global batch must split evenly over the ranks

    def provider(zero: int | str | None) -> SelfTimed:
        return SelfTimed(lambda: measure_train_step(device, model, batch, steps, precision, zero, world))

    providers = {f"zero{z}": provider(z) for z in stages}
    providers["fsdp2"] = provider("fsdp")
    if single:
        providers["1 process"] = provider(None)
    yield Case(op="zero", name=f"{model} train step", shape=f"batch {batch}, {world} rank{'s' * (world > 1)}",
               dtype=precision, providers=providers, baselines=["zero0"],
               candidates=[f"zero{z}" for z in stages if z != 0] + ["fsdp2"], items=batch)


@register("zero")
def cases(device: torch.device, quick: bool):
    for engine in UPDATE_CASES:
        yield from _update_cases(device, quick, engine)
    yield from _train_cases(device, quick)


if __name__ == "__main__":
    if "--worker" not in sys.argv[1:]:
        sys.exit("this module is a benchmark of `vlfast bench` (--filter zero); run as a script it is only the "
                 "momentum-update worker (--worker ...), started by measure_momentum_update")
    code = _worker_main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's teardown: the process group is destroyed and the result is
    # flushed, but a C++ thread of the CPU collectives (gloo / DeepSpeed's shm comm op) can still be
    # joinable when the static destructors run, and std::terminate then aborts a rank that finished
    # (SIGABRT, "terminate called without an active exception", seen under a loaded CI machine).
    # The harness removes the ranks' /dev/shm segments itself (remove_cpu_shm_segments).
    os._exit(code)
