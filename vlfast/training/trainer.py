"""``vlfast train``: :class:`Trainer` (the loop, in torchtitan's shape) over a pluggable engine, and the command line.

* :class:`Trainer` builds the model, the data, the engine, the EMA, the evaluation and the
  metrics from the command line's arguments; :meth:`Trainer.train_step` runs one optimizer
  step, :meth:`Trainer.train` the loop (metrics, checkpoints, evaluation),
  :meth:`Trainer.state_dict` is what a checkpoint keeps of the trainer itself (the step and the
  data position; the engine saves its own state, :class:`~vlfast.training.checkpoint.CheckpointManager`
  owns the files).  From Python: ``Trainer.from_argv(["--model", "clip_micro", ...]).train()``.
* Engines (:mod:`vlfast.training.engine`): no ``--zero``/``--fsdp``: one process,
  :class:`~vlfast.training.engine.TorchEngine` (AdamW); ``--zero {0,1,2,3}``:
  :class:`~vlfast.training.deepspeed_engine.DeepSpeedEngine` (``--deepspeed-config FILE`` merged
  into the generated config); ``--fsdp``: :class:`~vlfast.training.fsdp.FSDPEngine` (PyTorch FSDP2).
  ``--batch-size`` is the *global* batch: rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)`` of
  the global batch ``i`` (real data: each rank decodes only its rows, see :mod:`vlfast.training.data`),
  so a run on ``W`` ranks sees the same samples as the single-process run; the logged loss is the
  mean over the ranks, and only rank 0 writes ``metrics.jsonl``.
* ``--nproc N`` (one node): the ranks are started by torchrun's launcher
  (``torch.distributed.launcher.elastic_launch``, a static rendezvous on ``127.0.0.1`` at
  ``$MASTER_PORT`` or a free port, no restarts; ``DS_ACCELERATOR=cpu`` without CUDA); a failing rank
  stops the others and the command exits non-zero.  Multi-node: torchrun or DeepSpeed's launcher,
  unchanged; each rank reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from its environment::

      torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
          -m vlfast train --model clip_vit_b16 --fsdp --batch-size 4096
      deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 -m vlfast.training.trainer \\
          --model clip_vit_b16 --zero 3 --batch-size 4096

Checkpoints stay atomic with several ranks: every rank writes its part into the same
``.tmp-step_N-dist`` folder and, after a barrier, rank 0 renames it
(:class:`~vlfast.training.checkpoint.CheckpointManager`).
"""

import argparse
import json
import math
import os
import random
import sys
from typing import Dict, List, Optional

import torch

from ..comm import free_port
from . import checkpoint as ckpt
from .activation import checkpoint_blocks
from .data import DataError, build_data, default_workers, parse_data_spec
from .engine import Engine, TorchEngine, TrainError
from .metrics import StepMetrics, get_logger
from .optim import SCHEDULES, lr_at

PROG = "vlfast train"


def _world():
    """(rank, world_size, local_rank) from the launcher's environment (1 process: 0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def make_engine(model: torch.nn.Module, args, device, world_size: int = 1) -> Engine:
    """The engine of the command line ``args``: :class:`~vlfast.training.fsdp.FSDPEngine` with ``--fsdp``,
    :class:`~vlfast.training.deepspeed_engine.DeepSpeedEngine` with ``--zero``, else
    :class:`~vlfast.training.engine.TorchEngine`."""
    common = dict(lr=args.lr, precision=args.precision, device=device, weight_decay=args.weight_decay,
                  grad_clip=args.grad_clip)
    if getattr(args, "fsdp", False):
        from .fsdp import FSDPEngine  # torch.distributed imported on use

        return FSDPEngine(model, **common)
    if getattr(args, "zero", None) is not None:
        from .deepspeed_engine import DeepSpeedEngine  # deepspeed imported on use

        return DeepSpeedEngine(model, zero_stage=args.zero, batch_size=args.batch_size // world_size,
                               world_size=world_size, user_config=args.deepspeed_config,
                               accum_steps=getattr(args, "accum_steps", 1), **common)
    return TorchEngine(model, **common)


class Trainer:
    """One training run of ``vlfast train`` (``args``: the namespace of :func:`build_parser`, checked by
    :func:`check_args`; :meth:`from_argv` does both).

    Building it joins the process group (``--zero`` / ``--fsdp``), seeds, creates the model, the data
    (this rank's rows), the engine, the EMA and the evaluation; with ``--resume`` it restores the
    latest checkpoint.  Attributes: ``model`` (the network), ``engine``, ``data``, ``ema``,
    ``checkpoints`` (the run's :class:`~vlfast.training.checkpoint.CheckpointManager`), ``step`` (optimizer
    steps done), ``total_steps``, ``rank``, ``world_size``, ``device``.
    """

    def __init__(self, args: argparse.Namespace):
        import vlfast.models as M

        self.args = args
        self.log = log = get_logger()
        self.kind, _ = parse_data_spec(args.data)
        self.device = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.precision == "fp16" and device.type != "cuda":
            raise TrainError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
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
        if args.fsdp:
            from .fsdp import init_process_group

            init_process_group(device)
        elif args.zero is not None:
            from .deepspeed_engine import init_distributed

            init_distributed(device)
        if args.zero is not None or args.fsdp:
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size = rank, world
        self.main_rank = rank == 0

        _seed_all(args.seed)
        self.model = model = M.create(args.model, fused=not args.eager).to(device)
        if args.grad_checkpointing:
            n = checkpoint_blocks(model)
            if n == 0:
                raise TrainError(f"--grad-checkpointing: model {args.model!r} has no blocks (nn.ModuleList children)")
            log.info(f"activation checkpointing on {n} blocks")
        model.train()
        workers = args.workers if args.workers is not None else default_workers(
            int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        self.data = build_data(args.data, model, args.batch_size, args.seed, rank=rank, world_size=world,
                               shuffle=not args.no_shuffle, workers=workers, pin_memory=device.type == "cuda",
                               warn=lambda msg: log.warning(msg, extra={"all_ranks": True}))  # this rank's finding
        self.evaluation = self._build_evaluation() if args.eval_data is not None else None
        if self.kind == "synthetic":
            self.total_steps = args.steps if args.steps is not None else 20
        elif args.steps is not None:
            self.total_steps = args.steps
        else:
            self.total_steps = max(1, math.ceil(args.epochs * self.data.num_samples / args.batch_size))
        if callable(getattr(model, "set_total_steps", None)):  # schedules over the run (DINO's momentum, temperature)
            model.set_total_steps(self.total_steps)
        self.engine: Engine = make_engine(model, args, device, world_size=world)
        self.ema = None
        if args.ema is not None:
            from vlfast.distributed import make_ema

            # after the engine: under ZeRO-3 the parameters are partitioned by now and make_ema
            # returns a ZeroEMA averaging each rank's shards (fp32); under FSDP2 an EMA of the DTensor shards
            self.ema = make_ema(model, decay=args.ema)
        # each rank its own random stream (dropout, MAE masks, ...: samples of different ranks must not
        # share draws); rank 0's is the single process's.  Draws that must agree across ranks (ALBEF's
        # global-batch draws) use a seed broadcast from rank 0.
        _seed_all(args.seed + rank)
        self.forward = torch.compile(self.engine.model) if args.compile else self.engine.model
        self.checkpoints = ckpt.CheckpointManager(args.out)
        self.step = 0
        self.lr = 0.0
        self.last_saved: Optional[int] = None
        os.makedirs(args.out, exist_ok=True)
        if args.resume:
            self.resume()
        elif self.main_rank and os.path.exists(self.checkpoints.metrics_path):
            os.remove(self.checkpoints.metrics_path)
        self.engine.barrier()

    @classmethod
    def from_argv(cls, argv: List[str]) -> "Trainer":
        """``Trainer`` of the command line ``argv`` (``vlfast train``'s arguments, without the program name)."""
        parser = build_parser()
        args = parser.parse_args(list(argv))
        check_args(args, parser)
        if args.nproc is not None and "WORLD_SIZE" not in os.environ:
            raise TrainError("--nproc starts processes: run `vlfast train --nproc N ...` (or torchrun), which builds "
                             "a Trainer in each rank")
        return cls(args)

    def _build_evaluation(self):
        from .evaluate import EvalError, Evaluation, check_prompt, read_classnames

        args = self.args
        try:
            classnames = read_classnames(args.classnames) if args.eval_task == "zeroshot" else None
            if args.eval_task == "zeroshot":
                check_prompt(args.prompt)
            return Evaluation(self.model, args.eval_task, args.eval_data, classnames=classnames, prompt=args.prompt,
                              knn_train=args.knn_train, batch_size=args.batch_size)
        except EvalError as exc:
            raise TrainError(str(exc)) from None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """What a checkpoint keeps of the trainer itself: ``{"step", "data"}`` (the data source's position,
        epoch order and counters).  The engine (model, optimizer), the EMA and the random streams are
        saved beside it by :meth:`save`."""
        return {"step": self.step, "data": self.data.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"])

    def save(self) -> ckpt.StepFolder:
        """Checkpoint the current step (collective with several ranks)."""
        args = self.args
        trainer_state = self.state_dict()
        step = trainer_state.pop("step")
        folder = self.checkpoints.save(step, self.engine, trainer_state, ema=self.ema, args=vars(args))
        if args.safetensors and self.main_rank:
            self.checkpoints.export_safetensors(folder)
        self.last_saved = step
        return folder

    def resume(self) -> None:
        """Restore the latest checkpoint of ``--out`` (none: a warning, start from step 0)."""
        removed = self.checkpoints.clean_tmp() if self.main_rank else []
        self.engine.barrier()
        if removed:
            self.log.warning(f"removed partial checkpoint(s): {', '.join(removed)}")
        folder = self.checkpoints.latest()
        if folder is None:
            self.log.warning(f"no checkpoint in {self.checkpoints.root}; starting from step 0")
            return
        state = self.checkpoints.load(folder, self.engine, self.ema)
        saved_model = state.get("args", {}).get("model")
        if saved_model and saved_model != self.args.model:
            raise TrainError(f"checkpoint {folder.path} is for model {saved_model!r}, not {self.args.model!r}")
        self.load_state_dict(state)
        ckpt.set_rng_state(state.get("rank_rng", state["rng"]))  # this rank's own streams (rank 0: the saved ones)
        if self.main_rank:
            _truncate_metrics(self.checkpoints.metrics_path, self.step)
        self.last_saved = self.step or None
        self.log.info(f"resumed from {folder.path} (step {self.step})")

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on ``batch`` (this rank's rows of the global batch): the learning rate of
        the schedule, forward, backward (``--accum-steps`` micro-batches), the engine's step, the EMA.
        Returns the step's loss (a detached device tensor: no host sync)."""
        args = self.args
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.lr = lr_at(self.step + 1, lr=args.lr, total_steps=self.total_steps, warmup_steps=args.warmup_steps,
                        schedule=args.schedule, min_lr=args.min_lr)
        self.engine.set_lr(self.lr)
        if args.accum_steps == 1:
            with self.engine.autocast():
                out = self.forward(**batch)
            loss = _compute_loss(self.engine.model, out, batch)
            self.engine.backward(loss)
            loss = loss.detach()
        else:
            loss = accumulate(self.engine, self.forward, self.model, batch, args.accum_steps)
        self.engine.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return loss

    def train(self) -> float:
        """Run from the current step to ``total_steps``: metrics every ``--log-every`` steps, checkpoints
        every ``--save-every`` steps and at the end, evaluation every ``--eval-every`` steps and at the end.
        Returns the last step's loss (the mean over the ranks)."""
        args, log, data = self.args, self.log, self.data
        tb = _tensorboard(self.checkpoints.tensorboard_dir) if self.main_rank else None
        bar = None
        if not args.no_progress and self.main_rank:
            try:
                from tqdm import tqdm

                bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {args.model}", unit="step",
                           file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                bar = None
        metrics = StepMetrics(self.checkpoints.metrics_path if self.main_rank else None, batch_size=args.batch_size,
                              log_every=args.log_every, world_size=self.world_size, tb=tb, bar=bar, logger=log)
        real = self.kind != "synthetic"
        while self.step < self.total_steps:
            loss = self.train_step(data.next_batch())
            step = self.step
            host = {"skipped_images": data.skipped, "data_position": data.position} if real else {}
            metrics.record(step, loss, lr=self.lr, truncated=data.truncated if real and data.spec.takes_text else None,
                           **host)
            if args.save_every and step % args.save_every == 0:
                metrics.flush()  # the log holds every step up to a checkpoint (a resume truncates to it)
                self.save()
            if args.eval_every and (step % args.eval_every == 0 or step == self.total_steps):
                res = self.evaluation(self.model, self.device)
                log.info(f"eval: {json.dumps(res)}")
                metrics.write_record({"step": step, "eval": res})
        data.close()
        metrics.flush()
        if bar is not None:
            bar.close()
        if self.last_saved != self.total_steps:
            self.save()
        metrics.close()
        if tb is not None:
            tb.close()
        skipped = f", skipped {data.skipped} unreadable image(s)" if data.skipped else ""
        log.info(f"done: {self.total_steps} steps, final loss {metrics.last_loss:.4f}{skipped}; "
                 f"checkpoint {self.checkpoints.step_folder(self.total_steps).path}")
        return metrics.last_loss

    def close(self) -> None:
        """Leave the process group (every rank together: an unsynchronized exit can abort a peer's gloo threads)."""
        self.engine.barrier()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from .deepspeed_engine import release_cpu_shm

            release_cpu_shm()
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- local ranks
LAUNCHER_PID = "VLFAST_LAUNCHER_PID"


def _die_with_launcher() -> None:
    """A rank started by :func:`launch_local` is killed when the launcher dies, SIGKILL included
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux): torchrun's launcher starts each rank in a session of
    its own, so a killed ``vlfast train --nproc`` would otherwise leave its ranks training on, writing
    into the run folder.  No-op for a rank of another launcher, and off Linux."""
    pid = os.environ.get(LAUNCHER_PID)
    if not pid or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != int(pid):  # the launcher died before the prctl above
        raise TrainError(f"the launcher (pid {pid}) exited before this rank started")


def launch_local(nproc: int, argv: List[str]) -> int:
    """Run ``nproc`` ranks of ``vlfast train argv`` on this node with torchrun's launcher
    (``elastic_launch``: a static rendezvous at ``127.0.0.1:$MASTER_PORT`` or a free port, no
    restarts).  Returns 0, or the exit code of the first failing rank (the launcher stops the others)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = os.environ.get("MASTER_PORT") or str(free_port())  # a fixed port when the user sets one
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ranks inherit it
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks die with this process (_die_with_launcher)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"vlfast-train-{port}",
                          rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0},
                          max_restarts=0, monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "vlfast", "train", *argv)
        return 0
    except ChildFailedError as exc:
        # the root cause: a rank that failed by itself (a positive code) before one the launcher stopped
        first = min(exc.failures.items(), key=lambda kv: (kv[1].exitcode <= 0, kv[1].timestamp, kv[0]))
        code = first[1].exitcode
        print(f"{PROG}: error: rank {first[0]} exited with code {code}", file=sys.stderr)
        return code if code > 0 else 1
    except (KeyboardInterrupt, SignalException):
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    finally:  # also when a rank crashed before its own clean-up
        if not torch.cuda.is_available():
            from vlfast.distributed.zero import remove_cpu_shm_segments

            remove_cpu_shm_segments(port, range(nproc))


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
        prog=PROG, description="Train a registered vlfast model (one process, DeepSpeed ranks with --zero, or FSDP2 "
                               "ranks with --fsdp).")
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
                   help="start N local ranks with torchrun's launcher (needs --zero or --fsdp; multi-node: torchrun "
                        "or the deepspeed launcher)")
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
            cached = [engine.call("accum_features", **m) for m in micro]
        total = None
        for i, m in enumerate(micro):
            with engine.autocast():
                live = engine.call("accum_features", **m)
                feats = {n: torch.cat([live[n] if j == i else cached[j][n] for j in range(k)]) for n in live}
                loss = engine.call("accum_loss", features=feats, with_globals=i == 0)
            engine.backward(loss, boundary=i == k - 1)
            total = loss.detach() if total is None else total + loss.detach()
        return total / k
    total = None
    for i, m in enumerate(micro):
        with engine.autocast():
            out = forward(**m)
        if isinstance(out, dict) and getattr(model, "accumulation", None) != "independent":
            raise TrainError(f"--accum-steps: model {type(model).__name__} has neither accum_features/accum_loss nor "
                             "a per-sample loss (accumulation = 'independent'); train it with --accum-steps 1")
        loss = _compute_loss(engine.model, out, m) / k
        engine.backward(loss, boundary=i == k - 1)
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


def _tensorboard(log_dir: str):
    """A TensorBoard ``SummaryWriter`` on ``log_dir``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The checks of the command line that need no process group (``parser.error``: usage, exit code 2)."""
    import vlfast.models as M

    if args.deepspeed_config is not None and args.zero is None:
        parser.error("--deepspeed-config needs --zero")
    if args.fsdp and args.zero is not None:
        parser.error("--fsdp and --zero are exclusive (FSDP2 or DeepSpeed)")
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
    if kind == "synthetic" and args.epochs is not None:
        parser.error("--epochs needs real data (--data csv:PATH or wds:PATTERN); use --steps")
    if kind != "synthetic" and args.steps is None and args.epochs is None:
        parser.error("real data needs exactly one of --steps or --epochs")
    if args.precision == "fp16" and not torch.cuda.is_available():
        parser.error("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.nproc is not None:
        if args.zero is None and not args.fsdp:
            parser.error("--nproc needs --zero {0,1,2,3} (DeepSpeed) or --fsdp (FSDP2)")
        if args.batch_size % args.nproc:
            parser.error(f"--batch-size {args.batch_size} (the global batch) is not divisible by --nproc {args.nproc}")
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != args.nproc:
            parser.error(f"--nproc {args.nproc} but the launcher's WORLD_SIZE is {os.environ['WORLD_SIZE']}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    check_args(args, parser)
    if args.nproc is not None and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return launch_local(args.nproc, argv)
    try:
        _die_with_launcher()
        trainer = Trainer(args)
        trainer.train()
        trainer.close()
        return 0
    except (TrainError, DataError, ckpt.CheckpointError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    finally:  # a failed distributed run (a clean one has released it and left the group)
        from .deepspeed_engine import release_cpu_shm

        release_cpu_shm()


if __name__ == "__main__":
    sys.exit(main())
