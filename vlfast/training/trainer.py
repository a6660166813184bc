"""``vlfast train``: the training loop with a pluggable :class:`Engine` (plain torch or DeepSpeed ZeRO).

* No ``--zero``: one process, :class:`TorchEngine` (AdamW).
* ``--zero {0,1,2,3}``: :class:`DeepSpeedEngine` (0 = DeepSpeed with ZeRO disabled);
  ``--deepspeed-config FILE`` is merged into the generated config
  (:func:`vlfast.distributed.zero.deepspeed_config`).  ``--batch-size`` is the *global*
  batch: rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)`` of the global batch ``i``
  (real data: each rank decodes only its rows, see :mod:`vlfast.training.data`), so a run
  on ``W`` ranks sees the same samples as the single-process run; the logged loss is the
  mean over the ranks, and only rank 0 writes ``metrics.jsonl``.
* ``--nproc N`` (single node): the process re-launches itself as ``N`` ranks
  (``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR=127.0.0.1/MASTER_PORT``, the port ``$MASTER_PORT`` when set,
  else a free one; ``DS_ACCELERATOR=cpu`` without CUDA), waits, and exits non-zero when a rank fails.
* Multi-node: DeepSpeed's own launcher, unchanged; each rank reads ``RANK``,
  ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment::

      deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 -m vlfast.training.trainer \\
          --model clip_vit_b16 --zero 3 --batch-size 4096

Checkpoints stay atomic with several ranks: every rank writes its DeepSpeed shards into
the same ``.tmp-step_N-dist`` directory and, after a barrier, rank 0 renames it.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from typing import List, Optional

import torch

from ..comm import free_port
from . import checkpoint as ckpt
from .data import DataError, build_data, default_workers, parse_data_spec
from .engine import Engine, TrainError
from .activation import checkpoint_blocks
from .metrics import StepMetrics, get_logger
from .optim import SCHEDULES, lr_at, param_groups

PROG = "vlfast train"


# --------------------------------------------------------------------------- engines
class TorchEngine(Engine):
    """AdamW + optional autocast (bf16) / GradScaler (fp16, CUDA only)."""

    def __init__(self, model: torch.nn.Module, *, lr: float, precision: str = "fp32", device=None,
                 weight_decay: float = 0.05, grad_clip: float = 0.0):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if precision == "fp16" and self.device.type != "cuda":
            raise TrainError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.precision = precision
        self.grad_clip = float(grad_clip)
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self):
        if self.grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self):
        sd = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save(self, directory):
        torch.save(self.model.state_dict(), os.path.join(directory, "model.pt"))
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), os.path.join(directory, "scaler.pt"))

    def load(self, directory):
        def ld(name):
            return ckpt.load_file(os.path.join(directory, name), map_location=self.device)

        self.model.load_state_dict(ld("model.pt"))
        self.optimizer.load_state_dict(ld("optimizer.pt"))
        if self.scaler is not None and os.path.isfile(os.path.join(directory, "scaler.pt")):
            self.scaler.load_state_dict(ld("scaler.pt"))


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with the config of :func:`vlfast.distributed.zero.deepspeed_config`.

    ``model`` is the DeepSpeed engine (call it for the forward); ``module`` the wrapped
    network.  ``save``/``load`` go through ``save_checkpoint``/``load_checkpoint`` (every
    rank must call them).
    """

    TAG = "deepspeed"

    def __init__(self, model: torch.nn.Module, *, zero_stage: int, lr: float, precision: str = "fp32",
                 batch_size: int, world_size: int = 1, device=None, user_config=None, weight_decay: float = 0.05,
                 grad_clip: float = 0.0):
        import deepspeed

        from vlfast.distributed.zero import deepspeed_config

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        try:
            cfg = deepspeed_config(zero_stage, precision, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                   world_size=world_size, user_config=user_config, device=self.device.type,
                                   gradient_clipping=grad_clip)  # explicit: DeepSpeed's default clips
        except (ValueError, OSError) as exc:
            raise TrainError(f"DeepSpeed config: {exc}") from None
        self.precision = precision
        self.zero_stage = zero_stage
        params = param_groups(model, weight_decay)
        if zero_stage == 3:
            from vlfast.distributed.zero import hoist_momentum_updates, register_external_parameters

            register_external_parameters(model)
            if callable(getattr(model, "momentum_update", None)):
                hoist_momentum_updates(model)  # before ZeRO-3 prefetches the momentum weights
        from vlfast.distributed import compat

        compat.check_version()
        with compat.zero_dim_broadcast():
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                                    config=cfg)
        self.module = model
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss):
        self.model.backward(loss)

    def step(self):
        self.model.step()

    @property
    def lr(self):
        try:
            return float(self.model.get_lr()[0])
        except Exception:
            return float(self.optimizer.param_groups[0]["lr"])

    def barrier(self):
        torch.distributed.barrier()

    def state_dict(self):
        raise NotImplementedError("DeepSpeedEngine saves through save(directory)")

    def load_state_dict(self, state):
        raise NotImplementedError("DeepSpeedEngine loads through load(directory)")

    def save(self, directory):
        """DeepSpeed checkpoint (``<dir>/deepspeed``, per-rank shards) plus the full weights in
        ``<dir>/model.pt`` (gathered under ZeRO-3), as :class:`TorchEngine` writes them."""
        self.model.save_checkpoint(directory, tag=self.TAG)
        if self.world_size > 1:  # every rank has its own random stream
            torch.save(ckpt.rng_state(), os.path.join(directory, f"rng_rank{self.rank}.pt"))
        masters = _momentum_masters(self.module)
        if masters:  # fp32 masters of bf16 / ZeRO-3-shard momentum weights: per-rank state
            torch.save(masters, os.path.join(directory, f"momentum_masters_rank{self.rank}.pt"))
        sd = _full_state_dict(self.module, keep=self.rank == 0)  # every rank (collective under ZeRO-3)
        if self.rank == 0:
            torch.save(sd, os.path.join(directory, "model.pt"))

    def load(self, directory):
        from vlfast.distributed import compat

        try:
            loads = compat.checkpoint_loads(self.model, ckpt.load_file)
        except compat.DeepSpeedCompatError as exc:
            raise TrainError(str(exc)) from None
        with loads:
            path, _ = self.model.load_checkpoint(directory, tag=self.TAG, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"no DeepSpeed checkpoint in {directory}")
        masters_path = os.path.join(directory, f"momentum_masters_rank{self.rank}.pt")
        encoders = dict(_momentum_encoders(self.module))
        masters = {}
        if os.path.isfile(masters_path):
            masters = ckpt.load_file(masters_path)
        for name in masters:
            if name not in encoders:
                raise TrainError(f"checkpoint {directory} has momentum masters for {name!r}, which this "
                                 "model does not have")
        for name, enc in encoders.items():  # none saved (fp32 weights): re-created from the loaded weights
            state = masters.get(name)
            if state is not None:  # on the device of the weights they average
                ref = [getattr(p, "ds_tensor", p) for p in enc.module.parameters()]
                state = [None if t is None else t.to(r.device) for t, r in zip(state, ref)]
            enc.load_master_state(state)


def _full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict:
    """``module.state_dict()`` with full tensors on the CPU (``keep=False``: ``{}``, this rank only
    takes part in the gathers); ZeRO-3 parameters are rebuilt one at a time from every rank's
    shard by a plain all_gather (collective).  Unlike ``GatheredParameters`` this leaves
    DeepSpeed's parameter status alone: re-partitioning resident (persistent) parameters there
    after a checkpoint load broke ZeRO-3's recorded fetch trace ("tracing error") at the next step."""
    from vlfast.sharding import gather_full, is_zero3_param

    out, done = {}, {}
    for k, v in module.state_dict(keep_vars=True).items():
        if is_zero3_param(v):
            if id(v) not in done:  # tied weights: one gather
                full = gather_full(v, v.ds_tensor)
                done[id(v)] = full.cpu() if keep else None
                del full
            t = done[id(v)]
        else:
            t = v.detach().cpu().clone() if keep else None
        if keep:
            out[k] = t
    return out


def _momentum_encoders(module: torch.nn.Module):
    from vlfast.nn import MomentumEncoder

    return [(n, m) for n, m in module.named_modules() if isinstance(m, MomentumEncoder)]


def _momentum_masters(module: torch.nn.Module) -> dict:
    """``{name: master_state}`` of the model's momentum encoders that hold fp32 masters."""
    out = {}
    for name, enc in _momentum_encoders(module):
        state = enc.master_state()
        if state is not None:
            out[name] = state
    return out


def make_engine(model, args, device) -> Engine:
    """Engine factory: :class:`TorchEngine`, :class:`DeepSpeedEngine` with ``--zero``, or
    :class:`vlfast.training.fsdp.FSDPEngine` with ``--fsdp``."""
    if getattr(args, "fsdp", False):
        from .fsdp import FSDPEngine

        return FSDPEngine(model, lr=args.lr, precision=args.precision, device=device, weight_decay=args.weight_decay,
                          grad_clip=args.grad_clip)
    if getattr(args, "zero", None) is not None:
        world = _world()[1]
        return DeepSpeedEngine(model, zero_stage=args.zero, lr=args.lr, precision=args.precision,
                               batch_size=args.batch_size // world, world_size=world, device=device,
                               user_config=args.deepspeed_config, weight_decay=args.weight_decay,
                               grad_clip=args.grad_clip)
    return TorchEngine(model, lr=args.lr, precision=args.precision, device=device, weight_decay=args.weight_decay,
                       grad_clip=args.grad_clip)


# --------------------------------------------------------------------------- ranks
def _world():
    """(rank, world_size, local_rank) from the launcher's environment (1 process: 0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _init_distributed(device) -> None:
    """Process group for DeepSpeed (gloo on the CPU); a lone process gets a 1-rank group."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import logging

    import deepspeed

    try:
        deepspeed.utils.logger.setLevel(logging.WARNING)
    except Exception:  # pragma: no cover
        pass
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
    if device.type == "cuda":
        torch.cuda.set_device(_world()[2])


def _launch(nproc: int, argv: List[str]) -> int:
    """Run ``nproc`` ranks of this command as subprocesses; the first failing rank's code (or 0)."""
    import subprocess

    port = os.environ.get("MASTER_PORT") or str(free_port())  # a fixed port when the user sets one
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        procs.append(subprocess.Popen([sys.executable, "-m", "vlfast", "train", *argv], env=env))
    rc = 0
    try:
        pending = list(range(nproc))
        while pending:
            for r in list(pending):
                code = procs[r].poll()
                if code is None:
                    continue
                pending.remove(r)
                if code != 0 and rc == 0:
                    rc = code if code > 0 else 1
                    print(f"{PROG}: error: rank {r} exited with code {code}", file=sys.stderr)
                    for q in pending:  # the others would wait forever in a collective
                        procs[q].terminate()
            if pending:
                time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    finally:  # also when a rank crashed before its own clean-up
        if not torch.cuda.is_available():
            from vlfast.distributed.zero import remove_cpu_shm_segments

            remove_cpu_shm_segments(port, range(nproc))
    return rc


# --------------------------------------------------------------------------- CLI
def _int_at_least(minimum: int, what: str):
    """argparse type: an int >= ``minimum`` (``what`` words the error)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, ">= 0")


def _float_where(ok, what: str):
    """argparse type: a float for which ``ok(v)`` holds (``what`` words the error)."""

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v

    return parse


_positive_float = _float_where(lambda v: v > 0 and math.isfinite(v), "a positive number")
_decay = _float_where(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_nonneg_float = _float_where(lambda v: v >= 0 and math.isfinite(v), "a number >= 0")


def _sum_over_ranks(count: int, world: int, device) -> int:
    if world == 1:
        return int(count)
    t = torch.tensor([count], dtype=torch.long, device=device)  # on the device: NCCL needs it there
    torch.distributed.all_reduce(t)
    return int(t.item())


def _zero_stage(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ZeRO stage {s!r} (choose from 0, 1, 2, 3)") from None
    if v not in (0, 1, 2, 3):
        raise argparse.ArgumentTypeError(f"invalid ZeRO stage {v} (choose from 0, 1, 2, 3)")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train a registered vlfast model (one process, or DeepSpeed ranks with --zero).")
    p.add_argument("--model", required=True, help="model name (see vlfast.models.list_models())")
    p.add_argument("--data", default="synthetic", help="synthetic | csv:PATH | wds:PATTERN (default: synthetic)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--workers", type=_nonneg_int, default=None, metavar="N",
                   help="real data: image-decoding worker processes per rank (default: the cores per rank - 1, "
                        "at most 8; 0: decode in the training process)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="real data: read in file order (default: a seeded permutation per epoch)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, help="optimizer steps in total (synthetic default: 20)")
    g.add_argument("--epochs", type=_positive_float, help="passes over the data (real data only)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=_nonneg_int, default=0, metavar="N",
                   help="linear warmup from 0 over the first N steps")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="after warmup: constant, or cosine decay to --min-lr at the last step")
    p.add_argument("--min-lr", type=_nonneg_float, default=0.0, help="the cosine schedule's final lr")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.05,
                   help="AdamW weight decay on weight matrices (not biases, norms, embeddings, temperatures)")
    p.add_argument("--grad-clip", type=_nonneg_float, default=0.0, metavar="NORM",
                   help="clip the global gradient norm to NORM (0: off)")
    p.add_argument("--safetensors", action="store_true",
                   help="also write model.safetensors / ema.safetensors in every checkpoint (export)")
    p.add_argument("--accum-steps", type=_positive_int, default=1, metavar="K",
                   help="split each optimizer step's batch into K micro-batches (same result as the whole batch)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in the backward (less memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    p.add_argument("--log-every", type=_positive_int, default=10, metavar="N",
                   help="write the metrics every N steps (losses stay on the device in between; default 10)")
    p.add_argument("--eval-data", default=None, metavar="SPEC", help="evaluate on csv:PATH | wds:PATTERN")
    p.add_argument("--eval-every", type=_nonneg_int, default=0, metavar="N",
                   help="evaluate every N steps and at the end")
    p.add_argument("--eval-task", choices=("zeroshot", "retrieval", "knn"), default=None)
    p.add_argument("--classnames", default=None, metavar="FILE", help="--eval-task zeroshot: class names")
    p.add_argument("--prompt", default="a photo of a {}.", help="--eval-task zeroshot: class text template")
    p.add_argument("--knn-train", default=None, metavar="SPEC", help="--eval-task knn: the memory bank's data")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--eager", action="store_true", help="build the model with fused=False")
    p.add_argument("--out", default="runs/train", help="output directory (default: runs/train)")
    p.add_argument("--save-every", type=_nonneg_int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=_decay, default=None, metavar="DECAY", help="keep an EMA of the weights")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--zero", type=_zero_stage, default=None, metavar="{0,1,2,3}",
                   help="train with DeepSpeed at this ZeRO stage (0: DeepSpeed, ZeRO off)")
    p.add_argument("--fsdp", action="store_true",
                   help="train with PyTorch FSDP2 (fully_shard per block; not with --zero)")
    p.add_argument("--deepspeed-config", default=None, metavar="FILE",
                   help="DeepSpeed JSON merged into the generated config (needs --zero)")
    p.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                   help="launch N local ranks (needs --zero or --fsdp; multi-node: the deepspeed launcher / torchrun)")
    return p


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _compute_loss(model, out, batch):
    if isinstance(out, dict):
        if "loss" not in out:
            raise TrainError(f"model output has no 'loss' (keys: {', '.join(out)})")
        return out["loss"]
    if "labels" in batch:
        return torch.nn.functional.cross_entropy(out.float(), batch["labels"])
    raise TrainError("model returned a tensor and the batch has no labels")


def accumulate(engine, forward, model, batch, k: int) -> torch.Tensor:
    """Backward of the whole ``batch`` in ``k`` micro-batches; returns the whole batch's loss (detached).

    * A model with ``accum_features`` / ``accum_loss`` (contrastive: CLIP) runs open_clip's
      ``--accum-freq`` scheme: the features of every micro-batch first, without gradient; then for
      each micro-batch its features again with gradient, the loss over the whole batch's features
      (the others' cached), and its backward.  The sum of the ``k`` backwards is the whole batch's
      gradient: each feature gets its gradient once, and parameters the loss reads directly
      (``logit_scale``) only in the first micro-batch's loss.
    * A model whose loss is a mean over independent samples (one returning logits for a
      cross-entropy with ``labels``, or with ``accumulation = "independent"``) backs up
      ``loss_i / k`` per micro-batch.
    """
    b = next(iter(batch.values())).shape[0]
    micro = [{n: v[i * (b // k):(i + 1) * (b // k)] for n, v in batch.items()} for i in range(k)]
    if callable(getattr(model, "accum_features", None)) and callable(getattr(model, "accum_loss", None)):
        with torch.no_grad(), engine.autocast():
            cached = [model.accum_features(**m) for m in micro]
        total = None
        for i, m in enumerate(micro):
            with engine.autocast():
                live = model.accum_features(**m)
                feats = {n: torch.cat([live[n] if j == i else cached[j][n] for j in range(k)]) for n in live}
                loss = model.accum_loss(feats, with_globals=i == 0)
            engine.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total / k
    total = None
    for m in micro:
        with engine.autocast():
            out = forward(**m)
        if isinstance(out, dict) and getattr(model, "accumulation", None) != "independent":
            raise TrainError(f"--accum-steps: model {type(model).__name__} has neither accum_features/accum_loss nor "
                             "a per-sample loss (accumulation = 'independent'); train it with --accum-steps 1")
        loss = _compute_loss(engine.model, out, m) / k
        engine.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _truncate_metrics(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash
            if rec.get("step", 0) <= step:
                keep.append(json.dumps(rec) + "\n")
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _tensorboard(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    try:
        return SummaryWriter(os.path.join(out_dir, "tb"))
    except Exception:
        return None


def run(args, parser) -> int:
    import vlfast.models as M

    log = get_logger()
    if args.accum_steps > 1 and args.zero is not None:
        parser.error("--accum-steps is not supported with --zero yet (the torch engine only)")
    if args.compile and args.zero is not None:
        parser.error("--compile is not supported with --zero (DeepSpeed wraps the module; compile it through "
                     "DeepSpeed's own 'compile' config instead)")
    if (args.eval_every or args.eval_task) and args.eval_data is None:
        parser.error("--eval-every / --eval-task need --eval-data SPEC")
    if args.eval_data is not None and not (args.eval_every and args.eval_task):
        parser.error("--eval-data needs --eval-every N and --eval-task {zeroshot,retrieval,knn}")

    names = M.list_models()
    if args.model not in names:
        parser.error(f"unknown model {args.model!r}; available: {', '.join(names)}")
    try:
        kind, _ = parse_data_spec(args.data)
    except DataError as exc:
        parser.error(str(exc))
    if kind == "synthetic":
        if args.epochs is not None:
            parser.error("--epochs needs real data (--data csv:PATH or wds:PATTERN); use --steps")
        total_steps = args.steps if args.steps is not None else 20
    elif args.steps is None and args.epochs is None:
        parser.error("real data needs exactly one of --steps or --epochs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "fp16" and device.type != "cuda":
        parser.error("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, _ = _world()
    if args.zero is None and not args.fsdp and world > 1:
        raise TrainError(f"{world} ranks (WORLD_SIZE) need DeepSpeed or FSDP2: add --zero {{0,1,2,3}} or --fsdp")
    if args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} (the global batch) is not divisible by the "
                         f"{world} ranks")
    if (args.batch_size // world) % args.accum_steps:
        raise TrainError(f"each rank's batch of {args.batch_size // world} is not divisible by --accum-steps "
                         f"{args.accum_steps}")
    if args.zero is not None or args.fsdp:
        if args.fsdp:
            from .fsdp import init_process_group

            init_process_group(device)
        else:
            _init_distributed(device)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    main_rank = rank == 0

    _seed_all(args.seed)
    model = M.create(args.model, fused=not args.eager).to(device)
    if args.grad_checkpointing:
        n = checkpoint_blocks(model)
        if n == 0:
            raise TrainError(f"--grad-checkpointing: model {args.model!r} has no blocks (nn.ModuleList children)")
        log.info(f"activation checkpointing on {n} blocks")
    model.train()
    workers = args.workers if args.workers is not None else default_workers(int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                              world)))
    data = build_data(args.data, model, args.batch_size, args.seed, rank=rank, world_size=world,
                      shuffle=not args.no_shuffle, workers=workers, pin_memory=device.type == "cuda",
                      warn=lambda msg: log.warning(msg, extra={"all_ranks": True}))  # this rank's own finding
    evaluation = None
    if args.eval_data is not None:
        from .evaluate import EvalError, Evaluation, check_prompt, read_classnames

        try:
            classnames = read_classnames(args.classnames) if args.eval_task == "zeroshot" else None
            if args.eval_task == "zeroshot":
                check_prompt(args.prompt)
            task = Evaluation(model, args.eval_task, args.eval_data, classnames=classnames, prompt=args.prompt,
                              knn_train=args.knn_train, batch_size=args.batch_size)
        except EvalError as exc:
            raise TrainError(str(exc)) from None

        def evaluation(m):
            res = task(m, device)
            log.info(f"eval: {json.dumps(res)}")
            return res
    if kind != "synthetic":
        if args.steps is not None:
            total_steps = args.steps
        else:
            total_steps = max(1, math.ceil(args.epochs * data.num_samples / args.batch_size))
    if callable(getattr(model, "set_total_steps", None)):  # schedules over the run (DINO's momentum, temperature)
        model.set_total_steps(total_steps)
    engine = make_engine(model, args, device)
    ema = None
    if args.ema is not None:
        from vlfast.distributed import make_ema

        # after the engine: under ZeRO-3 the parameters are partitioned by now and make_ema
        # returns a ZeroEMA averaging each rank's shards (fp32)
        ema = make_ema(model, decay=args.ema)
    # each rank its own random stream (dropout, MAE masks, ...: samples of different ranks must not
    # share draws); rank 0's is the single process's.  Draws that must agree across ranks (ALBEF's
    # global-batch draws) use a seed broadcast from rank 0.
    _seed_all(args.seed + rank)

    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start = 0
    arg_dict = {k: v for k, v in vars(args).items()}
    if args.resume:
        removed = ckpt.clean_tmp(args.out) if main_rank else []
        engine.barrier()
        if removed:
            log.warning(f"removed partial checkpoint(s): {', '.join(removed)}")
        path = ckpt.find_latest(args.out)
        if path is None:
            log.warning(f"no checkpoint in {ckpt.ckpt_root(args.out)}; starting from step 0")
        else:
            state = ckpt.load_checkpoint(path, engine, ema)
            saved_model = state.get("args", {}).get("model")
            if saved_model and saved_model != args.model:
                raise TrainError(f"checkpoint {path} is for model {saved_model!r}, not {args.model!r}")
            start = int(state["step"])
            data.load_state_dict(state["data"])
            ckpt.set_rng_state(state["rng"])  # rank 0's; the other ranks' are saved by DeepSpeedEngine
            rank_rng = os.path.join(path, f"rng_rank{rank}.pt")
            if world > 1 and os.path.isfile(rank_rng):
                ckpt.set_rng_state(ckpt.load_file(rank_rng))
            if main_rank:
                _truncate_metrics(metrics_path, start)
            log.info(f"resumed from {path} (step {start})")
    elif main_rank and os.path.exists(metrics_path):
        os.remove(metrics_path)
    engine.barrier()

    tb = _tensorboard(args.out) if main_rank else None
    bar = None
    if not args.no_progress and main_rank:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start, desc=f"train {args.model}", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None
    metrics = StepMetrics(metrics_path if main_rank else None, batch_size=args.batch_size, log_every=args.log_every,
                          world_size=world, tb=tb, bar=bar, logger=log)

    def save(step):
        metrics.flush()  # the log holds every step up to a checkpoint (a resume truncates to it)
        path = ckpt.save_checkpoint(args.out, step, engine, {"data": data.state_dict()}, ema=ema, args=arg_dict)
        if args.safetensors and main_rank:
            ckpt.export_safetensors(path)

    forward = engine.model
    if args.compile:
        forward = torch.compile(engine.model)
    last_saved = start if args.resume and start else None
    for step in range(start + 1, total_steps + 1):
        batch = data.next_batch()  # this rank's rows of the global batch
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        lr = lr_at(step, lr=args.lr, total_steps=total_steps, warmup_steps=args.warmup_steps,
                   schedule=args.schedule, min_lr=args.min_lr)
        engine.set_lr(lr)
        if args.accum_steps == 1:
            with engine.autocast():
                out = forward(**batch)
            loss = _compute_loss(engine.model, out, batch)
            engine.backward(loss)
        else:
            loss = accumulate(engine, forward, model, batch, args.accum_steps)
        engine.step()
        if ema is not None:
            ema.update(model, step)
        host = {}
        if kind != "synthetic":
            host = {"skipped_images": data.skipped, "data_position": data.position}
        metrics.record(step, loss, lr=lr, truncated=data.truncated if kind != "synthetic" and data.spec.takes_text
                       else None, **host)
        if args.save_every and step % args.save_every == 0:
            save(step)
            last_saved = step
        if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
            metrics.write_record({"step": step, "eval": evaluation(model)})
    data.close()
    metrics.flush()
    if bar is not None:
        bar.close()
    if last_saved != total_steps:
        save(total_steps)
    metrics.close()
    if tb is not None:
        tb.close()
    skipped = f", skipped {data.skipped} unreadable image(s)" if data.skipped else ""
    log.info(f"done: {total_steps} steps, final loss {metrics.last_loss:.4f}{skipped}; "
             f"checkpoint {os.path.join(ckpt.ckpt_root(args.out), f'step_{total_steps}')}")
    engine.barrier()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _release_cpu_shm()
        # ranks leave together; an unsynchronized exit can abort a peer's gloo threads
        torch.distributed.destroy_process_group()
    return 0


def _release_cpu_shm() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment (DeepSpeed leaves it in /dev/shm)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not torch.cuda.is_available():
        from vlfast.distributed.zero import remove_cpu_shm_segments

        remove_cpu_shm_segments(os.environ.get("MASTER_PORT", ""), [torch.distributed.get_rank()],
                                os.environ.get("MASTER_ADDR", ""))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.deepspeed_config is not None and args.zero is None:
        parser.error("--deepspeed-config needs --zero")
    if args.fsdp and args.zero is not None:
        parser.error("--fsdp and --zero are exclusive (FSDP2 or DeepSpeed)")
    if args.nproc is not None:
        if args.zero is None and not args.fsdp:
            parser.error("--nproc needs --zero {0,1,2,3} (DeepSpeed) or --fsdp (FSDP2)")
        if args.batch_size % args.nproc:
            parser.error(f"--batch-size {args.batch_size} (the global batch) is not divisible by --nproc {args.nproc}")
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            return _launch(args.nproc, argv)
        if int(os.environ.get("WORLD_SIZE", 1)) != args.nproc:
            parser.error(f"--nproc {args.nproc} but the launcher's WORLD_SIZE is {os.environ.get('WORLD_SIZE')}")
    try:
        return run(args, parser)
    except (TrainError, DataError, ckpt.CheckpointError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    finally:  # a failed distributed run (a clean one has released it and left the group)
        _release_cpu_shm()


if __name__ == "__main__":
    sys.exit(main())
