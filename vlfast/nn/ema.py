"""Weight averages on the fused EMA op: :class:`EMA` and :class:`MomentumEncoder`."""

import copy
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import _validation as check
from ..ops.ema import ema_update_
from ..reference.ema import model_ema_update_, moco_momentum_update_
from ..sharding import is_zero3_param, prefetched, regather_, zero3_momentum_update_


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
        fused: ``True`` updates with :func:`vlfast.ops.ema_update_` (one pass); ``False`` runs
            the eager per-tensor loop of timm's ``ModelEmaV3``
            (:func:`vlfast.reference.ema.model_ema_update_`), the baseline.

    Attributes:
        module: the averaged ``nn.Module``, for evaluation.  ``state_dict()`` keys are
            ``module.<name>``, as timm's ``ModelEmaV3``.

    DeepSpeed ZeRO-3: a model whose parameters are partitioned (after
    ``deepspeed.initialize``) has no full weights to copy, and ``EMA(model)`` raises a
    ``TypeError`` naming the factory to use instead: :func:`vlfast.distributed.make_ema`
    returns an ``EMA`` for a plain model and a :class:`vlfast.distributed.ZeroEMA` (the same
    schedule and state dict, averaging each rank's shards in place) for a partitioned one.
    """

    #: True in subclasses that average ZeRO-3 shards in place (vlfast.distributed.ZeroEMA)
    _shard_local = False

    def _init_schedule(self, model, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step,
                       include_buffers, dtype, backend, fused=True) -> None:
        """Validate and store the arguments shared with :class:`vlfast.nn.ZeroEMA`."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.decay = check.decay(decay)
        self.min_decay = check.decay(min_decay)
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
        self.fused = check.flag("fused", fused)

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False,
                 warmup_gamma: float = 1.0, warmup_power: float = 2 / 3, min_decay: float = 0.0,
                 update_after_step: int = 0, include_buffers: bool = True,
                 dtype: Optional[torch.dtype] = torch.float32, device=None, backend: Optional[str] = None,
                 fused: bool = True):
        super().__init__()
        self._init_schedule(model, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step,
                            include_buffers, dtype, backend, fused)
        if not self._shard_local and any(is_zero3_param(p) for p in model.parameters()):
            raise TypeError(
                f"{type(self).__name__} got a model whose parameters DeepSpeed ZeRO-3 has partitioned (their data is "
                "empty outside a gather), which a full-copy EMA cannot average: create it with "
                "vlfast.distributed.make_ema(model, ...), which returns a vlfast.distributed.ZeroEMA averaging each "
                f"rank's shards, or derive {type(self).__name__} from vlfast.distributed.ZeroEMA")
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
        if self.fused:
            ema_update_(dst, src, decay, backend=self.backend)
        else:
            model_ema_update_(dst, src, decay)
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
        fused: ``True`` updates with :func:`vlfast.ops.ema_update_`; ``False`` runs MoCo's
            per-parameter loop (:func:`vlfast.reference.ema.moco_momentum_update_`).
    """

    def __init__(self, online: nn.Module, momentum: float = 0.999, *, backend: Optional[str] = None,
                 fused: bool = True):
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        self.momentum = check.decay(momentum)
        self.backend = backend
        #: False: the per-parameter loop of MoCo's code (the eager baseline); see vlfast.models.set_fused
        self.fused = check.flag("fused", fused)
        self.module = copy.deepcopy(online)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: Optional[float] = None) -> None:
        """Move the momentum weights towards ``online``'s (``momentum`` overrides ``self.momentum``)."""
        m = self.momentum if momentum is None else check.decay(momentum)
        mine = list(self.module.parameters())
        theirs = list(online.parameters())
        if len(mine) != len(theirs):
            raise ValueError(f"online has {len(theirs)} parameters but the momentum encoder has {len(mine)}: "
                             "update() takes the network it was created from")
        if any(hasattr(p, "ds_tensor") for p in mine + theirs):
            # ZeRO-3 partitioned parameters: their .data is empty outside a gather; update the
            # local shards (no communication), keeping fp32 masters for low-precision weights
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
            regather_(prefetched(mine))  # see vlfast.sharding.prefetched
            return
        if not self.fused:
            moco_momentum_update_(mine, theirs, m)
        elif any(p.dtype not in (torch.float32, torch.float64) for p in mine):
            # low-precision momentum weights (e.g. DeepSpeed bf16 at ZeRO 0-2): average into fp32
            # masters and round once, so updates below half an ulp are not lost
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
