"""Eager EMA / momentum-encoder updates, as the papers' code writes them."""

from typing import Sequence

import torch


@torch.no_grad()
def ema_update_reference_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """``ema[i] <- decay * ema[i] + (1 - decay) * params[i]``, computed in float64, stored in ema[i]'s dtype.

    The oracle of :func:`vlfast.ops.ema_update_`.
    """
    for e, p in zip(ema, params):
        e.copy_(e.double() * decay + p.double() * (1.0 - decay))


@torch.no_grad()
def model_ema_update_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """The per-tensor loop of timm's ``ModelEmaV3`` (``foreach=False``):
    ``ema.lerp_(param.to(ema.dtype), 1 - decay)`` for each pair.  The eager baseline of
    :class:`vlfast.nn.EMA` (``fused=False``)."""
    for e, p in zip(ema, params):
        e.lerp_(p.to(dtype=e.dtype), 1.0 - decay)


@torch.no_grad()
def moco_momentum_update_(key_params: Sequence[torch.Tensor], query_params: Sequence[torch.Tensor], m: float) -> None:
    """The per-parameter loop of MoCo (He et al., 2020) and ALBEF (Li et al., 2021):
    ``param_k.data = param_k.data * m + param_q.data * (1. - m)``.

    It launches several kernels and allocates temporaries per tensor; it is the
    baseline that ``vlfast.ops.ema_update_`` replaces.
    """
    for pk, pq in zip(key_params, query_params):
        pk.data = pk.data * m + pq.data * (1.0 - m)
