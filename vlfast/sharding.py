"""Shard primitives of ZeRO-3 (DeepSpeed) parameters: the layer between :mod:`vlfast.ops` and :mod:`vlfast.nn`.

Under ZeRO-3 every parameter is partitioned: ``param.data`` is empty and each rank
holds a flat slice ``param.ds_tensor`` (``param.ds_numel`` elements in all, padded so
that the ranks' slices have equal length).  A momentum (MoCo/ALBEF/BYOL) or EMA
update is elementwise, and the momentum network and the online network are
partitioned the same way, so each rank can update its own slices directly:
:func:`zero3_momentum_update_` does that in one fused :func:`vlfast.ops.ema_update_`
call, with no all-gather and no broadcast.

Low-precision (bf16/fp16) momentum weights are averaged into an fp32 master copy
(``master <- m * master + (1 - m) * online``) which is then copied into the momentum
weights, so updates far below bf16's resolution accumulate instead of being rounded away.

These functions read only the attributes DeepSpeed sets on a partitioned parameter
(``ds_tensor``, ``ds_numel``, ``ds_shape``, ``ds_status``, ``ds_persist``,
``ds_process_group``) and never import DeepSpeed; the engine integration (config,
gathered baseline, hooks) is :mod:`vlfast.distributed.zero`.
"""

from typing import List, Optional, Sequence

import torch

from . import _validation as check
from .comm import world_info
from .ops.ema import ema_update_

__all__ = ["is_zero3_param", "is_available", "shard_slice", "gather_full", "check_plain_shards", "check_pairs",
           "prefetched", "regather_", "zero3_momentum_update_", "is_dtensor", "local_tensor", "shard_spec",
           "full_from_local", "local_from_full", "local_shard_copy", "dtensor_momentum_update_"]

_HIGH = (torch.float32, torch.float64)


def is_zero3_param(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def is_available(p) -> bool:
    """Whether ZeRO-3 parameter ``p`` is gathered (``ds_status`` AVAILABLE)."""
    status = getattr(p, "ds_status", None)
    return status is not None and status.name == "AVAILABLE"


def _partition_rank(p) -> int:
    group = getattr(p, "ds_process_group", None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(group=group)
    return 0


def shard_slice(p, full_flat: torch.Tensor) -> torch.Tensor:
    """This rank's part of a flat full tensor in ``p.ds_tensor``'s layout (zero padding)."""
    size = p.ds_tensor.numel()
    start = _partition_rank(p) * size
    out = torch.zeros(size, dtype=full_flat.dtype, device=full_flat.device)
    n = max(0, min(size, full_flat.numel() - start))
    if n:
        out[:n] = full_flat[start:start + n]
    return out


def gather_full(p, shard: torch.Tensor) -> torch.Tensor:
    """The full tensor (``p.ds_shape``) from every rank's ``shard`` (``p.ds_tensor``'s layout)."""
    group = getattr(p, "ds_process_group", None)
    world = world_info(group)[1]
    flat = shard.reshape(-1)
    if world > 1:
        parts = [torch.empty_like(flat) for _ in range(world)]
        torch.distributed.all_gather(parts, flat.contiguous(), group=group)
        flat = torch.cat(parts)
    return flat[:p.ds_numel].view(tuple(p.ds_shape)).clone()


def check_plain_shards(params, what: str, *, write: bool = True) -> None:
    """Refuse ZeRO-3 parameters whose local shard ``p.ds_tensor`` is not a plain copy of their weights.

    ``params``: parameters, or ``(name, parameter)`` pairs (bare parameters are named ``#<index>``);
    plain (unpartitioned) ones are skipped.  ``what`` starts the message.  Raises a ValueError
    naming the parameter and the DeepSpeed option for

    * ZeRO++ quantized weights (``zero_quantized_nontrainable_weights``): a frozen parameter's
      ``ds_tensor`` holds int8 codes (scales in ``ds_tensor.ds_quant_scale``), not weights;
    * with ``write`` (the caller writes ``ds_tensor``): ZeRO++ hierarchical partitioning (hpZ,
      ``zero_hpz_partition_size > 1``), where DeepSpeed gathers the parameter from its secondary
      partition ``p.ds_secondary_tensor``, which a write into ``ds_tensor`` leaves stale.
    """
    for i, item in enumerate(params):
        name, p = (repr(item[0]), item[1]) if isinstance(item, tuple) else (f"#{i}", item)
        if not is_zero3_param(p):
            continue
        if hasattr(p.ds_tensor, "ds_quant_scale"):
            raise ValueError(
                f"{what}: ZeRO-3 parameter {name} is stored quantized (ZeRO++ zero_quantized_nontrainable_weights: "
                "its shard ds_tensor holds int8 codes, not weights); disable zero_quantized_nontrainable_weights")
        if write and getattr(p, "ds_secondary_tensor", None) is not None:
            raise ValueError(
                f"{what}: ZeRO-3 parameter {name} has a ZeRO++ hpZ secondary partition (zero_hpz_partition_size > 1): "
                "DeepSpeed gathers it from ds_secondary_tensor, which writing its shard ds_tensor would leave "
                "stale; set zero_hpz_partition_size to 1")


def _stamp(master: torch.Tensor, key: torch.Tensor) -> None:
    """Remember which weights ``master`` was last written to (storage and version counter)."""
    master._vlfast_written = (key.data_ptr(), key._version)


def _fresh(master: torch.Tensor, key: torch.Tensor) -> bool:
    """False when the weights were replaced or written in place (``load_state_dict``, a checkpoint
    load, a pretrained copy) since ``master`` was copied into them: the master is then stale and
    is re-created from the weights.  A master without a record (just loaded) is trusted."""
    written = getattr(master, "_vlfast_written", None)
    return written is None or written == (key.data_ptr(), key._version)


def check_pairs(momentum_params, online_params):
    momentum_params, online_params = list(momentum_params), list(online_params)
    if len(momentum_params) != len(online_params):
        raise ValueError(f"{len(momentum_params)} momentum parameters but {len(online_params)} online ones")
    return momentum_params, online_params


@torch.no_grad()
def zero3_momentum_update_(momentum_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor],
                           m: float, *, master: Optional[List[Optional[torch.Tensor]]] = None,
                           backend: Optional[str] = None) -> List[Optional[torch.Tensor]]:
    """``momentum <- m * momentum + (1 - m) * online`` on each rank's local shards.

    ``momentum_params``/``online_params``: parallel sequences of parameters, either all
    ZeRO-3 partitioned (same partitioning: the same shapes and process group) or all
    plain (ZeRO 0-2 / no DeepSpeed: replicated, updated whole).

    * Partitioned: ``ds_tensor`` (the local flat shard) of each momentum parameter is
      averaged with the online parameter's ``ds_tensor``; no communication.
    * Persistent ZeRO-3 parameters (``ds_persist``, below
      ``stage3_param_persistence_threshold``) whose full data is resident are updated
      whole (the data is replicated on every rank) and their shard is refreshed from it.
    * Plain parameters: their data is updated.

    ``master``: the fp32 master copies returned by the previous call (``None`` on the
    first call: created from the current momentum weights).  A master whose weights were
    written by something else since (``load_state_dict``, a checkpoint load: detected by
    their storage and version counter) is re-created from them.  Entries are ``None`` for
    fp32/fp64 momentum tensors, which are updated in place directly.  All updates are
    one :func:`vlfast.ops.ema_update_` call.  Returns the (new) master list.
    """
    m = check.decay(m)
    mom, onl = check_pairs(momentum_params, online_params)
    check_plain_shards(mom, "zero3_momentum_update_")
    check_plain_shards(onl, "zero3_momentum_update_", write=False)
    if master is None:
        master = [None] * len(mom)
    elif len(master) != len(mom):
        raise ValueError(f"master has {len(master)} entries for {len(mom)} parameters")
    else:
        master = list(master)

    targets, sources, post = [], [], []
    for i, (p, q) in enumerate(zip(mom, onl)):
        z3p, z3q = is_zero3_param(p), is_zero3_param(q)
        if z3p != z3q:
            raise ValueError(f"parameter {i}: one of the pair is ZeRO-3 partitioned and the other is not")
        low = p.dtype not in _HIGH
        if not z3p:
            if tuple(p.shape) != tuple(q.shape):
                raise ValueError(f"parameter {i}: shape {tuple(p.shape)} vs online {tuple(q.shape)}")
            if low:
                if master[i] is None or master[i].shape != p.shape or not _fresh(master[i], p):
                    master[i] = p.data.float()
                targets.append(master[i])
                post.append((p.data, master[i], p))
            else:
                master[i] = None
                targets.append(p.data)
            sources.append(q.data)
            continue
        if tuple(p.ds_shape) != tuple(q.ds_shape) or p.ds_tensor.numel() != q.ds_tensor.numel():
            raise ValueError(f"parameter {i}: momentum and online parameters are partitioned differently "
                             f"({tuple(p.ds_shape)}/{p.ds_tensor.numel()} vs "
                             f"{tuple(q.ds_shape)}/{q.ds_tensor.numel()})")
        shard_n, full_n = p.ds_tensor.numel(), p.ds_numel
        full = bool(getattr(p, "ds_persist", False)) and is_available(p) and p.data.numel() == full_n
        if full:
            if is_available(q) and q.data.numel() == full_n:
                q_flat = q.data.view(-1)
            else:  # e.g. re-partitioned by a checkpoint load and not used yet: gather it (it is small)
                q_flat = gather_full(q, q.ds_tensor).view(-1)
            flat = p.data.view(-1)
            if low:
                mst = master[i] if master[i] is not None and _fresh(master[i], p.ds_tensor) else None
                if mst is None or mst.numel() != full_n:
                    if mst is not None and mst.numel() == shard_n:  # shard masters -> full: every rank's
                        new = gather_full(p, mst).reshape(-1)
                    else:
                        new = flat.float()
                    master[i] = mst = new
                targets.append(mst)
            else:
                master[i] = None
                targets.append(flat)
            sources.append(q_flat)
            post.append(("full", p, master[i]))
        else:
            if low:
                mst = master[i] if master[i] is not None and _fresh(master[i], p.ds_tensor) else None
                if mst is not None and mst.numel() != shard_n:
                    if mst.numel() == full_n:  # was resident in full; keep the master's slice
                        mst = shard_slice(p, mst)
                    else:
                        mst = None
                if mst is None:
                    mst = p.ds_tensor.float()
                master[i] = mst
                targets.append(mst)
                post.append((p.ds_tensor, mst, p.ds_tensor))
            else:
                master[i] = None
                targets.append(p.ds_tensor)
            sources.append(q.ds_tensor)
    if targets:
        ema_update_(targets, sources, m, backend=backend)
    for item in post:
        if isinstance(item[0], str):
            _, p, mst = item
            if mst is not None:
                p.data.copy_(mst.view(p.data.shape))
            p.ds_tensor.copy_(shard_slice(p, p.data.reshape(-1)))
            if mst is not None:
                _stamp(mst, p.ds_tensor)
        else:
            dst, src, key = item
            dst.copy_(src.view(dst.shape))
            _stamp(src, key)
    return master


def _full_resident(p) -> bool:
    """Whether the full data of ZeRO-3 parameter ``p`` is resident (gathered) on this rank."""
    status = getattr(p, "ds_status", None)
    return status is not None and status.name == "AVAILABLE" and p.data.numel() == p.ds_numel


def prefetched(params):
    """ZeRO-3 momentum parameters that are not persistent but whose full data is resident
    (prefetched for the coming forward, or kept by ``stage3_max_reuse_distance``): the
    shard-local update alone would leave that full copy stale for the forward."""
    return [p for p in params if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
            and _full_resident(p)]


def regather_(params) -> None:
    """Refresh the resident full data of ZeRO-3 ``params`` from every rank's (updated) shard:
    one all_gather of their concatenated shards, so the full copies equal what ZeRO-3 would
    gather (the other ranks' parts come from their fp32 masters, which only they hold)."""
    if not params:
        return
    group = getattr(params[0], "ds_process_group", None)
    flat = torch.cat([p.ds_tensor.reshape(-1) for p in params])
    world = torch.distributed.get_world_size(group=group) if torch.distributed.is_initialized() else 1
    parts = [torch.empty_like(flat) for _ in range(world)]
    if world > 1:
        torch.distributed.all_gather(parts, flat, group=group)
    else:
        parts = [flat]
    offset = 0
    for p in params:
        size = p.ds_tensor.numel()
        full = torch.cat([part[offset:offset + size] for part in parts])[:p.ds_numel]
        p.data.copy_(full.view(p.data.shape))
        offset += size


# --------------------------------------------------------------------------- FSDP2 (DTensor) shards
# PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a DTensor sharded along
# dim 0 over the data-parallel mesh (``Shard(0)``, torch.chunk's split: the last ranks may hold fewer rows,
# or none); ``p.to_local()`` is this rank's rows, a view of FSDP's sharded storage, so an in-place write
# there is what FSDP all-gathers next.  A momentum network and its online network sharded the same way
# have equal local shapes, and the elementwise update runs on the local shards with no communication.
# Inside an FSDP2 forward the parameters of the units being run are swapped for plain unsharded tensors
# (writes to them are lost at the reshard), so these updates must run outside the forward (or in a
# pre-forward hook that precedes FSDP's: vlfast.training.fsdp.shard_model hoists the models' updates).

def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 sharded parameter)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of DTensor ``t`` (a view: in-place writes reach ``t``), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_spec(t) -> tuple:
    """``(mesh, placements, global shape, global stride)`` of DTensor ``t``: what :func:`full_from_local`
    and :func:`local_from_full` need to rebuild it from a local shard or a full tensor."""
    return t.device_mesh, tuple(t.placements), tuple(t.shape), tuple(t.stride())


def full_from_local(local: torch.Tensor, spec: tuple) -> torch.Tensor:
    """The full tensor from every rank's ``local`` shard laid out as ``spec`` (collective over its mesh)."""
    from torch.distributed.tensor import DTensor

    mesh, placements, shape, stride = spec
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride).full_tensor()


def local_from_full(full: torch.Tensor, spec: tuple) -> torch.Tensor:
    """This rank's shard of ``full`` (the same full tensor on every rank) in ``spec``'s layout: a local
    slice, no communication."""
    from torch.distributed.tensor import distribute_tensor

    mesh, placements, shape, _ = spec
    if tuple(full.shape) != tuple(shape):
        raise ValueError(f"full tensor of shape {tuple(full.shape)} for a sharded tensor of shape {tuple(shape)}")
    return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()


def _fsdp_classes(model) -> dict:
    """``{module: its class before fully_shard}`` for every FSDP2 module of ``model`` (fully_shard gives
    each one a class ``FSDP<Name>`` deriving from ``(FSDPModule, <Name>)``)."""
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for mod in model.modules():
        cls = type(mod)
        if isinstance(mod, FSDPModule):
            orig = [b for b in cls.__bases__ if b is not FSDPModule]
            if len(orig) != 1:
                raise TypeError(f"cannot tell the class under FSDP2's {cls.__name__} (bases {cls.__bases__})")
            out[mod] = orig[0]
    return out


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def local_shard_copy(model: torch.nn.Module):
    """A deep copy of FSDP2-sharded ``model`` whose every DTensor parameter is a plain parameter holding a
    clone of this rank's shard; returns ``(copy, specs)`` with ``specs`` ``{parameter name:``
    :func:`shard_spec` ``}``.  The copy has the model's own classes, buffers and state-dict hooks, but none
    of FSDP's state or hooks (FSDP2 refuses ``copy.deepcopy``): it stores shard-local averages (an EMA),
    it is not a module to run."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    classes = _fsdp_classes(model)
    memo, specs = {}, {}
    for name, p in model.named_parameters():
        if is_dtensor(p):
            specs[name] = shard_spec(p)
            memo[id(p)] = torch.nn.Parameter(p.to_local().detach().clone(), requires_grad=p.requires_grad)
    for mod in classes:
        for attr in _HOOK_DICTS:  # FSDP's hooks (bound methods of its state) are not copied
            hooks = mod.__dict__.get(attr)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
        for key, value in mod.__dict__.items():  # FSDP's composable-API state and registry
            if key.startswith("__composable_api"):
                memo[id(value)] = type(value)()
    fsdp_classes = {mod: type(mod) for mod in classes}
    try:
        for mod, cls in classes.items():
            mod.__class__ = cls
        out = copy.deepcopy(model, memo)
    finally:
        for mod, cls in fsdp_classes.items():
            mod.__class__ = cls
    leftover = [n for n, m in out.named_modules() if isinstance(m, FSDPModule)]
    if leftover:  # pragma: no cover - a torch whose FSDP2 keeps state where this does not look
        raise TypeError(f"the copy of the FSDP2 model still holds FSDP modules: {leftover[:3]}")
    return out, specs


@torch.no_grad()
def dtensor_momentum_update_(momentum_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor],
                             m: float, *, master: Optional[List[Optional[torch.Tensor]]] = None,
                             backend: Optional[str] = None) -> List[Optional[torch.Tensor]]:
    """``momentum <- m * momentum + (1 - m) * online`` on each rank's local shards of FSDP2 (DTensor)
    parameters: one :func:`vlfast.ops.ema_update_` over ``p.to_local()`` of every pair, no communication.

    Pairs must be sharded alike (both DTensors with the same global shape and placements) or both plain
    (parameters FSDP2 does not manage, e.g. 0-dim ones: replicated, updated whole).  Low-precision
    momentum shards get fp32 masters exactly as in :func:`zero3_momentum_update_` (``master``: the list
    the previous call returned).  Returns the (new) master list.
    """
    mom, onl = check_pairs(momentum_params, online_params)
    for i, (p, q) in enumerate(zip(mom, onl)):
        dp, dq = is_dtensor(p), is_dtensor(q)
        if dp != dq:
            raise ValueError(f"parameter {i}: one of the pair is an FSDP2 (DTensor) shard and the other a plain "
                             "tensor (an unsharded parameter inside an FSDP2 forward?)")
        if dp and (tuple(p.shape) != tuple(q.shape) or tuple(p.placements) != tuple(q.placements)
                   or p.device_mesh != q.device_mesh):
            raise ValueError(f"parameter {i}: momentum and online parameters are sharded differently "
                             f"({tuple(p.shape)} {p.placements} vs {tuple(q.shape)} {q.placements})")
    return zero3_momentum_update_([local_tensor(p) for p in mom], [local_tensor(q) for q in onl], m,
                                  master=master, backend=backend)
