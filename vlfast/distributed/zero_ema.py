"""ZeRO-3 EMA: :class:`ZeroEMA`, an :class:`vlfast.nn.EMA` that averages each rank's shards in place.

Created by :func:`make_ema` (the trainer's factory), which returns a plain
:class:`vlfast.nn.EMA` for a model that is not partitioned.
"""

import contextlib
from typing import Dict, Optional

import torch
from torch import nn

from ..nn.ema import AUTO, EMA, _average_dtype, _lerp_stochastic_round_bf16_
from ..ops.ema import ema_update_
from ..reference.ema import model_ema_update_
from ..sharding import check_plain_shards, gather_full, is_available, is_zero3_param, shard_slice

__all__ = ["ZeroEMA", "make_ema", "is_partitioned"]


def is_partitioned(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return any(is_zero3_param(p) for p in model.parameters())


def make_ema(model: nn.Module, *args, **kwargs) -> EMA:
    """The EMA of ``model``: :class:`ZeroEMA` when DeepSpeed ZeRO-3 has partitioned its parameters,
    else :class:`vlfast.nn.EMA`; the arguments are :class:`vlfast.nn.EMA`'s."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return (ZeroEMA if is_partitioned(model) else EMA)(model, *args, **kwargs)


class ZeroEMA(EMA):
    r""":class:`vlfast.nn.EMA` of a DeepSpeed ZeRO-3 model: every rank averages its own shards.

    :func:`make_ema` returns one when ``model``'s parameters are partitioned (create it
    after ``deepspeed.initialize``); subclass this class for a custom ZeRO-3 EMA.  For each
    partitioned parameter the average is a copy of the local shard ``p.ds_tensor`` in the
    ``dtype`` of :class:`vlfast.nn.EMA` (``"auto"``: float32 for bf16 / fp16 / fp32 shards; a
    ``torch.dtype``: that one; ``None``: the shard's, bf16 ones updated with timm's stochastic
    rounding when ``stochastic_rounding``), so an EMA of a bf16 model keeps the small updates;
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

    The arguments are :class:`vlfast.nn.EMA`'s (timm ``ModelEmaV3``'s, in its order, and
    vlfast's keywords); ``device`` must be None.

    ZeRO++ quantized non-trainable weights are refused; with hpZ
    (``zero_hpz_partition_size > 1``) the average works but :meth:`copy_to` /
    :meth:`swapped_into` are refused (see :func:`vlfast.sharding.check_plain_shards`).
    """

    _shard_local = True

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3, device=None,
                 dtype=AUTO, stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0,
                 foreach: bool = True, exclude_buffers: bool = False, *, warmup: Optional[bool] = None,
                 include_buffers: Optional[bool] = None, backend: Optional[str] = None, fused: bool = True):
        nn.Module.__init__(self)
        self._init_schedule(model, decay=decay, min_decay=min_decay, update_after_step=update_after_step,
                            use_warmup=use_warmup, warmup_gamma=warmup_gamma, warmup_power=warmup_power, dtype=dtype,
                            stochastic_rounding=stochastic_rounding, stochastic_rounding_seed=stochastic_rounding_seed,
                            foreach=foreach, exclude_buffers=exclude_buffers, warmup=warmup,
                            include_buffers=include_buffers, backend=backend, fused=fused)
        include_buffers = not self.exclude_buffers
        if device is not None:
            raise ValueError("device is not supported for a ZeRO-3 EMA (the shards stay with the model's)")
        self._params = dict(model.named_parameters())
        check_plain_shards(list(self._params.items()), "EMA(model)", write=False)
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
            avg = [self._local(p).detach() for p in self._params.values()]
            avg += [buffers[n].detach() for n in self._avg_buffer_names]
            self._avg = [t.to(dtype if isinstance(dtype, torch.dtype) else _average_dtype(dtype, t)).clone()
                         for t in avg]
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
        sr = [self.stochastic_rounding and d.dtype == torch.bfloat16 for d in self._avg]
        dst = [d for d, r in zip(self._avg, sr) if not r]
        cur = [s for s, r in zip(src, sr) if not r]
        if dst and self.fused:
            ema_update_(dst, cur, decay, backend=self.backend)
        elif dst:
            model_ema_update_(dst, cur, decay)
        if any(sr):  # bf16 averages (dtype=None of a bf16 model): timm's stochastic rounding
            ema = [d for d, r in zip(self._avg, sr) if r]
            cur = [s for s, r in zip(src, sr) if r]
            pairs = [(ema, cur)] if self.foreach else [([e], [c]) for e, c in zip(ema, cur)]
            for e, c in pairs:
                _lerp_stochastic_round_bf16_(e, c, 1.0 - decay, self._generator(e[0].device))
        for t, n in zip(self._copies, self._copy_buffer_names):
            t.copy_(buffers[n])

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s local shards and buffers into this EMA (timm's ``ModelEmaV3.set``; no communication)."""
        params, buffers = self._check_model(model)
        src = [self._local(params[n]) for n in self._param_names] + [buffers[n] for n in self._avg_buffer_names]
        for d, s in zip(self._avg, src):
            d.copy_(s)
        for t, n in zip(self._copies, self._copy_buffer_names):
            t.copy_(buffers[n])

    def _full(self, i: int) -> torch.Tensor:
        """The full average of parameter ``i`` (a new tensor; collective for a partitioned one)."""
        p, avg = self._params[self._param_names[i]], self._avg[i]
        if not is_zero3_param(p):
            return avg.clone()
        if avg.device != p.ds_tensor.device:  # gather on the model's (communication) device
            avg = avg.to(p.ds_tensor.device)
        return gather_full(p, avg)

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

        :meth:`vlfast.training.CheckpointManager.save` writes this on rank 0.
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
                    value = shard_slice(p, value.detach().reshape(-1))  # this rank's part only
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
        check_plain_shards([(n, params[n]) for n in self._param_names], "EMA.copy_to", write=True)
        for i, n in enumerate(self._param_names):
            p = params[n]
            if not is_zero3_param(p):
                p.data.copy_(self._avg[i])
                continue
            p.ds_tensor.copy_(self._avg[i])
            if is_available(p) and p.data.numel() == p.ds_numel:
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
        return contextlib.contextmanager(self._swapped)(model)

    def _swapped(self, model: nn.Module):
        params, buffers = self._check_model(model)
        check_plain_shards([(n, params[n]) for n in self._param_names], "EMA.swapped_into", write=True)
        saved = []  # (parameter, saved shard or None when not partitioned, saved full data or None)
        with torch.no_grad():
            for n in self._param_names:
                p = params[n]
                if not is_zero3_param(p):
                    saved.append((p, None, p.data.clone()))
                    continue
                resident = is_available(p) and p.data.numel() == p.ds_numel
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
                    if is_available(p) and p.data.numel() == p.ds_numel:
                        if data is None:  # gathered inside the block (e.g. prefetched): gather again
                            data = gather_full(p, p.ds_tensor)
                        p.data.copy_(data.view(p.data.shape))
                for b, value in saved_buffers:
                    b.copy_(value)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a ZeRO-3 EMA holds only this rank's shards and has no module to run; evaluate the "
                           "model inside `with ema.swapped_into(model):` (or write the average into it with "
                           "copy_to(model))")
