"""Collectives (torch.distributed only) for contrastive losses across data-parallel ranks.

The lowest distributed layer of vlfast: it imports nothing of vlfast, so ``vlfast.ops``
can use it.

:func:`all_gather_with_grad` is the gather of open_clip's ``gather_with_grad=True``
(and of ``GatherLayer`` in SimCLR / ALBEF-style code): the forward concatenates every
rank's rows, the backward returns to each rank the *sum over ranks* of the gradient
that reached its rows.  With per-rank losses that are means over the local rows and
gradients averaged across ranks afterwards (DDP, DeepSpeed, FSDP), every parameter
gradient then equals the single-process gradient of the loss over the global batch.
"""

from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["free_port", "world_info", "all_gather_with_grad", "all_gather_no_grad", "all_reduce_sum_no_grad",
           "broadcast_from_rank0"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a local rendezvous: ``MASTER_PORT``)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info(group=None) -> Tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (default: the world group).

    Returns ``(0, 1)`` when ``torch.distributed`` is unavailable or not initialized, so
    callers can use the same code with and without a process group.
    """
    if not _initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (rows are gathered along dim 0), "
                         f"got a 0-dim tensor")


def _is_nccl(group, device: torch.device) -> bool:
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # device-mapped backends, e.g. "cpu:gloo,cuda:nccl"
        parts = dict(p.split(":", 1) for p in backend.split(",") if ":" in p)
        backend = parts.get(device.type, backend)
    return "nccl" in backend and device.type == "cuda"


def _check_shapes(x: torch.Tensor, group, world: int) -> None:
    """Every rank must hold a tensor of one shape; raise a ValueError listing them otherwise."""
    dev = x.device if _is_nccl(group, x.device) else torch.device("cpu")
    if x.dim() > 8:
        raise ValueError(f"x must have at most 8 dimensions, got {x.dim()}")
    meta = torch.full((9,), -1, dtype=torch.int64, device=dev)
    meta[0] = x.dim()
    meta[1:1 + x.dim()] = torch.tensor(list(x.shape), dtype=torch.int64, device=dev)
    out = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(out, meta, group=group)
    shapes = [tuple(int(s) for s in m[1:1 + int(m[0])].tolist()) for m in out]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"x must have the same shape (equal row counts) on every rank, got {shapes} "
                         f"(rank order); pad or drop the last batch so that every rank has as many rows")


def _gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    x = x.contiguous()
    if _is_nccl(group, x.device):
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, 0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.group, ctx.rank, ctx.world, ctx.n = group, rank, world, x.shape[0]
        return _gather(x, group, world)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        n = ctx.n
        if _is_nccl(ctx.group, g.device):
            out = g.new_empty((n,) + tuple(g.shape[1:]))
            dist.reduce_scatter_tensor(out, g, op=dist.ReduceOp.SUM, group=ctx.group)
        else:  # gloo (and others without reduce_scatter): sum everything, keep this rank's rows
            g = g.clone()
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
            out = g[ctx.rank * n:(ctx.rank + 1) * n]
        return out, None, None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    r"""Concatenate ``x`` of every rank along dim 0, differentiably.

    Forward: ``(N, ...)`` on each of the W ranks of ``group`` -> ``(W * N, ...)``, rank r's
    rows at ``[r * N, (r + 1) * N)`` (the same tensor on every rank).

    Backward: with ``G_s`` the gradient of the gathered tensor on rank s, rank r receives
    :math:`\sum_s G_s[rN:(r+1)N]` -- ``reduce_scatter_tensor(SUM)`` on NCCL, ``all_reduce(SUM)``
    followed by a slice on gloo and other backends (chosen by ``dist.get_backend(group)``).
    This is the right gradient of :math:`\sum_s \mathrm{loss}_s`; after data-parallel
    gradient averaging, of the mean of the per-rank losses.

    Every rank must pass a tensor of the same shape (checked with one small all_gather;
    a mismatch raises ``ValueError`` on every rank).  Without an initialized process group,
    or with one rank, returns ``x`` itself.

    Args:
        x: tensor with at least one dimension.
        group: process group (default: the world group).
    """
    _check_tensor("x", x)
    rank, world = world_info(group)
    if world == 1:
        return x
    _check_shapes(x, group, world)
    return _AllGatherWithGrad.apply(x, group, rank, world)


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, without gradient (MoCo's ``concat_all_gather``).

    ``(N, ...)`` per rank -> ``(W * N, ...)`` in rank order, detached.  Every rank must pass
    the same shape (``ValueError`` otherwise).  Without an initialized process group, or with
    one rank, returns ``x.detach()``.

    Args:
        x: tensor with at least one dimension.
        group: process group (default: the world group).
    """
    _check_tensor("x", x)
    rank, world = world_info(group)
    if world == 1:
        return x.detach()
    _check_shapes(x, group, world)
    with torch.no_grad():
        return _gather(x.detach(), group, world)


def all_reduce_sum_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``, detached (a new tensor; ``x`` is untouched).

    For normalizers shared by every rank (e.g. the number of masked tokens of the global
    batch).  Without an initialized process group, or with one rank, returns ``x.detach().clone()``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    out = x.detach().clone()
    if world_info(group)[1] > 1:
        dev = x.device if _is_nccl(group, x.device) else torch.device("cpu")
        buf = out.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        out = buf.to(x.device)
    return out


def broadcast_from_rank0(x: torch.Tensor, group=None) -> torch.Tensor:
    """Rank 0's ``x`` (of ``group``) on every rank, as a new tensor (``x`` is untouched).

    For values every rank must share, e.g. a seed drawn on rank 0.  Without an initialized
    process group, or with one rank, returns ``x.detach().clone()``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    out = x.detach().clone()
    if world_info(group)[1] > 1:
        dev = x.device if _is_nccl(group, x.device) else torch.device("cpu")
        if dev.type == "cpu" and _is_nccl(group, torch.device("cuda")) and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())  # NCCL needs CUDA tensors
        buf = out.to(dev)
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(buf, src=src, group=group)
        out = buf.to(x.device)
    return out
