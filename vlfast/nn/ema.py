"""Weight averages on the fused EMA op: :class:`EMA` and :class:`MomentumEncoder`."""

import copy
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import nn

from ..distributed.zero import _available, _check_plain_shards, _gather_full, _shard_slice, is_zero3_param
from ..ops.ema import _check_decay, ema_update_
from ..reference.ema import moco_momentum_update_


def _owner(module: nn.Module, name: str):
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


class EMA(nn.Module):
    r"""Exponential moving average of a model's weights (Polyak averaging), on one fused op.

    Semantics follow timm's ``ModelEmaV3``: after each optimizer step call
    ``ema.update(model, step)``; every floating parameter (and floating buffer when
    ``include_buffers``) becomes ``d * avg + (1 - d) * current``; other buffers are
    copied.  The decay at a step is

    * ``step is None``: ``decay``;
    * otherwise with ``s = max(0, step - update_after_step - 1)``: ``0`` when ``s == 0``
      (the average is reset to the model), else with ``warmup`` the schedule of
      Tan & Le / Karras et al. ``clamp(1 - (1 + s / warmup_gamma) ** -warmup_power,
      min_decay, decay)``, without it ``decay``.

    The averaged tensors live in one contiguous buffer per (dtype, device) (each view
    starting on a 64-byte boundary), kept in
    ``dtype`` (float32 by default, so a bf16 model's small updates are not rounded
    away); an update is one bandwidth-bound pass of :func:`vlfast.ops.ema_update_`.

    Args:
        model: the model to average (deep-copied; the copy is put in eval mode).
        decay: the target decay in [0, 1].
        warmup, warmup_gamma, warmup_power, min_decay, update_after_step: the schedule above.
        include_buffers: average floating buffers too (e.g. BatchNorm running stats);
            otherwise they are copied.
        dtype: dtype of the averaged floating tensors; ``None`` keeps the model's.
        device: where to keep the average (default: the model's devices).  When it
            differs from the model's, updates copy the current weights over first.
        backend: backend of the EMA op (``None`` = automatic).

    Attributes:
        module: the averaged ``nn.Module``, for evaluation.  ``state_dict()`` keys are
            ``module.<name>``, as timm's ``ModelEmaV3``.

    DeepSpeed ZeRO-3: ``EMA(model)`` of a model whose parameters are partitioned (after
    ``deepspeed.initialize``) is a :class:`vlfast.nn.ZeroEMA` (also reachable as
    ``vlfast.distributed.zero.ZeroEMA``), which averages each rank's shards in place (fp32
    by default), with the same schedule and the same (gathered) state dict.  A subclass of
    this class refuses such a model (derive from :class:`vlfast.nn.ZeroEMA` instead).
    """

    def __new__(cls, model=None, *args, **kwargs):
        # a model whose parameters DeepSpeed ZeRO-3 has partitioned: average the local shards
        if cls is EMA and isinstance(model, nn.Module) and any(
                hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in model.parameters()):
            return super().__new__(ZeroEMA)
        return super().__new__(cls)

    def _init_schedule(self, model, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step,
                       include_buffers, dtype, backend) -> None:
        """Validate and store the arguments shared with :class:`vlfast.nn.ZeroEMA`."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.decay = _check_decay(decay)
        self.min_decay = _check_decay(min_decay)
        if warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma must be > 0, got {warmup_gamma}")
        if update_after_step < 0:
            raise ValueError(f"update_after_step must be >= 0, got {update_after_step}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype or None, got {dtype}")
        self.warmup = bool(warmup)
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.update_after_step = int(update_after_step)
        self.include_buffers = bool(include_buffers)
        self.dtype = dtype
        self.backend = backend

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False,
                 warmup_gamma: float = 1.0, warmup_power: float = 2 / 3, min_decay: float = 0.0,
                 update_after_step: int = 0, include_buffers: bool = True,
                 dtype: Optional[torch.dtype] = torch.float32, device=None, backend: Optional[str] = None):
        super().__init__()
        self._init_schedule(model, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step,
                            include_buffers, dtype, backend)
        if not isinstance(self, ZeroEMA) and any(is_zero3_param(p) for p in model.parameters()):
            # EMA.__new__ turns only EMA(model) itself into a ZeroEMA
            raise TypeError(
                f"{type(self).__name__} got a model whose parameters DeepSpeed ZeRO-3 has partitioned (their data is "
                "empty outside a gather), which a full-copy EMA cannot average: create it with "
                "vlfast.nn.EMA(model), which returns a vlfast.nn.ZeroEMA averaging each rank's shards, or derive "
                f"{type(self).__name__} from vlfast.nn.ZeroEMA")
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        if device is not None:
            self.module.to(device=device)
        self._param_names = [n for n, _ in self.module.named_parameters()]
        self._avg_buffer_names, self._copy_buffer_names = [], []
        for n, b in self.module.named_buffers():
            if include_buffers and b.is_floating_point():
                self._avg_buffer_names.append(n)
            else:
                self._copy_buffer_names.append(n)
        if dtype is not None:
            with torch.no_grad():
                for n in self._param_names + self._avg_buffer_names:
                    t = self._get(n)
                    if t.is_floating_point() and t.dtype != dtype:
                        self._set(n, t.to(dtype))
        self._flatten()

    # ------------------------------------------------------------ storage
    def _get(self, name: str) -> torch.Tensor:
        owner, leaf = _owner(self.module, name)
        return getattr(owner, leaf)

    def _set(self, name: str, value: torch.Tensor) -> None:
        owner, leaf = _owner(self.module, name)
        if leaf in owner._parameters:
            owner._parameters[leaf].data = value
        else:
            owner._buffers[leaf] = value

    def _averaged(self) -> List[torch.Tensor]:
        return [self._get(n) for n in self._param_names + self._avg_buffer_names]

    @torch.no_grad()
    def _flatten(self) -> None:
        """Re-home every averaged tensor into one contiguous buffer per (dtype, device)."""
        names = self._param_names + self._avg_buffer_names
        groups: Dict[tuple, List[str]] = defaultdict(list)
        for n in names:
            t = self._get(n)
            groups[(t.dtype, t.device)].append(n)
        self._flat: List[torch.Tensor] = []
        for (dtype, device), members in groups.items():
            # every view starts on a 64-byte boundary, so the kernels keep 16-byte vector accesses
            align = max(1, 64 // torch.empty((), dtype=dtype).element_size())
            offsets, total = [], 0
            for n in members:
                offsets.append(total)
                total += -(-self._get(n).numel() // align) * align
            flat = torch.zeros(total, dtype=dtype, device=device)
            for n, offset in zip(members, offsets):
                t = self._get(n)
                view = flat[offset:offset + t.numel()].view(t.shape)
                view.copy_(t)
                self._set(n, view)
            self._flat.append(flat)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if hasattr(self, "_param_names"):
            self._flatten()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._flatten()
        return result

    # ------------------------------------------------------------ schedule and update
    def get_decay(self, step: Optional[int] = None) -> float:
        """The decay used by ``update`` at ``step`` (see the class docstring)."""
        if step is None:
            return self.decay
        s = max(0, step - self.update_after_step - 1)
        if s <= 0:
            return 0.0
        if self.warmup:
            d = 1.0 - (1.0 + s / self.warmup_gamma) ** -self.warmup_power
            return max(min(d, self.decay), self.min_decay)
        return self.decay

    def _sources(self, model: nn.Module):
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        try:
            src = [params[n] for n in self._param_names]
            src += [buffers[n] for n in self._avg_buffer_names]
            copies = [buffers[n] for n in self._copy_buffer_names]
        except KeyError as exc:
            raise ValueError(f"model has no tensor named {exc.args[0]!r} that this EMA averages: "
                             "update()/copy_to() take the model the EMA was created from") from None
        return src, copies

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Average ``model``'s current weights into ``self.module`` (one fused pass)."""
        decay = self.get_decay(step)
        src, copies = self._sources(model)
        dst = self._averaged()
        # host-bound copies block: the CPU kernel reads them right away
        src = [s if s.device == d.device else s.to(d.device, non_blocking=d.device.type == "cuda")
               for s, d in zip(src, dst)]
        ema_update_(dst, src, decay, backend=self.backend)
        for n, b in zip(self._copy_buffer_names, copies):
            self._get(n).copy_(b)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights (and buffers) into ``model``, casting to its dtypes."""
        src, copies = self._sources(model)
        for s, d in zip(src, self._averaged()):
            s.copy_(d)
        for n, b in zip(self._copy_buffer_names, copies):
            b.copy_(self._get(n))

    def forward(self, *args, **kwargs):
        """Run the averaged module."""
        return self.module(*args, **kwargs)


def _full_resident(p) -> bool:
    status = getattr(p, "ds_status", None)
    return status is not None and status.name == "AVAILABLE" and p.data.numel() == p.ds_numel


def _prefetched(params):
    """ZeRO-3 momentum parameters that are not persistent but whose full data is resident
    (prefetched for the coming forward, or kept by ``stage3_max_reuse_distance``): the
    shard-local update alone would leave that full copy stale for the forward."""
    return [p for p in params if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
            and _full_resident(p)]


def _regather_(params) -> None:
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


class MomentumEncoder(nn.Module):
    r"""A frozen momentum copy of an online network (MoCo: He et al., 2020; BYOL; ALBEF; DINO).

    ``update(online)`` sets every parameter ``theta_k <- m * theta_k + (1 - m) * theta_q``
    with one call of :func:`vlfast.ops.ema_update_`; buffers (e.g. BatchNorm statistics)
    are the momentum network's own, as in MoCo.  ``forward`` runs the copy under
    ``torch.no_grad()``.  Use :func:`vlfast.schedules.cosine_momentum` for MoCo v3's /
    DINO's schedule.

    Under DeepSpeed ZeRO-3 (parameters with ``ds_tensor``) ``update`` averages each
    rank's local shards with :func:`vlfast.distributed.zero.zero3_momentum_update_` (no
    all-gather; fp32 masters of low-precision shards are kept in ``self._zero_master``,
    which is in no state dict: see :meth:`master_state`); full copies ZeRO-3 has already
    prefetched for the coming forward are refreshed from the updated shards (one all_gather
    of just those), so the forward never sees stale momentum weights.  Low-precision
    (bf16/fp16) momentum weights that are not partitioned get fp32 masters too.

    Args:
        online: the network to follow (deep-copied once, gradients off).
        momentum: ``m`` in [0, 1].
        backend: backend of the EMA op (``None`` = automatic).
    """

    def __init__(self, online: nn.Module, momentum: float = 0.999, *, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        self.momentum = _check_decay(momentum)
        self.backend = backend
        #: False: the per-parameter loop of MoCo's code (the eager baseline); see vlfast.models.set_fused
        self.fused = True
        self.module = copy.deepcopy(online)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: Optional[float] = None) -> None:
        """Move the momentum weights towards ``online``'s (``momentum`` overrides ``self.momentum``)."""
        m = self.momentum if momentum is None else _check_decay(momentum)
        mine = list(self.module.parameters())
        theirs = list(online.parameters())
        if len(mine) != len(theirs):
            raise ValueError(f"online has {len(theirs)} parameters but the momentum encoder has {len(mine)}: "
                             "update() takes the network it was created from")
        if any(hasattr(p, "ds_tensor") for p in mine + theirs):
            # ZeRO-3 partitioned parameters: their .data is empty outside a gather; update the
            # local shards (no communication), keeping fp32 masters for low-precision weights
            from ..distributed.zero import zero3_momentum_update_
            inflight = [p for p in mine if getattr(getattr(p, "ds_status", None), "name", "") == "INFLIGHT"]
            if inflight:  # an all-gather of the old shards is under way: the forward would see stale weights
                raise RuntimeError(
                    f"{len(inflight)} momentum parameter(s) are being prefetched by ZeRO-3 (status INFLIGHT) "
                    "while the momentum update runs inside the forward; the coming momentum forward would use "
                    "the weights from before this update. Run the update before ZeRO-3's hooks: "
                    "vlfast.distributed.zero.hoist_momentum_updates(model) (the vlfast trainer does), or call "
                    "MomentumEncoder.update() outside the forward")
            self.__dict__["_zero_master"] = zero3_momentum_update_(
                mine, theirs, m, master=self.__dict__.get("_zero_master"), backend=self.backend)
            _regather_(_prefetched(mine))  # see _prefetched
            return
        if not self.fused:
            moco_momentum_update_(mine, theirs, m)
        elif any(p.dtype not in (torch.float32, torch.float64) for p in mine):
            # low-precision momentum weights (e.g. DeepSpeed bf16 at ZeRO 0-2): average into fp32
            # masters and round once, so updates below half an ulp are not lost
            from ..distributed.zero import zero3_momentum_update_
            self.__dict__["_zero_master"] = zero3_momentum_update_(
                mine, theirs, m, master=self.__dict__.get("_zero_master"), backend=self.backend)
        else:
            ema_update_(mine, theirs, m, backend=self.backend)

    def master_state(self) -> Optional[List[Optional[torch.Tensor]]]:
        """The fp32 masters of low-precision (or ZeRO-3 shard) momentum weights, or None.

        They are per-rank state, in no state dict: save them per rank next to a checkpoint
        (the vlfast trainer does) for an exact resume of bf16 training."""
        master = self.__dict__.get("_zero_master")
        if master is None or all(t is None for t in master):  # fp32 weights need none
            return None
        return [None if t is None else t.detach().clone() for t in master]

    def load_master_state(self, master: Optional[List[Optional[torch.Tensor]]]) -> None:
        """Restore :meth:`master_state` (``None``: re-created from the weights at the next update)."""
        if master is not None:
            n = len(list(self.module.parameters()))
            if len(master) != n:
                raise ValueError(f"master state has {len(master)} entries for {n} parameters")
            master = [None if t is None else t.detach().clone() for t in master]
        self.__dict__["_zero_master"] = master

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class ZeroEMA(EMA):
    r""":class:`vlfast.nn.EMA` of a DeepSpeed ZeRO-3 model: every rank averages its own shards.

    ``EMA(model, ...)`` returns one when ``model``'s parameters are partitioned (create it
    after ``deepspeed.initialize``); subclass this class for a custom ZeRO-3 EMA.  For each
    partitioned parameter the average is a ``dtype`` (fp32 by default) copy of the local
    shard ``p.ds_tensor``, so an EMA of a bf16 model keeps the small updates;
    ``update(model, step)`` is one :func:`vlfast.ops.ema_update_` over the shards
    (``avg <- d * avg + (1 - d) * shard``, the schedule of :class:`vlfast.nn.EMA`), with no
    communication.  Buffers (replicated under ZeRO) are averaged or copied whole, as
    :class:`vlfast.nn.EMA` does (non-persistent ones too, though no state dict holds them).
    ``.to()`` / ``.double()`` / ``.cpu()`` ... act on the averages and copied buffers.

    ``state_dict()`` (also as a submodule's: prefix and destination as ``nn.Module``'s) is
    collective (every rank calls it) and holds the full averaged tensors under
    ``module.<name>``, exactly the keys of :class:`vlfast.nn.EMA` (every name of a tied
    weight; persistent buffers only), so a checkpoint loads into either class
    (``load_state_dict`` keeps this rank's slice).  :meth:`full_state_dict` gathers it on
    rank 0 only, one parameter at a time, for saving.  There is no full ``module`` to run:
    evaluate the model inside :meth:`swapped_into`, or write the average into it for good
    with :meth:`copy_to`.

    ZeRO++ quantized non-trainable weights are refused; with hpZ
    (``zero_hpz_partition_size > 1``) the average works but :meth:`copy_to` /
    :meth:`swapped_into` are refused (see ``_check_plain_shards``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False,
                 warmup_gamma: float = 1.0, warmup_power: float = 2 / 3, min_decay: float = 0.0,
                 update_after_step: int = 0, include_buffers: bool = True,
                 dtype: Optional[torch.dtype] = torch.float32, device=None, backend: Optional[str] = None):
        nn.Module.__init__(self)
        self._init_schedule(model, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step,
                            include_buffers, dtype, backend)
        if device is not None:
            raise ValueError("device is not supported for a ZeRO-3 EMA (the shards stay with the model's)")
        self._params = dict(model.named_parameters())
        _check_plain_shards(list(self._params.items()), "EMA(model)", write=False)
        self._param_names = list(self._params)
        buffers = dict(model.named_buffers())  # non-persistent ones too: averaged / copied, in no state dict
        self._avg_buffer_names = [n for n, b in buffers.items() if include_buffers and b.is_floating_point()]
        self._copy_buffer_names = [n for n in buffers if n not in self._avg_buffer_names]
        # the state-dict entries (name, "avg"/"copy", index into self._avg/self._copies) in nn.Module's
        # order: parameters and persistent buffers, under every name of a tied weight or shared module
        where = {id(p): ("avg", i) for i, p in enumerate(self._params.values())}
        k = len(self._param_names)
        where.update({id(buffers[n]): ("avg", k + j) for j, n in enumerate(self._avg_buffer_names)})
        where.update({id(buffers[n]): ("copy", j) for j, n in enumerate(self._copy_buffer_names)})
        self._entries = []
        for mname, mod in model.named_modules(remove_duplicate=False):
            pre = mname + "." if mname else ""
            for leaf, p in mod._parameters.items():
                if p is not None:
                    self._entries.append((pre + leaf,) + where[id(p)])
            for leaf, b in mod._buffers.items():
                if b is not None and leaf not in mod._non_persistent_buffers_set:
                    self._entries.append((pre + leaf,) + where[id(b)])
        with torch.no_grad():
            self._avg = [self._local(p).detach().to(dtype or p.dtype).clone() for p in self._params.values()]
            self._avg += [buffers[n].detach().to(dtype or buffers[n].dtype).clone()
                          for n in self._avg_buffer_names]
            self._copies = [buffers[n].detach().clone() for n in self._copy_buffer_names]

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if is_zero3_param(p) else p.data

    @staticmethod
    def _rank() -> int:
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _apply(self, fn, recurse=True):
        # .to(dtype / device), .double(), .cpu(), ...: the averages and copies are plain lists
        nn.Module._apply(self, fn, recurse)
        if "_avg" in self.__dict__:
            with torch.no_grad():
                self._avg = [fn(t) for t in self._avg]
                self._copies = [fn(t) for t in self._copies]
        return self

    def _check_model(self, model: nn.Module):
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        missing = [n for n in self._param_names if n not in params]
        missing += [n for n in self._avg_buffer_names + self._copy_buffer_names if n not in buffers]
        if missing:
            raise ValueError(f"model has no tensor named {missing[0]!r} that this EMA averages: "
                             "update()/copy_to() take the model the EMA was created from")
        return params, buffers

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Average ``model``'s local shards (and buffers) into this EMA (one fused pass, no communication)."""
        decay = self.get_decay(step)
        params, buffers = self._check_model(model)
        src = [self._local(params[n]) for n in self._param_names] + [buffers[n] for n in self._avg_buffer_names]
        src = [s if s.device == d.device else s.to(d.device) for s, d in zip(src, self._avg)]
        ema_update_(self._avg, src, decay, backend=self.backend)
        for t, n in zip(self._copies, self._copy_buffer_names):
            t.copy_(buffers[n])

    def _full(self, i: int) -> torch.Tensor:
        """The full average of parameter ``i`` (a new tensor; collective for a partitioned one)."""
        p, avg = self._params[self._param_names[i]], self._avg[i]
        if not is_zero3_param(p):
            return avg.clone()
        if avg.device != p.ds_tensor.device:  # gather on the model's (communication) device
            avg = avg.to(p.ds_tensor.device)
        return _gather_full(p, avg)

    @torch.no_grad()
    def _collect(self, destination, prefix: str, keep: bool, cpu: bool) -> None:
        """Put the state-dict entries into ``destination`` (only with ``keep``), gathering one
        partitioned parameter at a time (collective: every rank runs the same gathers in order)."""
        n_params = len(self._param_names)
        gathered = {}
        for name, store, idx in self._entries:
            if store == "avg" and idx < n_params:
                if idx not in gathered:
                    t = None
                    if keep or is_zero3_param(self._params[self._param_names[idx]]):
                        t = self._full(idx)
                    gathered[idx] = (t.cpu() if cpu else t) if keep else None
                t = gathered[idx]
            else:
                t = self._avg[idx] if store == "avg" else self._copies[idx]
                if keep:
                    t = t.to("cpu", copy=True) if cpu else t.detach().clone()
            if keep:
                destination[prefix + "module." + name] = t

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # collective: nn.Module.state_dict() (also of a module holding this EMA) gathers every parameter
        self._collect(destination, prefix, keep=True, cpu=False)

    def full_state_dict(self, rank0_only: bool = True, cpu: bool = True) -> Dict[str, torch.Tensor]:
        """``state_dict()`` for saving, gathered one parameter at a time (collective: every rank calls it).

        Args:
            rank0_only: only global rank 0 keeps the tensors; the others take part in the
                gathers and get ``{}`` (they never hold more than one full parameter).
            cpu: move each gathered tensor to the CPU right away, so no device holds more
                than one full parameter.

        :func:`vlfast.training.save_checkpoint` writes this on rank 0.
        """
        out: Dict[str, torch.Tensor] = {}
        self._collect(out, "", keep=not rank0_only or self._rank() == 0, cpu=cpu)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a full state dict (:class:`vlfast.nn.EMA`'s or this class's); each rank keeps its slices.

        The values are always copied (``assign`` does not apply); loading from a memory-mapped
        file (``torch.load(..., mmap=True)``) reads just this rank's slices."""
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        n_params = len(self._param_names)
        mine = set()
        with torch.no_grad():
            for name, store, idx in self._entries:
                key = prefix + "module." + name
                mine.add(key)
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict[key]
                if not torch.overrides.is_tensor_like(value):
                    error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor or '
                                      f'Tensor-like object from checkpoint but received {type(value)}')
                    continue
                dst = self._avg[idx] if store == "avg" else self._copies[idx]
                p = self._params[self._param_names[idx]] if store == "avg" and idx < n_params else None
                shape = tuple(dst.shape) if p is None else tuple(p.ds_shape) if is_zero3_param(p) else tuple(p.shape)
                if tuple(value.shape) != shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} "
                                      f"from checkpoint, the shape in current model is {shape}.")
                    continue
                if p is not None and is_zero3_param(p):
                    value = _shard_slice(p, value.detach().reshape(-1))  # this rank's part only
                dst.copy_(value.view(dst.shape))
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in mine)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the average into ``model``'s shards ``ds_tensor``, resident full copies and buffers (collective).

        Only the model's weights change: a DeepSpeed engine's optimizer keeps its own fp32
        partition of every trainable parameter, which this does not touch, so the next
        ``engine.step()`` writes the training weights back over the average (and the
        optimizer never trains from the average).  Use it to export or evaluate a model that
        is not trained further; to evaluate with the average during training, use
        :meth:`swapped_into`, which puts the training weights back afterwards.

        Raises:
            ValueError: a parameter has a ZeRO++ hpZ secondary partition or quantized shard.
        """
        params, buffers = self._check_model(model)
        _check_plain_shards([(n, params[n]) for n in self._param_names], "EMA.copy_to", write=True)
        for i, n in enumerate(self._param_names):
            p = params[n]
            if not is_zero3_param(p):
                p.data.copy_(self._avg[i])
                continue
            p.ds_tensor.copy_(self._avg[i])
            if _available(p) and p.data.numel() == p.ds_numel:
                p.data.copy_(self._full(i).view(p.data.shape))
        k = len(self._param_names)
        for j, n in enumerate(self._avg_buffer_names):
            buffers[n].copy_(self._avg[k + j])
        for t, n in zip(self._copies, self._copy_buffer_names):
            buffers[n].copy_(t)

    def swapped_into(self, model: nn.Module):
        """A context manager: inside it ``model`` holds the average, after it its own weights again.

        ``with ema.swapped_into(model): evaluate(model)``.  On entry this rank's shards
        (``ds_tensor``), resident full copies and the buffers of ``model`` are saved (one
        copy of this rank's part of the model) and :meth:`copy_to` writes the average; on
        exit, also on an exception, the saved tensors are written back (full copies that
        became resident inside are re-gathered from the restored shards), so training goes
        on from exactly the weights it had (DeepSpeed's fp32 optimizer partition is never
        touched).  Collective on entry and exit: every rank enters and leaves together.
        Yields ``model``.
        """
        from contextlib import contextmanager

        return contextmanager(self._swapped)(model)

    def _swapped(self, model: nn.Module):
        params, buffers = self._check_model(model)
        _check_plain_shards([(n, params[n]) for n in self._param_names], "EMA.swapped_into", write=True)
        saved = []  # (parameter, saved shard or None when not partitioned, saved full data or None)
        with torch.no_grad():
            for n in self._param_names:
                p = params[n]
                if not is_zero3_param(p):
                    saved.append((p, None, p.data.clone()))
                    continue
                resident = _available(p) and p.data.numel() == p.ds_numel
                saved.append((p, p.ds_tensor.clone(), p.data.clone() if resident else None))
            saved_buffers = [(buffers[n], buffers[n].clone()) for n in self._avg_buffer_names + self._copy_buffer_names]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, shard, data in saved:
                    if shard is None:
                        p.data.copy_(data)
                        continue
                    p.ds_tensor.copy_(shard)
                    if _available(p) and p.data.numel() == p.ds_numel:
                        if data is None:  # gathered inside the block (e.g. prefetched): gather again
                            data = _gather_full(p, p.ds_tensor)
                        p.data.copy_(data.view(p.data.shape))
                for b, value in saved_buffers:
                    b.copy_(value)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a ZeRO-3 EMA holds only this rank's shards and has no module to run; evaluate the "
                           "model inside `with ema.swapped_into(model):` (or write the average into it with "
                           "copy_to(model))")
