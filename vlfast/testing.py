"""Accuracy helpers for testing vlfast ops and code built on them (public).

vlfast's own tests use this module, and so can a project that adds a backend or wraps
an op: the same tolerances, the same rule for fused kernels, the same backend cases.
Importing it needs torch only; :func:`cases_for` imports pytest when it is called.

Two ways to judge a result (the habits of FlagGems' ``flag_gems/testing`` and of
flash-attention's ``tests/test_flash_attn.py``):

* :func:`assert_close` compares with a reference using a per-dtype tolerance
  (:data:`FORWARD_TOLERANCE`, :data:`GRAD_TOLERANCE`), after upcasting both to float64,
  so the reference may be computed in float64 and the result in bf16.
* :func:`assert_within_eager_error` is the rule for fused kernels in low precision: the
  fused result's error against a float64 reference must be at most ``factor`` times
  the error of eager PyTorch math run in the same low precision (2x for outputs,
  3x for gradients), plus a small floor (:data:`EAGER_ERROR_FLOOR`).  It asks the
  kernel to be as accurate as the code it replaces, not more.

Typical use::

    from vlfast.testing import DEVICES, assert_close, assert_within_eager_error, cases_for

    @pytest.mark.parametrize("device,backend", cases_for("attention"))
    def test_attention(device, backend):
        ...
        assert_within_eager_error(out, out_eager_bf16, out_ref_fp64)                  # 2x
        assert_within_eager_error(dq, dq_eager_bf16, dq_ref_fp64, factor=GRAD_FACTOR)  # 3x
"""

from __future__ import annotations

import math
import numbers
import types
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .comm import free_port

__all__ = [
    "DEVICES", "Tolerance", "FORWARD_TOLERANCE", "GRAD_TOLERANCE", "EAGER_ERROR_FLOOR", "FORWARD_FACTOR",
    "GRAD_FACTOR", "tolerance", "assert_close", "max_abs_error", "assert_within_eager_error", "cases_for",
    "fake_zero3_param", "free_port", "run_gloo_ranks",
]

#: Devices every device-parametrized test runs on here: ``"cpu"``, and ``"cuda"`` when torch sees a GPU.
DEVICES: List[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Tolerance(NamedTuple):
    """``|actual - expected| <= atol + rtol * |expected|``, elementwise (as :func:`torch.testing.assert_close`)."""

    atol: float
    rtol: float


_EXACT = Tolerance(0.0, 0.0)

#: Default tolerance of a forward result by the dtype it was computed in.  Loose enough for
#: a different reduction order than the reference (tiled kernels, fused softmax), tight
#: enough to catch a wrong scale, mask or index: about 100 ulp near 1 in float32, 4 ulp in bf16.
FORWARD_TOLERANCE: Dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-10, 1e-7),
    torch.float32: Tolerance(2e-5, 2e-5),
    torch.float16: Tolerance(1e-3, 1e-3),
    torch.bfloat16: Tolerance(3e-2, 3e-2),
}

#: Default tolerance of a gradient by its dtype: a backward pass sums over one more
#: dimension than the forward (rows of a softmax, the batch of a weight), so its rounding
#: error is larger.
GRAD_TOLERANCE: Dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-9, 1e-7),
    torch.float32: Tolerance(1e-4, 1e-4),
    torch.float16: Tolerance(5e-3, 5e-3),
    torch.bfloat16: Tolerance(5e-2, 5e-2),
}

#: Absolute floor of :func:`assert_within_eager_error`, relative to ``max(max|reference|, 1)``.
#: Eager math in low precision is sometimes exact (a gradient that is 0, one key, a
#: softmax of equal logits), and then "at most 2x eager's error" would demand exactness;
#: the floor, a small fraction of one ulp of the dtype near 1, allows the few ulps of a
#: different reduction order without hiding a real error (which is >= 1 ulp).
EAGER_ERROR_FLOOR: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}

#: :func:`assert_within_eager_error`'s factor for forward outputs and for gradients (flash-attention's).
FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_dtype(name: str, dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    return dtype


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not value >= 0 or not math.isfinite(value):  # nan fails
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def tolerance(dtype: torch.dtype, *, grad: bool = False) -> Tolerance:
    """The default :class:`Tolerance` of a result computed in ``dtype``.

    Floating dtypes come from :data:`FORWARD_TOLERANCE` (or :data:`GRAD_TOLERANCE` with
    ``grad=True``); integer and bool results must be exact.
    """
    dtype = _check_dtype("dtype", dtype)
    if not isinstance(grad, bool):
        raise TypeError(f"grad must be a bool, got {type(grad).__name__}")
    if dtype.is_floating_point or dtype.is_complex:
        table = GRAD_TOLERANCE if grad else FORWARD_TOLERANCE
        real = dtype.to_real() if dtype.is_complex else dtype
        if real not in table:
            raise ValueError(f"dtype {dtype} has no default tolerance (known: "
                             f"{', '.join(str(d) for d in table)}); pass atol= and rtol=")
        return table[real]
    return _EXACT


def _upcast(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    if t.is_floating_point():
        return t.to(torch.float64)
    return t


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
                 grad: bool = False, atol: Optional[float] = None, rtol: Optional[float] = None,
                 equal_nan: bool = False, msg: Optional[str] = None) -> None:
    """Assert ``actual`` is within the tolerance of ``dtype`` of ``expected``.

    Both are upcast to float64 (complex128) first, so ``expected`` can be a float64
    reference for a bf16 ``actual`` and no rounding of the comparison itself matters;
    dtypes are therefore not compared, shapes and devices are.

    Args:
        actual: the result under test.
        expected: the reference, any dtype (usually float64).
        dtype: the precision ``actual`` was computed in, which picks the tolerance
            (default: ``actual.dtype``).  Pass it when a low-precision computation
            returns a float32 result, e.g. a loss of bf16 features.
        grad: use :data:`GRAD_TOLERANCE` (``actual`` is a gradient).
        atol, rtol: override the table's entry (each independently).
        equal_nan: NaN equals NaN.
        msg: prefix of the failure message (what is compared: ``"dq"``, ``"loss"``).

    Raises:
        AssertionError: with torch.testing's report of the worst elements.
    """
    actual, expected = _check_tensor("actual", actual), _check_tensor("expected", expected)
    tol = tolerance(actual.dtype if dtype is None else dtype, grad=grad)
    atol = tol.atol if atol is None else _check_nonnegative("atol", atol)
    rtol = tol.rtol if rtol is None else _check_nonnegative("rtol", rtol)
    if msg is not None and not isinstance(msg, str):
        raise TypeError(f"msg must be a str, got {type(msg).__name__}")
    torch.testing.assert_close(_upcast(actual), _upcast(expected), atol=atol, rtol=rtol, equal_nan=equal_nan,
                               check_dtype=False, msg=None if msg is None else (lambda m: f"{msg}: {m}"))


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |actual - reference|`` in float64; 0 for empty tensors.

    Elements that are equal count as error 0, so matching infinities (the ``-inf``
    log-sum-exp of a fully masked row) are no error; NaN anywhere else gives NaN.
    """
    actual, reference = _check_tensor("actual", actual), _check_tensor("reference", reference)
    if actual.shape != reference.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} differs from the reference's {tuple(reference.shape)}")
    if actual.numel() == 0:
        return 0.0
    a, r = _upcast(actual), _upcast(reference).to(actual.device)
    diff = torch.where(a == r, torch.zeros((), dtype=torch.float64, device=a.device), (a - r).abs())
    return diff.max().item()


def _abs_max(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)] if t.is_floating_point() else t
    return finite.abs().max().item() if finite.numel() else 0.0


def assert_within_eager_error(fused: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor,
                              factor: float = FORWARD_FACTOR, *, dtype: Optional[torch.dtype] = None,
                              atol: Optional[float] = None, what: str = "result"):
    """Assert the fused result is at most ``factor`` times as wrong as eager math.

    The rule (flash-attention's)::

        max|fused - reference| <= factor * max|eager - reference| + floor

    ``reference`` is the same computation in float64, ``eager`` in the low precision
    the fused path ran in.  Use ``factor=2`` (:data:`FORWARD_FACTOR`) for outputs and
    ``factor=3`` (:data:`GRAD_FACTOR`) for gradients.

    The floor: where eager math happens to be exact (its error is 0, e.g. a gradient
    that is exactly zero), the rule alone would demand exactness from a kernel that
    only reorders a reduction.  ``floor`` is ``EAGER_ERROR_FLOOR[dtype] * max(max|reference|, 1)``
    (a fraction of one ulp of ``dtype`` at the reference's scale), or ``atol`` when given.

    Args:
        fused: the result under test.
        eager: the same result from eager PyTorch math in the same dtype.
        reference: the float64 result; same shape as both.
        factor: how many times eager's error the fused result may have (> 0).
        dtype: the low precision, which picks the floor (default ``fused.dtype``).
        atol: an absolute floor instead of the table's.
        what: name in the failure message (``"out"``, ``"dq"``).

    Returns:
        ``(fused_error, eager_error, bound)`` as floats.

    Raises:
        AssertionError: the fused error exceeds the bound, is not finite, the
            shapes differ, or eager's error is not finite (the comparison would mean
            nothing: choose inputs that eager math can represent).
    """
    for name, t in (("fused", fused), ("eager", eager), ("reference", reference)):
        _check_tensor(name, t)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise TypeError(f"factor must be a real number, got {type(factor).__name__}")
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number > 0, got {factor}")
    if not isinstance(what, str):
        raise TypeError(f"what must be a str, got {type(what).__name__}")
    dtype = fused.dtype if dtype is None else _check_dtype("dtype", dtype)
    if atol is None:
        if dtype not in EAGER_ERROR_FLOOR:
            raise ValueError(f"dtype {dtype} has no default floor (known: "
                             f"{', '.join(str(d) for d in EAGER_ERROR_FLOOR)}); pass atol=")
        floor = EAGER_ERROR_FLOOR[dtype] * max(_abs_max(reference), 1.0)
    else:
        floor = _check_nonnegative("atol", atol)
    err_f = max_abs_error(fused, reference)
    err_e = max_abs_error(eager, reference)
    if not math.isfinite(err_f):
        raise AssertionError(f"{what}: fused result is not finite where the reference is (error {err_f})")
    if not math.isfinite(err_e):
        raise AssertionError(f"{what}: eager result is not finite where the reference is (error {err_e}); "
                             f"the rule needs inputs that eager {dtype} math can represent")
    bound = factor * err_e + floor
    if not err_f <= bound:
        raise AssertionError(f"{what}: fused error {err_f:.3g} > {factor:g} x eager error {err_e:.3g} "
                             f"+ floor {floor:.3g} (= {bound:.3g})")
    return err_f, err_e, bound


def cases_for(op: str, devices: Optional[Sequence[str]] = None) -> list:
    """``pytest.param(device, backend)`` for every backend of ``op`` on every device.

    A backend that cannot run on a device here is still listed, marked skip with the
    reason from vlfast's backend registry (what ``vlfast info`` prints), so a test
    report shows what was not run and why.  Ids read ``"cpu-triton"``.

    Args:
        op: a registered op name (``"attention"``, ``"ema_update_"``...).
        devices: device strings (default :data:`DEVICES`).
    """
    import pytest

    from . import _backend, ops  # noqa: F401  (importing vlfast.ops registers every op)

    if not isinstance(op, str):
        raise TypeError(f"op must be a str, got {type(op).__name__}")
    info = _backend.get_op(op)
    out = []
    for device in DEVICES if devices is None else devices:
        for backend in info.backends:
            reason = info.unavailable(backend, torch.device(device))
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return out


def fake_zero3_param(full: torch.Tensor, rank: int, world: int, dtype: torch.dtype) -> torch.nn.Parameter:
    """A stand-in for a DeepSpeed ZeRO-3 parameter, without DeepSpeed or a process group.

    It has what vlfast's shard-local code reads from a partitioned parameter: empty
    ``data``, ``ds_numel`` / ``ds_shape`` of ``full``, ``ds_persist=False``,
    ``ds_status.name == "NOT_AVAILABLE"``, and in ``ds_tensor`` this rank's piece of
    ``full`` flattened and zero-padded to ``world`` equal shards, in ``dtype``.

    Args:
        full: the whole tensor.
        rank: which shard this process holds, in ``[0, world)``.
        world: the number of ranks.
        dtype: dtype of the shard (and of the empty ``data``).
    """
    full = _check_tensor("full", full)
    dtype = _check_dtype("dtype", dtype)
    for name, v in (("rank", rank), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    size = -(-full.numel() // world)
    flat = torch.zeros(size * world)
    flat[:full.numel()] = full.reshape(-1)
    p = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    p.ds_id, p.ds_numel, p.ds_shape, p.ds_persist = 0, full.numel(), full.shape, False
    p.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    p.ds_tensor = flat[rank * size:(rank + 1) * size].to(dtype).clone()
    return p


def _gloo_worker(rank: int, world: int, port: int, fn) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(fn, world: int = 2, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world)`` in ``world`` spawned CPU processes joined in a gloo process group.

    ``fn`` must be picklable (a module-level function).  A failing rank re-raises its
    traceback here (``torch.multiprocessing``'s ``ProcessRaisedException``); ranks still alive
    after ``timeout`` seconds are killed and an ``AssertionError`` is raised.
    """
    import time

    import torch.multiprocessing as mp

    deadline = time.monotonic() + timeout
    ctx = mp.start_processes(_gloo_worker, args=(world, free_port(), fn), nprocs=world, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"distributed workers did not finish within {timeout:g} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
