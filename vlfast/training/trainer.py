"""``vlfast train``: single-process training loop with an pluggable :class:`Engine`."""

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

from . import checkpoint as ckpt
from .data import DataError, build_data, parse_data_spec

PROG = "vlfast train"


class TrainError(Exception):
    """A user-facing error: printed as one ``vlfast train: error: ...`` line."""


# --------------------------------------------------------------------------- engines
class Engine:
    """What the loop needs from an optimisation engine (plain torch, DeepSpeed, ...).

    ``autocast()`` is the forward context; ``backward(loss)``; ``step()`` (optimizer
    step + zero grads); ``state_dict()/load_state_dict()``; ``save(dir)/load(dir)``.
    ``model`` is the module to call; ``lr`` the current learning rate.
    """

    model: torch.nn.Module

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return float("nan")

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        torch.save(self.state_dict(), os.path.join(directory, "engine.pt"))

    def load(self, directory: str) -> None:
        self.load_state_dict(torch.load(os.path.join(directory, "engine.pt"), map_location="cpu", weights_only=False))


class TorchEngine(Engine):
    """AdamW + optional autocast (bf16) / GradScaler (fp16, CUDA only)."""

    def __init__(self, model: torch.nn.Module, *, lr: float, precision: str = "fp32", device=None,
                 weight_decay: float = 0.05):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if precision == "fp16" and self.device.type != "cuda":
            raise TrainError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.precision = precision
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self):
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
            return torch.load(os.path.join(directory, name), map_location=self.device, weights_only=False)

        self.model.load_state_dict(ld("model.pt"))
        self.optimizer.load_state_dict(ld("optimizer.pt"))
        if self.scaler is not None and os.path.isfile(os.path.join(directory, "scaler.pt")):
            self.scaler.load_state_dict(ld("scaler.pt"))


def make_engine(model, args, device) -> Engine:
    """Engine factory; other engines (DeepSpeed) hook in here."""
    return TorchEngine(model, lr=args.lr, precision=args.precision, device=device)


# --------------------------------------------------------------------------- CLI
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {s!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _decay(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train a registered vlfast model (single process).")
    p.add_argument("--model", required=True, help="model name (see vlfast.models.list_models())")
    p.add_argument("--data", default="synthetic", help="synthetic | csv:PATH | wds:PATTERN (default: synthetic)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, help="optimizer steps in total (synthetic default: 20)")
    g.add_argument("--epochs", type=_positive_float, help="passes over the data (real data only)")
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--eager", action="store_true", help="build the model with fused=False")
    p.add_argument("--out", default="runs/train", help="output directory (default: runs/train)")
    p.add_argument("--save-every", type=_nonneg_int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=_decay, default=None, metavar="DECAY", help="keep an EMA of the weights")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    if args.threads:
        torch.set_num_threads(args.threads)

    _seed_all(args.seed)
    model = M.create(args.model, fused=not args.eager).to(device)
    model.train()
    data = build_data(args.data, model, args.batch_size, args.seed)
    if kind != "synthetic":
        if args.steps is not None:
            total_steps = args.steps
        else:
            total_steps = max(1, math.ceil(args.epochs * data.num_samples / args.batch_size))
    engine = make_engine(model, args, device)
    ema = None
    if args.ema is not None:
        from vlfast.nn import EMA

        ema = EMA(model, decay=args.ema)

    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start = 0
    arg_dict = {k: v for k, v in vars(args).items()}
    if args.resume:
        removed = ckpt.clean_tmp(args.out)
        if removed:
            print(f"vlfast train: warning: removed partial checkpoint(s): {', '.join(removed)}", file=sys.stderr)
        path = ckpt.find_latest(args.out)
        if path is None:
            print(f"vlfast train: warning: no checkpoint in {ckpt.ckpt_root(args.out)}; starting from step 0",
                  file=sys.stderr)
        else:
            state = ckpt.load_checkpoint(path, engine, ema)
            saved_model = state.get("args", {}).get("model")
            if saved_model and saved_model != args.model:
                raise TrainError(f"checkpoint {path} is for model {saved_model!r}, not {args.model!r}")
            start = int(state["step"])
            data.load_state_dict(state["data"])
            ckpt.set_rng_state(state["rng"])
            _truncate_metrics(metrics_path, start)
            print(f"vlfast train: resumed from {path} (step {start})", file=sys.stderr)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    def save(step):
        ckpt.save_checkpoint(args.out, step, engine, {"data": data.state_dict()}, ema=ema, args=arg_dict)

    tb = _tensorboard(args.out)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start, desc=f"train {args.model}", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None
    last_saved = start if args.resume and start else None
    loss_val = float("nan")
    with open(metrics_path, "a") as mf:
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            batch = data.next_batch()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with engine.autocast():
                out = engine.model(**batch)
            loss = _compute_loss(engine.model, out, batch)
            if not torch.isfinite(loss.detach()).all():
                print(f"vlfast train: warning: non-finite loss at step {step}", file=sys.stderr)
            engine.backward(loss)
            engine.step()
            if ema is not None:
                ema.update(engine.model, step)
            loss_val = float(loss.detach().float())
            dt = time.perf_counter() - t0
            sps = args.batch_size / dt if dt > 0 else float("inf")
            rec = {"step": step, "loss": loss_val, "samples_per_s": sps, "lr": engine.lr, "time": time.time(),
                   "step_time_s": dt}
            if kind != "synthetic":
                rec["skipped_images"] = data.skipped
                rec["data_position"] = data.position
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            if tb is not None:
                tb.add_scalar("loss", loss_val, step)
                tb.add_scalar("samples_per_s", sps, step)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_val:.4f}", sps=f"{sps:.1f}")
                bar.update(1)
            if args.save_every and step % args.save_every == 0:
                save(step)
                last_saved = step
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    if last_saved != total_steps:
        save(total_steps)
    skipped = f", skipped {data.skipped} unreadable image(s)" if data.skipped else ""
    print(f"vlfast train: done: {total_steps} steps, final loss {loss_val:.4f}{skipped}; "
          f"checkpoint {os.path.join(ckpt.ckpt_root(args.out), f'step_{total_steps}')}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args, parser)
    except (TrainError, DataError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
