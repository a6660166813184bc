"""Weight averages on the fused EMA op: :class:`EMA` and :class:`MomentumEncoder`."""

import copy
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import _validation as check
from ..ops.ema import ema_update_
from ..reference.ema import model_ema_update_, moco_momentum_update_
from ..sharding import (dtensor_momentum_update_, full_from_local, is_dtensor, is_zero3_param, local_from_full,
                        local_shard_copy, local_tensor, prefetched, regather_, zero3_momentum_update_)


def _owner(module: nn.Module, name: str):
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


#: ``dtype="auto"`` (:class:`EMA`'s default): float32 averages of low-precision tensors, the module
#: in the model's dtypes
AUTO = "auto"


def _average_dtype(dtype, t: torch.Tensor) -> torch.dtype:
    """The dtype of the average of floating tensor ``t`` of the (already converted) module."""
    return torch.promote_types(t.dtype, torch.float32) if dtype == AUTO else t.dtype


@torch.no_grad()
def _lerp_stochastic_round_bf16_(ema_values: List[torch.Tensor], model_values: List[torch.Tensor], weight: float,
                                 generator: torch.Generator, chunk_numel: int = 2 ** 22) -> None:
    """timm's ``_lerp_stochastic_round_bf16_`` (timm 1.0.31, ``timm/utils/model_ema.py``), the same
    operations in the same order, so that the same generator state gives the same bits.

    Each chunk (tensors concatenated up to ``chunk_numel`` elements) is updated in float32, then
    16 random bits are added below the bfloat16 mantissa before truncating: the result rounds up
    with probability equal to the discarded fraction, so updates far below bfloat16 resolution
    accumulate in expectation.
    """

    def update_chunk(chunk_ema, chunk_model):
        x = torch.cat([v.reshape(-1) for v in chunk_ema]).float()
        x.mul_(1. - weight).add_(torch.cat([v.reshape(-1) for v in chunk_model]), alpha=weight)
        bits = x.view(torch.int32)
        bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator))
        bits.bitwise_and_(-(1 << 16))  # truncate to bfloat16 precision (exactly representable in bfloat16)
        for ema_v, xi in zip(chunk_ema, x.split([v.numel() for v in chunk_ema])):
            ema_v.copy_(xi.view(ema_v.shape))

    chunk_ema, chunk_model, numel = [], [], 0
    for ema_v, model_v in zip(ema_values, model_values):
        if numel and numel + ema_v.numel() > chunk_numel:
            update_chunk(chunk_ema, chunk_model)
            chunk_ema, chunk_model, numel = [], [], 0
        chunk_ema.append(ema_v)
        chunk_model.append(model_v)
        numel += ema_v.numel()
    if chunk_ema:
        update_chunk(chunk_ema, chunk_model)


class EMA(nn.Module):
    r"""Exponential moving average of a model's weights (Polyak averaging), on one fused op:
    timm's ``ModelEmaV3`` (timm 1.0.31) with its arguments, in its order, and their meaning.

    After each optimizer step call ``ema.update(model, step)``: every floating parameter and
    floating persistent buffer (``exclude_buffers=False``) becomes ``d * avg + (1 - d) * current``,
    other buffers are copied; with ``exclude_buffers=True`` the parameters are averaged and every
    buffer is copied (timm's ``apply_update_no_buffers_``).  Non-persistent buffers, which
    ``ModelEmaV3`` leaves as they were at construction, are averaged / copied like the persistent
    ones (no state dict holds them).  A weight tied under several names is averaged once (timm's
    walk over ``state_dict()`` lerps it once per name).  The decay (:meth:`get_decay`, timm's) at
    a step is

    * ``step is None``: ``decay``;
    * otherwise with ``s = max(0, step - update_after_step - 1)``: ``0`` when ``s == 0`` (the
      average is reset to the model), else with ``use_warmup`` the schedule of Tan & Le / Karras
      et al. ``clamp(1 - (1 + s / warmup_gamma) ** -warmup_power, min_decay, decay)``, without
      it ``decay``.

    **Precision** (``dtype``):

    * ``"auto"`` (vlfast's default): every floating tensor of the model is averaged in
      (at least) float32, and ``self.module`` keeps the model's dtypes.  For a float32 model the
      module's tensors are the averages.  For a bf16 / fp16 model the float32 averages are
      kept next to the module (a "master" copy, 4 bytes per weight, plus the module's 2) and the
      module's tensors are their rounding, refreshed at every :meth:`update` (one cast-copy per
      dtype group); so the EMA takes the model's own (bf16) inputs and returns what the
      model would, while no update is lost to bf16 rounding.  ``state_dict()`` holds the float32
      averages.
    * a ``torch.dtype``: timm's meaning, the module (averages included) converted to that dtype
      (``ModelEmaV3(dtype=torch.float32)`` of a bf16 model has a float32 module, which takes
      float32 inputs).
    * ``None``: timm's default, the model's dtypes.  bf16 averages are then updated with
      ``stochastic_rounding`` as timm's (its algorithm and seeded private generator: the same
      bits as ``ModelEmaV3`` for the same ``stochastic_rounding_seed`` and ``foreach``); fp16 ones
      are rounded to nearest once per update.

    Every other average is updated by one bandwidth-bound pass of :func:`vlfast.ops.ema_update_`
    over one contiguous buffer per (device, dtype) (each view starting on a 64-byte boundary),
    computed in float32 (float64 for float64 tensors) and rounded once.

    Args (timm's, in its order):
        model: the model to average (deep-copied; the copy is put in eval mode, without gradients).
        decay: the target decay in [0, 1].
        min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power: the schedule above.
        device: where to keep the average (default: the model's devices).  When it differs from
            the model's, updates copy the current weights over first.
        dtype: ``"auto"``, a floating ``torch.dtype`` or ``None``, see above.
        stochastic_rounding: stochastic rounding of bfloat16 averages (timm's default True;
            with the default ``dtype="auto"`` no average is bfloat16, so it has no effect).
        stochastic_rounding_seed: seed of its private generator (every rank rounds alike).
        foreach: accepted for timm's signature.  The fused op is always one multi-tensor pass;
            ``foreach`` only decides, as in timm, whether stochastic rounding draws its random
            bits per chunk of tensors (True) or per tensor (False).  As in timm it is set to
            False when ``device`` differs from the model's.
        exclude_buffers: see above.

    vlfast's keyword arguments (today's names keep working):
        warmup: alias of ``use_warmup``.
        include_buffers: ``include_buffers=False`` is ``exclude_buffers=True``.
        backend: backend of the EMA op (``None`` = automatic).
        fused: ``True`` updates with :func:`vlfast.ops.ema_update_` (one pass); ``False`` runs
            the eager per-tensor loop of timm's ``ModelEmaV3`` (``foreach=False``,
            :func:`vlfast.reference.ema.model_ema_update_`), the baseline.

    Attributes:
        module: the averaged ``nn.Module``, for evaluation; ``forward`` runs it.
            ``state_dict()`` keys are ``module.<name>``, as timm's ``ModelEmaV3``, so a state
            dict loads into either class both ways (values cast to the receiving dtypes).

    PyTorch FSDP2: for a model sharded with ``fully_shard`` (DTensor parameters) the EMA keeps, per
    rank, the average of that rank's shards only (``p.to_local()``: no gather, no broadcast; fp32
    averages of a bf16 model as above); ``update`` must run outside the model's forward (where
    every parameter is sharded). ``state_dict()`` holds this rank's shards, :meth:`full_state_dict`
    gathers the full averages (collective) and ``load_state_dict`` takes either (a full tensor is
    sliced to this rank's shard); ``forward`` is refused (there is no full module): load the
    gathered state dict into an unsharded model, or :meth:`copy_to` the sharded model.

    DeepSpeed ZeRO-3: a model whose parameters are partitioned (after
    ``deepspeed.initialize``) has no full weights to copy, and ``EMA(model)`` raises a
    ``TypeError`` naming the factory to use instead: :func:`vlfast.distributed.make_ema`
    returns an ``EMA`` for a plain model and a :class:`vlfast.distributed.ZeroEMA` (the same
    schedule and state dict, averaging each rank's shards in place) for a partitioned one.
    """

    #: True in subclasses that average ZeRO-3 shards in place (vlfast.distributed.ZeroEMA)
    _shard_local = False
    #: FSDP2: parameter name -> sharding (vlfast.sharding.shard_spec) of the averaged DTensors; empty otherwise
    _shard_specs: Dict[str, tuple] = {}

    def _init_schedule(self, model, *, decay, min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power,
                       dtype, stochastic_rounding, stochastic_rounding_seed, foreach, exclude_buffers, warmup,
                       include_buffers, backend, fused) -> None:
        """Validate and store the arguments shared with :class:`vlfast.distributed.ZeroEMA`."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.decay = check.decay(decay)
        self.min_decay = check.decay(min_decay, "min_decay")
        self.update_after_step = check.integer("update_after_step", update_after_step, 0)
        use_warmup = check.flag("use_warmup", use_warmup)
        if warmup is not None:
            if check.flag("warmup", warmup) is False and use_warmup:
                raise ValueError("warmup=False contradicts use_warmup=True (warmup is vlfast's name for use_warmup)")
            use_warmup = warmup
        self.use_warmup = use_warmup
        self.warmup_gamma = check.positive_real("warmup_gamma", warmup_gamma)
        self.warmup_power = check.real("warmup_power", warmup_power, allow_tensor=False)
        if not (dtype is None or dtype == AUTO or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
            raise TypeError(f"dtype must be a floating dtype, 'auto' or None, got {dtype!r}")
        self.dtype = dtype
        self.stochastic_rounding = check.flag("stochastic_rounding", stochastic_rounding)
        self.stochastic_rounding_seed = check.integer("stochastic_rounding_seed", stochastic_rounding_seed)
        self.foreach = check.flag("foreach", foreach)
        exclude_buffers = check.flag("exclude_buffers", exclude_buffers)
        if include_buffers is not None:
            if check.flag("include_buffers", include_buffers) and exclude_buffers:
                raise ValueError("include_buffers=True contradicts exclude_buffers=True "
                                 "(include_buffers=False is vlfast's name for exclude_buffers=True)")
            exclude_buffers = not include_buffers
        self.exclude_buffers = exclude_buffers
        self.backend = backend
        self.fused = check.flag("fused", fused)
        self._sr_generator: Optional[torch.Generator] = None

    @property
    def warmup(self) -> bool:
        """vlfast's name of ``use_warmup``."""
        return self.use_warmup

    @property
    def include_buffers(self) -> bool:
        """vlfast's name of ``not exclude_buffers``."""
        return not self.exclude_buffers

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3, device=None,
                 dtype=AUTO, stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0,
                 foreach: bool = True, exclude_buffers: bool = False, *, warmup: Optional[bool] = None,
                 include_buffers: Optional[bool] = None, backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self._init_schedule(model, decay=decay, min_decay=min_decay, update_after_step=update_after_step,
                            use_warmup=use_warmup, warmup_gamma=warmup_gamma, warmup_power=warmup_power, dtype=dtype,
                            stochastic_rounding=stochastic_rounding, stochastic_rounding_seed=stochastic_rounding_seed,
                            foreach=foreach, exclude_buffers=exclude_buffers, warmup=warmup,
                            include_buffers=include_buffers, backend=backend, fused=fused)
        if not self._shard_local and any(is_zero3_param(p) for p in model.parameters()):
            raise TypeError(
                f"{type(self).__name__} got a model whose parameters DeepSpeed ZeRO-3 has partitioned (their data is "
                "empty outside a gather), which a full-copy EMA cannot average: create it with "
                "vlfast.distributed.make_ema(model, ...), which returns a vlfast.distributed.ZeroEMA averaging each "
                f"rank's shards, or derive {type(self).__name__} from vlfast.distributed.ZeroEMA")
        self.device = device
        self._shard_specs: Dict[str, tuple] = {}  # FSDP2: parameter name -> sharding of the model's DTensor
        if any(is_dtensor(p) for p in model.parameters()):
            # FSDP2 (DTensor) parameters: average this rank's shards (FSDP2 refuses deepcopy)
            if device is not None:
                raise ValueError("device must be None for an FSDP2 model (the averages are its shards' twins)")
            self.module, self._shard_specs = local_shard_copy(model)
            self.module.eval()
        else:
            self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        if device is not None:
            first = next(iter(model.parameters()), None)
            if first is None or torch.device(device) != first.device:
                self.foreach = False  # timm: "cannot use foreach methods with different devices"
            self.module.to(device=device)
        if isinstance(dtype, torch.dtype):
            self.module.to(dtype=dtype)  # timm: the module itself in that dtype
        self._param_names, self._copy_param_names = [], []
        for n, p in self.module.named_parameters():
            (self._param_names if p.is_floating_point() else self._copy_param_names).append(n)
        self._avg_buffer_names, self._copy_buffer_names = [], []
        for n, b in self.module.named_buffers():
            if not self.exclude_buffers and b.is_floating_point():
                self._avg_buffer_names.append(n)
            else:
                self._copy_buffer_names.append(n)
        names = self._param_names + self._avg_buffer_names
        self._avg_dtypes = {n: _average_dtype(dtype, self._get(n)) for n in names}
        self._mod_dtypes = {n: self._get(n).dtype for n in names}
        self._build({n: self._get(n) for n in names})
        if self._shard_specs:  # before _load_averages: full tensors of a state dict -> this rank's shards
            self.register_load_state_dict_pre_hook(_shard_full_tensors)
        self.register_state_dict_post_hook(_save_averages)
        self.register_load_state_dict_pre_hook(_load_averages)
        self.register_load_state_dict_post_hook(_rebuild_after_load)

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
        """The averages, in ``_param_names + _avg_buffer_names`` order (the module's own tensors,
        or the float32 masters of low-precision ones)."""
        return [self._avg_views[n] for n in self._param_names + self._avg_buffer_names]

    @torch.no_grad()
    def _build(self, values: Dict[str, torch.Tensor]) -> None:
        """Re-home every average into one contiguous buffer per (device, average dtype, module dtype),
        from ``values`` (name -> tensor); where the module's dtype differs from the average's, the
        module's tensors become views of a twin buffer of the module's dtype with the same layout."""
        names = self._param_names + self._avg_buffer_names
        groups: Dict[tuple, List[str]] = defaultdict(list)
        for n in names:
            groups[(self._get(n).device, self._avg_dtypes[n], self._mod_dtypes[n])].append(n)
        self._groups: List[tuple] = []  # (average buffer, module twin buffer or None)
        self._avg_views: Dict[str, torch.Tensor] = {}
        self._mod_views: Dict[str, torch.Tensor] = {}
        self._masters = set()  # names whose average is not the module's tensor
        for (device, avg_dtype, mod_dtype), members in groups.items():
            # every view starts on a 64-byte boundary, so the kernels keep 16-byte vector accesses
            align = max(1, 64 // torch.empty((), dtype=avg_dtype).element_size())
            offsets, total = [], 0
            for n in members:
                offsets.append(total)
                total += -(-self._get(n).numel() // align) * align
            flat = torch.zeros(total, dtype=avg_dtype, device=device)
            twin = None if mod_dtype == avg_dtype else torch.zeros(total, dtype=mod_dtype, device=device)
            for n, offset in zip(members, offsets):
                shape, numel = self._get(n).shape, self._get(n).numel()
                view = flat[offset:offset + numel].view(shape)
                view.copy_(values[n])
                self._avg_views[n] = view
                if twin is not None:
                    self._masters.add(n)
                    view = twin[offset:offset + numel].view(shape)
                self._mod_views[n] = view
                self._set(n, view)
            if twin is not None:
                twin.copy_(flat)
            self._groups.append((flat, twin))
        self._refresh_aliases()

    def _refresh_aliases(self) -> None:
        """state-dict key (without the ``module.`` prefix) -> name, for the keys whose value is a
        master (every name of a tied weight), and the state-dict order of the averages."""
        by_id = {}
        for n in self._param_names + self._avg_buffer_names:
            owner, leaf = _owner(self.module, n)
            by_id[id(owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf])] = n
        self._master_keys: Dict[str, str] = {}
        order, seen = [], set()
        for key, t in self.module.state_dict(keep_vars=True).items():
            n = by_id.get(id(t))
            if n is None:
                continue
            if n in self._masters:
                self._master_keys[key] = n
            if n not in seen:
                seen.add(n)
                order.append(n)
        # timm's order of the tensors it lerps: state_dict() (with buffers) or parameters()
        self._timm_order = list(self._param_names) if self.exclude_buffers else order + [
            n for n in self._param_names + self._avg_buffer_names if n not in seen]

    def _refresh_module(self) -> None:
        """Round the float32 masters into the module's low-precision tensors (one copy per group)."""
        for flat, twin in self._groups:
            if twin is not None:
                twin.copy_(flat)

    def _apply(self, fn, recurse=True):
        # .to(device / dtype), .double(), .cpu(), ...: the module's tensors through nn.Module, the masters here
        masters = {n: self._avg_views[n] for n in getattr(self, "_masters", ())}
        out = super()._apply(fn, recurse)
        if hasattr(self, "_avg_views"):
            with torch.no_grad():
                values = {n: self._get(n) for n in self._param_names + self._avg_buffer_names}
                values.update({n: fn(t) for n, t in masters.items()})
            self._mod_dtypes = {n: self._get(n).dtype for n in values}
            self._avg_dtypes = {n: v.dtype for n, v in values.items()}
            self._build(values)
        return out

    def __deepcopy__(self, memo):
        # nn.Parameter's deepcopy clones its data, which would cut the module's tensors off the
        # buffers the update writes: copy as nn.Module's default would, then re-home the copy
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        if "_avg_views" in new.__dict__:
            new._build(dict(new._avg_views))
        return new

    def _sync(self) -> None:
        """Re-home the module's tensors if something replaced them (``ema.module.to(...)``, an
        assignment): the averages (masters where there are) are the values kept."""
        if not self._intact():
            with torch.no_grad():
                self._build({n: self._avg_views[n] if n in self._masters else self._get(n) for n in self._avg_views})

    def _intact(self) -> bool:
        """Whether the module's tensors are still the views :meth:`_build` made (not after ``assign=True``)."""
        for n, v in self._mod_views.items():
            t = self._get(n)
            if t.data_ptr() != v.data_ptr() or t.dtype != v.dtype or t.device != v.device:
                return False
        return True

    # ------------------------------------------------------------ schedule and update
    def get_decay(self, step: Optional[int] = None) -> float:
        """The decay used by ``update`` at ``step`` (timm's ``ModelEmaV3.get_decay``)."""
        if step is None:
            return self.decay
        s = max(0, step - self.update_after_step - 1)
        if s <= 0:
            return 0.0
        if self.use_warmup:
            d = 1.0 - (1.0 + s / self.warmup_gamma) ** -self.warmup_power
            return max(min(d, self.decay), self.min_decay)
        return self.decay

    def _sources(self, model: nn.Module):
        params = dict(model.named_parameters())
        if self._shard_specs:  # FSDP2: the local shards (views: copy_to writes through)
            unsharded = [n for n in self._shard_specs if n in params and not is_dtensor(params[n])]
            if unsharded:
                raise RuntimeError(
                    f"{len(unsharded)} parameter(s) of the FSDP2 model are unsharded right now (e.g. "
                    f"{unsharded[0]!r}: inside its forward); update / set / copy_to this EMA outside the forward")
            params = {n: local_tensor(p) for n, p in params.items()}
        buffers = dict(model.named_buffers())
        try:
            src = {n: params[n] for n in self._param_names}
            src.update({n: buffers[n] for n in self._avg_buffer_names})
            copies = [params[n] for n in self._copy_param_names] + [buffers[n] for n in self._copy_buffer_names]
        except KeyError as exc:
            raise ValueError(f"model has no tensor named {exc.args[0]!r} that this EMA averages: "
                             "update()/copy_to()/set() take the model the EMA was created from") from None
        return src, copies

    def _copied(self) -> List[torch.Tensor]:
        return [self._get(n) for n in self._copy_param_names + self._copy_buffer_names]

    def _generator(self, device: torch.device) -> torch.Generator:
        """The private generator of stochastic rounding (timm's ``_sr_generator``), seeded on first use."""
        g = self._sr_generator
        if g is None or g.device != device:
            g = torch.Generator(device=device)
            g.manual_seed(self.stochastic_rounding_seed)
            self._sr_generator = g
        return g

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Average ``model``'s current weights into this EMA (``step``: see :meth:`get_decay`)."""
        decay = self.get_decay(step)
        src, copies = self._sources(model)
        self._sync()
        dst_names, sr_names = [], []
        for n in self._timm_order:
            sr = self.stochastic_rounding and self._avg_views[n].dtype == torch.bfloat16
            (sr_names if sr else dst_names).append(n)
        dst = [self._avg_views[n] for n in dst_names]
        # host-bound copies block: the CPU kernel reads them right away
        src_list = [src[n] if src[n].device == d.device else src[n].to(d.device, non_blocking=d.device.type == "cuda")
                    for n, d in zip(dst_names, dst)]
        if dst:
            if self.fused:
                ema_update_(dst, src_list, decay, backend=self.backend)
            else:
                model_ema_update_(dst, src_list, decay)
        if sr_names:
            ema = [self._avg_views[n] for n in sr_names]
            cur = [src[n].to(e.device) for n, e in zip(sr_names, ema)]
            if self.foreach:
                _lerp_stochastic_round_bf16_(ema, cur, 1.0 - decay, self._generator(ema[0].device))
            else:
                for e, c in zip(ema, cur):
                    _lerp_stochastic_round_bf16_([e], [c], 1.0 - decay, self._generator(e.device))
        self._refresh_module()
        for d, b in zip(self._copied(), copies):
            d.copy_(b)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s weights and buffers into the EMA (timm's ``ModelEmaV3.set``)."""
        src, copies = self._sources(model)
        self._sync()
        for n, v in self._avg_views.items():
            v.copy_(src[n])
        self._refresh_module()
        for d, b in zip(self._copied(), copies):
            d.copy_(b)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averages (the float32 masters where there are) and buffers into ``model``, cast to its dtypes."""
        src, copies = self._sources(model)
        self._sync()
        for n, t in src.items():
            t.copy_(self._avg_views[n])
        for d, b in zip(self._copied(), copies):
            b.copy_(d)

    def forward(self, *args, **kwargs):
        """Run the averaged module (timm's ``ModelEmaV3.forward``)."""
        if self._shard_specs:
            raise RuntimeError("this EMA of an FSDP2 model holds this rank's shards of the averages, not a module "
                               "to run: gather them with full_state_dict() and load them into an unsharded copy "
                               "of the model, or write them into the model with copy_to(model)")
        return self.module(*args, **kwargs)

    def _sharded_keys(self, prefix: str = "") -> Dict[str, tuple]:
        """``{state-dict key: sharding}`` of the averages that are FSDP2 shards (every name of a tied weight)."""
        if not self._shard_specs:
            return {}
        by_id = {id(p): self._shard_specs[n] for n, p in self.module.named_parameters() if n in self._shard_specs}
        return {prefix + "module." + k: by_id[id(t)] for k, t in self.module.state_dict(keep_vars=True).items()
                if id(t) in by_id}

    @property
    def full_state_dict(self):
        """EMA of an FSDP2 model only: ``full_state_dict(rank0_only=True, cpu=True)``, ``state_dict()`` with
        full tensors for saving (what :meth:`vlfast.training.CheckpointManager.save` writes to ``ema.pt``).

        Collective (every rank calls it, in the same order): each averaged shard is all-gathered into the
        full tensor, one at a time; ``rank0_only``: only global rank 0 keeps them (the others get ``{}``);
        ``cpu``: each moved to the CPU right away.  Any other EMA has no such attribute (its
        ``state_dict()`` is already full, and the checkpoint takes it from rank 0 alone)."""
        if not self._shard_specs:
            raise AttributeError("full_state_dict: only an EMA of an FSDP2 (sharded) model has one; "
                                 "use state_dict()")
        return self._gather_state_dict

    @torch.no_grad()
    def _gather_state_dict(self, rank0_only: bool = True, cpu: bool = True) -> Dict[str, torch.Tensor]:
        rank = torch.distributed.get_rank() if (torch.distributed.is_available()
                                                and torch.distributed.is_initialized()) else 0
        keep = rank == 0 or not rank0_only
        sharded = self._sharded_keys()
        out: Dict[str, torch.Tensor] = {}
        for k, v in self.state_dict().items():
            if k in sharded:
                v = full_from_local(v, sharded[k])
            if keep:
                out[k] = v.detach().to("cpu", copy=True) if cpu else v.detach().clone()
        return out


def _save_averages(ema: EMA, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the float32 masters, not their rounding, under ``module.<name>``."""
    for key, n in ema._master_keys.items():
        full = prefix + "module." + key
        if full in state_dict:
            state_dict[full] = ema._avg_views[n].detach()


def _shard_full_tensors(ema: EMA, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """load_state_dict pre-hook of an EMA of an FSDP2 model: a full tensor (a gathered state dict, as
    :meth:`EMA.full_state_dict` writes) becomes this rank's shard of it (a local slice); a tensor of the
    shard's own shape (``state_dict()`` of the same rank) is left as it is."""
    for key, spec in ema._sharded_keys(prefix).items():
        value = state_dict.get(key)
        if torch.overrides.is_tensor_like(value) and tuple(value.shape) == tuple(spec[2]):
            state_dict[key] = local_from_full(value, spec)


def _load_averages(ema: EMA, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs) -> None:
    """load_state_dict pre-hook: the masters read the state dict at full precision (the module's
    low-precision tensors then load their rounding; missing keys and shape errors are reported there)."""
    with torch.no_grad():
        for key, n in ema._master_keys.items():
            value = state_dict.get(prefix + "module." + key)
            master = ema._avg_views[n]
            if torch.overrides.is_tensor_like(value) and tuple(value.shape) == tuple(master.shape):
                master.copy_(value)


def _rebuild_after_load(ema: EMA, incompatible_keys) -> None:
    """load_state_dict post-hook: after ``assign=True`` the module holds the state dict's tensors;
    re-home them (in the module's dtypes; the masters have read the state dict already) so that
    updates stay one pass."""
    ema._sync()


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

    Under PyTorch FSDP2 (DTensor parameters, the momentum network sharded like the online one)
    ``update`` averages each rank's local shards (``p.to_local()``) in one fused call, with no
    communication (fp32 masters for low-precision shards, as above).  It must run while the
    parameters are sharded, i.e. not inside an FSDP2 forward (there the running units' parameters
    are unsharded copies whose writes FSDP drops): :func:`vlfast.training.fsdp.shard_model` hoists a
    model's ``momentum_update`` into a pre-forward hook ahead of FSDP's, and an update that finds
    unsharded pairs raises a ``RuntimeError``.

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
        if any(is_dtensor(p) for p in mine + theirs):
            # FSDP2 shards (DTensor): update the local shards (no communication); every pair must be
            # sharded: inside an FSDP2 forward the running units' parameters are plain unsharded copies
            # whose writes are lost at the reshard
            unsharded = [i for i, (p, q) in enumerate(zip(mine, theirs))
                         if not (is_dtensor(p) and is_dtensor(q)) and (p.dim() > 0 or q.dim() > 0)]
            if unsharded:
                raise RuntimeError(
                    f"{len(unsharded)} momentum/online parameter pair(s) of an FSDP2 model are not sharded "
                    "DTensors right now (FSDP2 has unsharded them: the update runs inside the model's forward), "
                    "so the update would be lost at the reshard. Run it before FSDP's hooks: "
                    "vlfast.training.fsdp.shard_model(model, mesh) hoists the model's momentum_update into a "
                    "pre-forward hook that precedes FSDP's, or call MomentumEncoder.update() outside the forward")
            self.__dict__["_zero_master"] = dtensor_momentum_update_(
                mine, theirs, m, master=self.__dict__.get("_zero_master"), backend=self.backend)
            return
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
