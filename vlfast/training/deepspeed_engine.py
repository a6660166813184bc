"""``vlfast train --zero {0,1,2,3}``: :class:`DeepSpeedEngine`, DeepSpeed ZeRO behind the :class:`Engine` interface.

* ``deepspeed.initialize`` with the config of :func:`vlfast.distributed.zero.deepspeed_config`
  (``--deepspeed-config FILE`` merged in; ``--zero 0`` is DeepSpeed with ZeRO off), AdamW over
  :func:`vlfast.training.optim.param_groups`; the learning rate is set on the optimizer's groups
  every step (:meth:`Engine.set_lr`), DeepSpeed's scheduler is not used.
* ``--accum-steps K``: DeepSpeed's own accumulation (``gradient_accumulation_steps=K``, the micro
  batch a K-th of the rank's batch) with the boundary set by the trainer before each backward
  (``set_gradient_accumulation_boundary``, DeepSpeed's documented pattern for a single ``step()``
  after the K backwards); the loss is not divided by K here (``scale_wrt_gas=False``): the trainer's
  accumulation scheme scales it as the single-process engine's does.
* ZeRO-3: the models' momentum updates are hoisted before ZeRO-3's parameter prefetch
  (:func:`vlfast.distributed.zero.hoist_momentum_updates`); DeepSpeed's workarounds live in the
  version-guarded :mod:`vlfast.distributed.compat`.
* Checkpoints: DeepSpeed's own (``save_checkpoint`` under the :class:`StepFolder` tag ``deepspeed``,
  every rank its shards), plus the full weights in ``model.pt`` (gathered under ZeRO-3, one parameter
  at a time) and the per-rank state of :meth:`Engine.save_rank_state`.
"""

import os

import torch

from . import checkpoint as ckpt
from .engine import Engine, TrainError, default_rank_env
from .optim import param_groups


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with the config of :func:`vlfast.distributed.zero.deepspeed_config`.

    ``model`` is the DeepSpeed engine (call it for the forward); ``module`` the wrapped network;
    ``batch_size`` this rank's batch of one optimizer step (``accum_steps`` micro-batches).
    ``save``/``load`` go through ``save_checkpoint``/``load_checkpoint`` (every rank must call them).
    """

    def __init__(self, model: torch.nn.Module, *, zero_stage: int, lr: float, precision: str = "fp32",
                 batch_size: int, world_size: int = 1, device=None, user_config=None, weight_decay: float = 0.05,
                 grad_clip: float = 0.0, accum_steps: int = 1):
        import deepspeed

        from vlfast.distributed import compat
        from vlfast.distributed.zero import deepspeed_config

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if batch_size % accum_steps:
            raise TrainError(f"this rank's batch of {batch_size} is not divisible by --accum-steps {accum_steps}")
        try:
            cfg = deepspeed_config(zero_stage, precision, batch_size=batch_size // accum_steps,
                                   grad_accum=accum_steps, lr=lr, weight_decay=weight_decay, world_size=world_size,
                                   user_config=user_config, device=self.device.type,
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
        compat.check_version()
        with compat.zero_dim_broadcast():
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                                    config=cfg)
        self.module = model
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()

    def backward(self, loss, boundary: bool = True):
        self.model.set_gradient_accumulation_boundary(boundary)
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self):
        self.model.set_gradient_accumulation_boundary(True)
        self.model.step()

    def barrier(self):
        torch.distributed.barrier()

    def save(self, folder):
        """DeepSpeed checkpoint (``<folder>/deepspeed``, per-rank shards) plus the full weights in
        ``<folder>/model.pt`` (gathered under ZeRO-3), as :class:`TorchEngine` writes them."""
        folder = ckpt.StepFolder(folder)
        self.model.save_checkpoint(folder.path, tag=folder.DEEPSPEED)
        self.save_rank_state(folder)
        sd = full_state_dict(self.module, keep=self.rank == 0)  # every rank (collective under ZeRO-3)
        if self.rank == 0:
            torch.save(sd, folder.model)

    def load(self, folder):
        from vlfast.distributed import compat

        folder = ckpt.StepFolder(folder)
        try:
            loads = compat.checkpoint_loads(self.model, ckpt.load_file)
        except compat.DeepSpeedCompatError as exc:
            raise TrainError(str(exc)) from None
        with loads:
            path, _ = self.model.load_checkpoint(folder.path, tag=folder.DEEPSPEED, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"no DeepSpeed checkpoint in {folder.path}")
        # on the device of the weights they average (this rank's ZeRO-3 shard)
        self.load_momentum_masters(folder, shard=lambda p: getattr(p, "ds_tensor", p))


def full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict:
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


def init_distributed(device: torch.device) -> None:
    """Process group for DeepSpeed (gloo on the CPU, NCCL on CUDA); a lone process gets a 1-rank group."""
    import logging

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    default_rank_env()
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def release_cpu_shm() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment (DeepSpeed leaves it in /dev/shm)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not torch.cuda.is_available():
        from vlfast.distributed.zero import remove_cpu_shm_segments

        remove_cpu_shm_segments(os.environ.get("MASTER_PORT", ""), [torch.distributed.get_rank()],
                                os.environ.get("MASTER_ADDR", ""))
