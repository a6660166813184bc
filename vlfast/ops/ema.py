"""Fused multi-tensor exponential moving average: ``vlfast.ops.ema_update_``.

Momentum encoders (MoCo: He et al., 2020, arXiv:1911.05722; BYOL: Grill et al., 2020;
ALBEF: Li et al., 2021, arXiv:2107.07651; DINO: Caron et al., 2021) and model
weight averaging (Polyak & Juditsky, 1992; timm's ``ModelEmaV3``) update every
parameter each step.  The usual Python loop launches several kernels and
allocates temporaries per tensor; with a bf16 average, small updates round to
zero.  This op updates a whole list in one pass over memory, in fp32.
"""

from collections import defaultdict
from typing import List, Sequence, Tuple

import torch

from .. import _backend
from .. import _validation as check
from .._native import DTYPE_CODES

OP = _backend.register_op("ema_update_", {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")})

_FLOAT_DTYPES = tuple(DTYPE_CODES)


def _validate(ema, params, decay) -> Tuple[List[torch.Tensor], List[torch.Tensor], float]:
    ema = check.tensor_list("ema", ema, _FLOAT_DTYPES)
    params = check.tensor_list("params", params, _FLOAT_DTYPES)
    if len(ema) != len(params):
        raise ValueError(f"ema and params must have the same length, got {len(ema)} and {len(params)}")
    for i, (e, p) in enumerate(zip(ema, params)):
        if e.shape != p.shape:
            raise ValueError(f"ema[{i}] has shape {tuple(e.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if e.device != p.device:
            raise ValueError(f"ema[{i}] is on {e.device} but params[{i}] is on {p.device}")
    return ema, params, check.decay(decay)


def ema_update_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float, *,
                backend: str = None) -> None:
    r"""In-place exponential moving average of a list of tensors.

    For each ``i``:

    .. math:: \mathrm{ema}_i \leftarrow d\,\mathrm{ema}_i + (1 - d)\,\mathrm{params}_i

    computed in float32 (float64 when either tensor of the pair is float64) and
    stored in ``ema[i]``'s dtype, so an fp32 average of bf16 parameters keeps
    every update, and a bf16 average is rounded once per step (not per operation).

    Args:
        ema: sequence of floating tensors (float32, float16, bfloat16, float64),
            updated in place.  Any shapes; non-contiguous tensors are handled
            (dense layouts directly, others through a contiguous copy).
        params: sequence of the same length; ``params[i]`` has ``ema[i]``'s shape
            and device, any of the same dtypes (they may differ within a pair
            and across the list).  Read only; no gradient flows through the
            update (they are read like ``.data`` in MoCo's code).
        decay: ``d`` in [0, 1] (a float or a one-element tensor).  ``d = 1`` keeps
            ``ema``, ``d = 0`` copies ``params``.
        backend: ``None``/``"auto"``, ``"triton"``, ``"native"`` or ``"torch"``
            (see :mod:`vlfast._backend`).

    On CUDA the list is updated in one kernel launch per (ema dtype, param dtype)
    group: a Triton multi-tensor kernel, or the native CUDA kernel; on CPU the
    native kernel runs one OpenMP pass; the torch backend uses
    ``torch._foreach_lerp_``.  Tensors on several devices are grouped per
    device.  The write is recorded for autograd (each ``ema[i]``'s version counter
    is bumped, as any in-place op does).  An empty list is a no-op.

    Raises:
        TypeError: an element is not a floating tensor, or ``decay`` is not a number.
        ValueError: length, shape (naming the index) or device mismatch; ``decay``
            outside [0, 1].
        RuntimeError: an ``ema`` tensor requires grad while grad mode is on (as
            any in-place update of a leaf would), or the requested backend cannot run.
    """
    ema, params, decay = _validate(ema, params, decay)
    if not ema:
        return
    if torch.is_grad_enabled():
        for i, e in enumerate(ema):
            if e.requires_grad:
                raise RuntimeError(
                    f"ema[{i}] requires grad: an in-place EMA update is not differentiable; "
                    "call ema_update_ under torch.no_grad() or pass tensors that do not require grad")
    by_device = defaultdict(list)
    for i, e in enumerate(ema):
        by_device[e.device].append(i)
    # Plain tensors in eager mode skip the dispatcher (~100 us for a ViT's list) and bump the
    # version counters here; under torch.compile or with tensor subclasses the registered op runs.
    direct = not torch.compiler.is_compiling() and all(
        type(t) in _PLAIN for t in ema) and all(type(t) in _PLAIN for t in params)
    if direct and not torch.is_inference_mode_enabled():  # what the dispatcher would refuse
        for i, e in enumerate(ema):
            if e.is_inference():
                raise RuntimeError(f"ema[{i}] is an inference tensor: in-place updates of inference tensors "
                                   "are only allowed inside torch.inference_mode()")
    for device, idx in by_device.items():
        name = OP.select(device, backend)
        e_list = ema if len(by_device) == 1 else [ema[i] for i in idx]
        p_list = params if len(by_device) == 1 else [params[i] for i in idx]
        if direct:
            with torch.no_grad():
                _ema_update_impl(e_list, p_list, decay, name)
            torch.autograd.graph.increment_version(e_list)
        else:
            torch.ops.vlfast.ema_update_([e.detach() for e in e_list], [p.detach() for p in p_list], decay, name)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


# ------------------------------------------------------------------ implementations
def _dense_same_layout(e: torch.Tensor, p: torch.Tensor) -> bool:
    """Both tensors cover one gap-free memory span with the same element order."""
    if e.is_contiguous() and p.is_contiguous():
        return True
    if e.stride() != p.stride():
        return False
    dims = sorted((st, sz) for st, sz in zip(e.stride(), e.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _stage(ema, params):
    """Working lists the kernels can treat as flat spans, plus the copies to write back.

    Contiguous pairs, and dense pairs with one layout (e.g. both transposed), are used
    as they are: the kernels only need each tensor's first address and element count
    (``data_ptr()`` is the lowest address of a dense tensor).  Other pairs go through
    contiguous copies; the ema copy is written back afterwards.
    """
    work_e, work_p, writeback = [], [], []
    for e, p in zip(ema, params):
        if e.numel() == 0:
            continue
        if _dense_same_layout(e, p):
            work_e.append(e)
            work_p.append(p)
        else:
            ec = e.contiguous()
            work_e.append(ec)
            work_p.append(p.contiguous())
            if ec is not e:
                writeback.append((e, ec))
    return work_e, work_p, writeback


def _grouped(ema, params):
    groups = defaultdict(lambda: ([], []))
    for e, p in zip(ema, params):
        g = groups[(e.dtype, p.dtype)]
        g[0].append(e)
        g[1].append(p)
    return groups


_ema_update_kernel = _backend.triton_launcher("ema", "ema_update_")


@OP.implement("triton")
def _ema_update_triton(ema, params, decay):
    for es, ps in _grouped(ema, params).values():
        _ema_update_kernel(es, ps, decay)


@OP.implement("native")
def _ema_update_native(ema, params, decay):
    from .. import _native

    C = _native.require()
    args = ([e.data_ptr() for e in ema], [DTYPE_CODES[e.dtype] for e in ema],
            [p.data_ptr() for p in params], [DTYPE_CODES[p.dtype] for p in params],
            [e.numel() for e in ema], decay)
    device = ema[0].device
    if device.type == "cuda":
        with torch.cuda.device(device):
            C.ema_update_cuda(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        C.ema_update_cpu(*args)


@OP.implement("torch")
def _ema_update_torch(ema, params, decay):
    weight = 1.0 - decay
    for (ed, pd), (es, ps) in _grouped(ema, params).items():
        compute = torch.promote_types(torch.promote_types(ed, pd), torch.float32)
        ps = ps if pd == compute else [p.to(compute) for p in ps]
        if ed == compute:
            torch._foreach_lerp_(es, ps, weight)
        else:
            tmp = [e.to(compute) for e in es]
            torch._foreach_lerp_(tmp, ps, weight)
            torch._foreach_copy_(es, tmp)


def _ema_update_impl(ema, params, decay, backend):
    work_e, work_p, writeback = _stage(ema, params)
    if work_e:
        OP.impl(backend)(work_e, work_p, decay)
    for e, ec in writeback:
        e.copy_(ec)


@torch.library.custom_op("vlfast::ema_update_", mutates_args=("ema",))
def _ema_update_op(ema: List[torch.Tensor], params: List[torch.Tensor], decay: float, backend: str) -> None:
    _ema_update_impl(ema, params, decay, backend)


@_ema_update_op.register_fake
def _(ema, params, decay, backend):
    return None
