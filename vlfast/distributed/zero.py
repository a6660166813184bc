"""DeepSpeed integration: config builder, momentum-encoder hooks and shard-local momentum/EMA updates.

The shard primitives (:func:`vlfast.sharding.zero3_momentum_update_` and friends) sit
below :mod:`vlfast.nn`; this module composes them with DeepSpeed and vlfast's modules.
Under ZeRO-3 each rank updates its own momentum-encoder slices directly
(:func:`zero3_momentum_update_`, one fused :func:`vlfast.ops.ema_update_` call, with no
all-gather and no broadcast).  The baseline it replaces,
:func:`gathered_momentum_update_` (DeepSpeedExamples' ``moving_average``), gathers
every parameter pair in full on every rank.

Low-precision (bf16/fp16) momentum weights are averaged into an fp32 master copy
(``master <- m * master + (1 - m) * online``) which is then copied into the momentum
weights, so updates far below bf16's resolution (``(1 - m) * |online - momentum|``
with ``m = 0.999``) accumulate instead of being rounded away.

Trainer usage::

    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    momenta = attach_zero_momentum(engine.module)        # one ZeroMomentum per MomentumEncoder
    for batch in loader:
        engine.backward(engine(batch)); engine.step()
        for zm in momenta:
            zm.update(m)                                  # instead of MomentumEncoder.update
    # checkpoints: save/load ``[zm.state_dict() for zm in momenta]`` per rank
    # (the masters are this rank's shards), next to the engine's checkpoint.

Parameter offload (``offload_param``) to NVMe is not supported (the shards must be
resident tensors).
"""

import copy
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .. import _validation as check
from ..nn.ema import MomentumEncoder
from ..sharding import check_pairs, is_zero3_param, zero3_momentum_update_

__all__ = [
    "deepspeed_config",
    "zero3_momentum_update_",
    "gathered_momentum_update_",
    "ZeroMomentum",
    "attach_zero_momentum",
    "register_external_parameters",
    "hoist_momentum_updates",
    "remove_cpu_shm_segments",
    "is_zero3_param",
]

_PRECISIONS = ("fp32", "bf16", "fp16")


# --------------------------------------------------------------------------- config

def _deep_merge(base: Dict[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """``override`` wins; nested dicts are merged; a value ``"auto"`` keeps ``base``'s."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, str) and v == "auto" and k in out:
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _default_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _on_cpu() -> bool:
    acc = os.environ.get("DS_ACCELERATOR")
    if acc is not None:
        return acc == "cpu"
    return not torch.cuda.is_available()


def deepspeed_config(zero_stage: int, precision: str = "fp32", batch_size: Optional[int] = None,
                     grad_accum: int = 1, lr: float = 1e-4, weight_decay: float = 0.05,
                     world_size: Optional[int] = None,
                     user_config: Union[None, str, os.PathLike, Mapping[str, Any]] = None, *,
                     betas=(0.9, 0.999), eps: float = 1e-8, gradient_clipping: Optional[float] = None,
                     device: Optional[str] = None) -> Dict[str, Any]:
    """A DeepSpeed config dict for vlfast training.

    Args:
        zero_stage: ZeRO stage, 0-3.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (fp16 is refused on CPU, which
            DeepSpeed's CPU accelerator does not support).
        batch_size: micro batch per rank (``train_micro_batch_size_per_gpu``); required.
        grad_accum: gradient accumulation steps.
        lr, weight_decay, betas, eps: AdamW (``torch_adam: true``) hyperparameters.
        world_size: number of ranks (default: the process group's, else ``$WORLD_SIZE``, else 1).
        user_config: a dict or a path to a JSON file; deep-merged over the generated
            config (its keys win; a value ``"auto"`` keeps the generated one).
        gradient_clipping: written when given.
        device: ``"cpu"``/``"cuda"`` for the fp16 check (default: ``$DS_ACCELERATOR``,
            else whether CUDA is available).

    ``train_batch_size = batch_size * grad_accum * world_size``.

    Raises:
        ValueError: before any process group is touched, for a stage outside 0-3, an
            unknown precision, fp16 on CPU, a non-positive batch size / accumulation /
            world size, or a user config whose batch sizes, ZeRO stage or precision
            sections contradict the arguments or each other.
    """
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    on_cpu = _on_cpu() if device is None else str(device).startswith("cpu")
    if precision == "fp16" and on_cpu:
        raise ValueError("precision 'fp16' is not supported by DeepSpeed on CPU; use 'bf16' or 'fp32'")
    if batch_size is None:
        raise ValueError("batch_size (micro batch per rank) is required")
    batch_size = check.positive_int("batch_size", batch_size)
    grad_accum = check.positive_int("grad_accum", grad_accum)
    world_size = check.positive_int("world_size", _default_world_size() if world_size is None else world_size)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    zero: Dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update({"reduce_bucket_size": 5e7, "contiguous_gradients": True})
    if zero_stage >= 2:
        zero.update({"overlap_comm": False, "allgather_bucket_size": 5e7, "reduce_scatter": True})
    if zero_stage == 3:
        zero.update({
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    cfg: Dict[str, Any] = {
        "train_batch_size": batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay, "torch_adam": True}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if gradient_clipping is not None:
        cfg["gradient_clipping"] = float(gradient_clipping)

    if user_config is None:
        return cfg
    if isinstance(user_config, (str, os.PathLike)):
        with open(user_config) as f:
            user_config = json.load(f)
    if not isinstance(user_config, Mapping):
        raise ValueError(f"user_config must be a dict or a JSON file path, got {type(user_config).__name__}")
    user_stage = user_config.get("zero_optimization", {}).get("stage", "auto")
    if user_stage != "auto" and user_stage != zero_stage:
        raise ValueError(f"user config's zero_optimization.stage={user_stage} contradicts zero_stage={zero_stage}")
    out = _deep_merge(cfg, user_config)

    tbs, mbs, ga = (out.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                          "gradient_accumulation_steps"))
    for name, v in (("train_batch_size", tbs), ("train_micro_batch_size_per_gpu", mbs),
                    ("gradient_accumulation_steps", ga)):
        check.positive_int(f"user config's {name}", v)
    if tbs != mbs * ga * world_size:
        raise ValueError(
            f"user config's batch sizes are inconsistent: train_batch_size={tbs} != "
            f"train_micro_batch_size_per_gpu={mbs} * gradient_accumulation_steps={ga} * world_size={world_size}")
    bf16 = bool(out.get("bf16", {}).get("enabled", False))
    fp16 = bool(out.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise ValueError("user config enables both bf16 and fp16")
    got = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    if got != precision:
        raise ValueError(f"user config's precision sections give {got!r} but precision={precision!r}")
    return out


# --------------------------------------------------------------------------- CPU comm clean-up

def remove_cpu_shm_segments(port, ranks: Sequence[int], addr: str = "127.0.0.1") -> List[str]:
    """Unlink the ``/dev/shm`` segments of DeepSpeed's CPU all-reduce for the run at ``addr:port``.

    On CPU each rank creates ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
    (about 69 MB of RAM-backed shared memory) and DeepSpeed 0.19 never unlinks it, so
    every run would leak one per rank until the machine runs out of memory.  Call it once
    the ranks are past their start-up (the ranks open each other's segments by name
    there; a mapped segment stays valid after the unlink), e.g. at the end of a run or
    from a launcher after its ranks exited.  Returns the removed paths.
    """
    if not hasattr(os, "getuid"):  # pragma: no cover - not POSIX
        return []
    removed = []
    for rank in ranks:
        path = os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{int(rank)}")
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


@torch.no_grad()
def gathered_momentum_update_(momentum_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor],
                              m: float) -> None:
    """Baseline: DeepSpeedExamples' ``moving_average``, one full gather per parameter pair.

    For each pair, both parameters are gathered (``deepspeed.zero.GatheredParameters``;
    the momentum one with ``modifier_rank=0`` so that the update is written back to the
    shards), ``momentum.copy_(lerp(online, momentum, m))`` runs on the full tensors,
    and the momentum parameter is broadcast from rank 0 and re-partitioned.
    """
    import deepspeed

    m = check.decay(m)
    mom, onl = check_pairs(momentum_params, online_params)
    for p, q in zip(mom, onl):
        if not is_zero3_param(p):
            p.data.copy_(torch.lerp(q.data.to(p.dtype), p.data, m))
            continue
        with deepspeed.zero.GatheredParameters([q], enabled=is_zero3_param(q)):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(torch.lerp(q.data.to(p.dtype), p.data, m))


class ZeroMomentum:
    """Momentum/EMA update of ``momentum_module`` towards ``online_module`` on local shards.

    Holds the fp32 master copies between calls of :func:`zero3_momentum_update_`.
    The parameters are paired in ``parameters()`` order (the momentum module is a copy
    of the online one).  ``state_dict()`` holds this rank's masters (per-rank state:
    save it per rank, next to the DeepSpeed checkpoint).
    """

    def __init__(self, momentum_module: nn.Module, online_module: nn.Module, *, backend: Optional[str] = None):
        self.momentum_module = momentum_module
        self.online_module = online_module
        self.backend = backend
        n1 = len(list(momentum_module.parameters()))
        n2 = len(list(online_module.parameters()))
        if n1 != n2:
            raise ValueError(f"momentum module has {n1} parameters but the online module has {n2}")
        self.master: Optional[List[Optional[torch.Tensor]]] = None

    def update(self, m: float) -> None:
        self.master = zero3_momentum_update_(list(self.momentum_module.parameters()),
                                             list(self.online_module.parameters()), m,
                                             master=self.master, backend=self.backend)

    def state_dict(self) -> Dict[str, Any]:
        return {"master": None if self.master is None else
                [None if t is None else t.detach().clone() for t in self.master]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        master = state["master"]
        if master is not None:
            n = len(list(self.momentum_module.parameters()))
            if len(master) != n:
                raise ValueError(f"state has {len(master)} masters for {n} parameters")
            master = [None if t is None else t.detach().clone() for t in master]
        self.master = master


def register_external_parameters(model: nn.Module) -> int:
    """Tell ZeRO-3 about parameters used outside their own module's forward; returns how many.

    ZeRO-3 gathers a module's parameters around that module's forward only.  A module that
    reads another module's parameter (ALBEF's ITM reads the ITC's ``temp``; a logit scale
    or temperature owned by a loss module and read by the model) declares it with a
    method ``zero3_external_parameters() -> [(user_module, parameter), ...]``; this
    registers each pair with ``deepspeed.zero.register_external_parameter`` so that the
    parameter is gathered for the user's forward too (persistent small parameters are
    resident anyway, but not with ``stage3_param_persistence_threshold: 0``).  Call it
    before or after ``deepspeed.initialize``; the vlfast trainer does under ZeRO-3.
    """
    import deepspeed

    n = 0
    for mod in model.modules():
        declare = getattr(mod, "zero3_external_parameters", None)
        if declare is None:
            continue
        for user, param in declare():
            if not isinstance(user, nn.Module) or not isinstance(param, nn.Parameter):
                raise TypeError(f"{type(mod).__name__}.zero3_external_parameters() must give (nn.Module, "
                                f"nn.Parameter) pairs, got ({type(user).__name__}, {type(param).__name__})")
            deepspeed.zero.register_external_parameter(user, param)
            n += 1
    return n


def hoist_momentum_updates(model: nn.Module):
    """Run ``model``'s momentum update in a pre-forward hook that precedes ZeRO-3's own.

    vlfast's MoCo v3 and ALBEF update their momentum encoders inside ``forward`` (as the
    papers' code does).  Under ZeRO-3 that is too late once DeepSpeed has a parameter trace:
    its root pre-forward hook has already started asynchronous all-gathers (prefetches) of
    the momentum parameters from their *old* shards, and the momentum forward would use
    weights one update behind (and on CUDA the gather would race with the shard update).
    This registers ``model.momentum_update(*args, **kwargs)`` (the forward's arguments) as
    a forward pre-hook with ``prepend=True`` and sets ``model._momentum_hoisted`` so the
    forward skips its own update.  The online weights do not change between the optimizer
    step and the next forward, so the result is the same as the in-forward update.
    Returns the hook handle (``handle.remove()`` and ``model._momentum_hoisted = False`` undo it).

    Raises:
        TypeError: ``model`` has no ``momentum_update`` method.
    """
    update = getattr(model, "momentum_update", None)
    if not callable(update):
        raise TypeError(f"{type(model).__name__} has no momentum_update(*forward_args) method to hoist")

    def hook(module, args, kwargs):
        with torch.no_grad():
            module.momentum_update(*args, **kwargs)

    model._momentum_hoisted = True
    return model.register_forward_pre_hook(hook, prepend=True, with_kwargs=True)


def _param_signature(module: nn.Module):
    return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in module.named_parameters()]


def attach_zero_momentum(model: nn.Module, *, pairs: Optional[Mapping[str, str]] = None,
                         backend: Optional[str] = None) -> List[ZeroMomentum]:
    """One :class:`ZeroMomentum` per :class:`vlfast.nn.MomentumEncoder` submodule of ``model``.

    The online network of each momentum encoder is found as: ``pairs[name]`` (submodule
    names, e.g. ``{"momentum_encoder": "base_encoder"}``) when given, else the sibling
    named like it without the ``_m`` suffix (ALBEF's ``visual_encoder_m``), else
    MoCo's ``momentum_encoder`` -> ``base_encoder``, else the unique other submodule
    with the same parameter names and shapes.  Call ``update(m)`` on each after
    ``engine.step()`` instead of ``MomentumEncoder.update``.  A :class:`vlfast.nn.EMA`
    keeps its own (unpartitioned) copy; use ``ZeroMomentum(ema.module, model)`` for it.

    Raises:
        ValueError: an online network cannot be found unambiguously.
    """

    modules = dict(model.named_modules())
    out = []
    for name, mod in modules.items():
        if not isinstance(mod, MomentumEncoder):
            continue
        parent, _, leaf = name.rpartition(".")
        prefix = parent + "." if parent else ""
        candidates = []
        if pairs and name in pairs:
            candidates = [pairs[name]]
        elif leaf.endswith("_m") and prefix + leaf[:-2] in modules:
            candidates = [prefix + leaf[:-2]]
        elif leaf == "momentum_encoder" and prefix + "base_encoder" in modules:
            candidates = [prefix + "base_encoder"]
        else:
            sig = _param_signature(mod.module)
            candidates = [n for n, x in modules.items()
                          if x is not mod and x is not mod.module and not n.startswith(name + ".")
                          and not isinstance(x, MomentumEncoder) and _param_signature(x) == sig]
        if len(candidates) != 1 or candidates[0] not in modules:
            raise ValueError(f"cannot find the online network of momentum encoder {name!r} "
                             f"(candidates: {candidates}); pass pairs={{{name!r}: 'online_name'}}")
        out.append(ZeroMomentum(mod.module, modules[candidates[0]], backend=backend))
    return out
