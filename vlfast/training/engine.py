"""The engines of ``vlfast train`` behind one interface (:class:`Engine`), and the user-facing error.

* :class:`TorchEngine` -- one process, AdamW, autocast / GradScaler (this module);
* :class:`vlfast.training.deepspeed_engine.DeepSpeedEngine` -- DeepSpeed ZeRO 0-3 (``--zero``);
* :class:`vlfast.training.fsdp.FSDPEngine` -- PyTorch FSDP2 (``--fsdp``).

:func:`vlfast.training.trainer.make_engine` picks one from the command line.  An engine writes its own state into a
checkpoint folder under the names :class:`vlfast.training.checkpoint.StepFolder` gives it; the
folder itself (atomic rename, ``latest``, the trainer state) belongs to
:class:`vlfast.training.checkpoint.CheckpointManager`.
"""

import contextlib
import os

import torch

from . import checkpoint as ckpt
from .optim import param_groups, set_lr


class TrainError(Exception):
    """A user-facing error: printed as one ``vlfast train: error: ...`` line."""


class Engine:
    """What the :class:`vlfast.training.trainer.Trainer` needs from an optimisation engine.

    ``model`` is the module to call for the forward (a wrapper under DeepSpeed), ``module`` the
    network itself; ``autocast()`` the forward context; ``backward(loss, boundary=True)`` (``boundary``
    False for every micro-batch of an accumulated step but the last); ``step()`` the optimizer step
    and zeroed gradients; ``set_lr(v)``; ``save(folder)`` / ``load(folder)`` with a
    :class:`~vlfast.training.checkpoint.StepFolder` (collective with several ranks); ``barrier()``;
    ``rank`` / ``world_size``.
    """

    model: torch.nn.Module
    module: torch.nn.Module
    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1

    def autocast(self):
        """``torch.autocast`` in bf16 / fp16 for ``--precision bf16`` / ``fp16`` (nothing for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        raise NotImplementedError

    def call(self, method: str, **kwargs):
        """``module.<method>(**kwargs)`` run the way the engine runs a forward (a model's ``accum_features`` /
        ``accum_loss`` for ``--accum-steps``): through ``model(**kwargs)`` with the module's ``forward`` set to
        ``<method>`` for the call (an instance attribute, removed afterwards), so that the forward hooks run --
        FSDP2's root unshards its parameters, ZeRO-3 resets its step and fetches the root's parameters,
        DeepSpeed registers its backward prologue -- as they do for a forward."""
        self.module.forward = getattr(self.module, method)
        try:
            return self.model(**kwargs)
        finally:
            del self.module.forward

    def step(self) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, value: float) -> None:
        """The learning rate of the next :meth:`step` (every parameter group)."""
        set_lr(self.optimizer, value)

    def save(self, folder: "ckpt.StepFolder") -> None:
        raise NotImplementedError

    def load(self, folder: "ckpt.StepFolder") -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ per-rank state (several ranks)
    def save_rank_state(self, folder: "ckpt.StepFolder") -> None:
        """This rank's random streams (several ranks: each has its own) and the fp32 masters of its
        low-precision momentum weights (per-rank state: they average this rank's shards)."""
        if self.world_size > 1:
            torch.save(ckpt.rng_state(), folder.rng(self.rank))
        masters = {n: s for n, s in ((n, e.master_state()) for n, e in momentum_encoders(self.module))
                   if s is not None}
        if masters:
            torch.save(masters, folder.momentum_masters(self.rank))

    def load_momentum_masters(self, folder: "ckpt.StepFolder", shard=lambda p: p) -> None:
        """Restore what :meth:`save_rank_state` saved of the momentum masters (none saved: fp32 weights,
        nothing to restore); ``shard(p)`` is the tensor of parameter ``p`` the master averages (its device)."""
        path = folder.momentum_masters(self.rank)
        masters = ckpt.load_file(path) if os.path.isfile(path) else {}
        encoders = dict(momentum_encoders(self.module))
        for name in masters:
            if name not in encoders:
                raise TrainError(f"checkpoint {folder.path} has momentum masters for {name!r}, which this model "
                                 "does not have")
        for name, enc in encoders.items():
            state = masters.get(name)
            if state is not None:
                ref = [shard(p) for p in enc.module.parameters()]
                state = [None if t is None else t.to(r.device) for t, r in zip(state, ref)]
            enc.load_master_state(state)


def default_rank_env() -> None:
    """The launcher's variables for a lone process started without one: rank 0 of 1 on 127.0.0.1, a free
    ``MASTER_PORT`` (what ``vlfast train --nproc`` and torchrun set for each rank is left as it is)."""
    from ..comm import free_port

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def momentum_encoders(module: torch.nn.Module):
    """``[(name, vlfast.nn.MomentumEncoder)]`` inside ``module``."""
    from vlfast.nn import MomentumEncoder

    return [(n, m) for n, m in module.named_modules() if isinstance(m, MomentumEncoder)]


class TorchEngine(Engine):
    """One process: AdamW over :func:`vlfast.training.optim.param_groups` (weight-decay exclusions),
    autocast for bf16 / fp16, a GradScaler for fp16 (CUDA only), global-norm gradient clipping."""

    def __init__(self, model: torch.nn.Module, *, lr: float, precision: str = "fp32", device=None,
                 weight_decay: float = 0.05, grad_clip: float = 0.0):
        self.model = self.module = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if precision == "fp16" and self.device.type != "cuda":
            raise TrainError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.precision = precision
        self.grad_clip = float(grad_clip)
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def backward(self, loss, boundary: bool = True):
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

    def state_dict(self) -> dict:
        sd = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save(self, folder):
        folder = ckpt.StepFolder(folder)
        torch.save(self.model.state_dict(), folder.model)
        torch.save(self.optimizer.state_dict(), folder.optimizer)
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), folder.scaler)

    def load(self, folder):
        folder = ckpt.StepFolder(folder)
        self.model.load_state_dict(ckpt.load_file(folder.model, map_location=self.device))
        self.optimizer.load_state_dict(ckpt.load_file(folder.optimizer, map_location=self.device))
        if self.scaler is not None and os.path.isfile(folder.scaler):
            self.scaler.load_state_dict(ckpt.load_file(folder.scaler, map_location=self.device))
