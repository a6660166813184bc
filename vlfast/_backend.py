"""Backend dispatch shared by every vlfast op.

Every op has three implementations:

``"triton"``  Triton kernels from ``vlfast.kernels``: CUDA tensors; CPU tensors only
              when ``TRITON_INTERPRET=1`` is set (the Triton interpreter, which is how
              CI runs every kernel).  Never chosen automatically on CPU.
``"native"``  the ``vlfast._C`` extension (C++/OpenMP on CPU, CUDA kernels when the
              extension was built with CUDA).
``"torch"``   pure PyTorch; always available.

Selection, for each call:

1. ``backend=`` passed to the op, else
2. the ``VLFAST_BACKEND`` environment variable: a backend name for every op
   (``VLFAST_BACKEND=native``) or per-op entries (``VLFAST_BACKEND=ema_update_=torch,attention=triton``),
3. else ``"auto"``: the first available backend of the op's preference list for the
   tensors' device type.

An explicitly requested backend that cannot run raises ``RuntimeError`` with the
reason.  Automatic selection that has to skip a preferred backend logs the reason
once (logger ``"vlfast"``).
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("triton", "native", "torch", "xformers")
ENV_VAR = "VLFAST_BACKEND"

log = logging.getLogger("vlfast")
_logged: set = set()


def _log_once(key, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(msg)


# ---------------------------------------------------------------- availability checks
def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_triton_error: Optional[str] = None
_triton_checked = False


def _triton_import_error() -> Optional[str]:
    global _triton_checked, _triton_error
    if not _triton_checked:
        _triton_checked = True
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything else
            _triton_error = f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return _triton_error


def triton_unavailable(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    err = _triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        if triton_interpret():
            return ("TRITON_INTERPRET=1 is set: the interpreter runs kernels on the host, which vlfast's "
                    "multi-tensor kernels cannot do for CUDA tensors; unset it to compile for the GPU")
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        return None
    if device.type == "cpu":
        if triton_interpret():
            return None
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
    return f"Triton kernels run on CUDA tensors, not on {device.type}"


def native_unavailable(device: torch.device) -> Optional[str]:
    """Why the native extension cannot run on ``device`` (None when it can)."""
    from . import _native

    if _native.load() is None:
        return _native.error()
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _native.has_cuda():
            return ("vlfast._C was built without CUDA kernels (rebuild with a CUDA toolkit and a "
                    "CUDA build of torch, or VLFAST_CUDA=1)")
        return None
    return f"the native extension has no kernels for {device.type} tensors"


def torch_unavailable(device: torch.device) -> Optional[str]:
    return None


def xformers_unavailable(device: torch.device) -> Optional[str]:
    """Why xformers (optional, never required) cannot run on ``device``."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (optional: pip install xformers)"
    if device.type != "cuda":
        return f"xformers kernels run on CUDA tensors, not on {device.type}"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # a broken or mismatched build raises anything
        return f"xformers cannot be imported ({type(exc).__name__}: {exc})"
    return None


_CHECKS: Dict[str, Callable[[torch.device], Optional[str]]] = {
    "triton": triton_unavailable,
    "native": native_unavailable,
    "torch": torch_unavailable,
    "xformers": xformers_unavailable,
}


def device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current CUDA device and stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- op registry
DEFAULT_PART = "default"


@dataclass
class Op:
    """One op's implementations, one per backend (and per part, for ops built of several steps).

    Created by :func:`register_op`; each implementation is registered with the
    :meth:`implement` decorator, next to its code::

        OP = _backend.register_op("unshuffle_tokens", {"cuda": ("triton", "torch"), "cpu": ("native", "torch")},
                                  native_devices=("cpu",))

        @OP.implement("torch")
        def _unshuffle_torch(src, ids_restore, fill): ...

    An op built of several steps (``random_masking``: a selection step and a gather step)
    registers each step under a ``part`` name; every backend of the op implements every part.
    """

    name: str
    preference: Dict[str, Tuple[str, ...]]
    native_devices: Tuple[str, ...] = ("cpu", "cuda")
    impls: Dict[str, Dict[str, Callable]] = field(default_factory=dict)

    @property
    def backends(self) -> Tuple[str, ...]:
        """The backends that implement this op, in :data:`BACKENDS` order."""
        return tuple(b for b in BACKENDS if b in self.impls)

    def implement(self, backend: str, part: str = DEFAULT_PART):
        """Decorator: register ``fn`` as this op's ``backend`` implementation of ``part``."""
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {backend!r}; backends are {BACKENDS}")

        def deco(fn: Callable) -> Callable:
            parts = self.impls.setdefault(backend, {})
            if part in parts:
                raise ValueError(f"{self.name}: backend {backend!r} part {part!r} is registered twice")
            parts[part] = fn
            _cache.clear()
            return fn

        return deco

    def impl(self, backend: str, part: str = DEFAULT_PART) -> Callable:
        """The registered implementation (``backend`` as returned by :meth:`select`)."""
        try:
            return self.impls[backend][part]
        except KeyError:
            raise ValueError(f"{self.name} has no {backend!r} implementation of {part!r} "
                             f"(backends: {', '.join(self.backends)})") from None

    def order(self, device: torch.device) -> Tuple[str, ...]:
        return tuple(b for b in self.preference.get(device.type, ("torch",)) if b in self.impls)

    def unavailable(self, backend: str, device: torch.device) -> Optional[str]:
        """Why ``backend`` cannot run this op on ``device`` (None when it can)."""
        if backend not in self.impls:
            return f"{self.name} has no {backend!r} implementation (it has {', '.join(self.backends)})"
        if backend == "native" and device.type not in self.native_devices:
            return (f"vlfast._C has no {self.name} kernel for {device.type} tensors "
                    f"(native kernels: {', '.join(self.native_devices)})")
        return _CHECKS[backend](device)

    def select(self, device: torch.device, backend: Optional[str] = None) -> str:
        """The backend that runs this op on ``device`` (see the module docstring); cached."""
        return select(self.name, device, backend)


_OPS: Dict[str, Op] = {}
# (op, device type, requested backend, VLFAST_BACKEND, TRITON_INTERPRET) -> chosen backend.  What the
# checks read besides these (an installed extension, CUDA) does not change within a process.
_cache: Dict[tuple, str] = {}


def register_op(name: str, preference: Dict[str, Tuple[str, ...]],
                native_devices: Tuple[str, ...] = ("cpu", "cuda")) -> Op:
    """Create the registry entry of op ``name``: its backend preference order per device type."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is registered twice")
    for order in preference.values():
        for b in order:
            if b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r} in preference of {name}")
    op = Op(name, dict(preference), native_devices=tuple(native_devices))
    _OPS[name] = op
    return op


def get_op(name: str) -> Op:
    """The registry entry of op ``name`` (``KeyError`` names the registered ops)."""
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no vlfast op {name!r}; registered: {', '.join(sorted(_OPS))}") from None


def registered_ops() -> Tuple[str, ...]:
    return tuple(sorted(_OPS))


def clear_cache() -> None:
    """Forget cached selections (after changing what an availability check sees, e.g. in a test)."""
    _cache.clear()


def triton_launcher(module: str, name: str) -> Callable:
    """An implementation that imports ``vlfast.kernels.<module>`` on first call and runs launcher ``name``
    with the device of its first tensor argument (or of the first tensor of a leading list argument)
    current: Triton launches on the current device and stream."""
    def run(*args, **kwargs):
        import importlib

        fn = getattr(importlib.import_module(f"vlfast.kernels.{module}"), name)
        first = args[0]
        if isinstance(first, (list, tuple)):
            first = first[0]
        with device_guard(first.device):
            return fn(*args, **kwargs)

    run.__name__ = run.__qualname__ = f"triton:{module}.{name}"
    return run


def _env_request(op: str, raw: str) -> Optional[str]:
    raw = raw.strip()
    if not raw:
        return None
    if "=" not in raw:
        return raw
    for item in raw.split(","):
        key, _, value = item.partition("=")
        if key.strip() == op:
            return value.strip()
    return None


def select(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """Return the backend that runs ``op`` on ``device`` (see the module docstring).

    The choice is cached per (op, device type, requested backend, ``VLFAST_BACKEND``,
    ``TRITON_INTERPRET``), so the per-call cost is a dictionary lookup.
    """
    env = os.environ.get(ENV_VAR, "")
    key = (op, device.type, backend, env, os.environ.get("TRITON_INTERPRET", ""))
    hit = _cache.get(key)
    if hit is not None:
        return hit
    chosen = _select_uncached(get_op(op), device, backend, env)
    _cache[key] = chosen
    return chosen


def _select_uncached(info: Op, device: torch.device, backend: Optional[str], env: str) -> str:
    op = info.name
    source = "backend="
    if backend is None:
        backend = _env_request(op, env)
        source = ENV_VAR
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"vlfast.ops.{op}: {source} must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend != "auto":
        reason = info.unavailable(backend, device)
        if reason is not None:
            raise RuntimeError(
                f"vlfast.ops.{op}: backend {backend!r} (requested by {source}) cannot run on "
                f"{device.type} tensors: {reason}")
        return backend
    skipped = []
    for b in info.order(device):
        reason = info.unavailable(b, device)
        if reason is None:
            if skipped:
                why = "; ".join(f"{s}: {r}" for s, r in skipped)
                _log_once((op, device.type, b), f"vlfast.ops.{op} on {device.type}: using backend {b!r} ({why})")
            return b
        skipped.append((b, reason))
    raise RuntimeError(f"vlfast.ops.{op}: no backend can run on {device.type} tensors: {skipped}")


def available_backends(op: str, device) -> Dict[str, Optional[str]]:
    """``{backend: None if it can run else the reason}`` for ``op`` on ``device``."""
    device = torch.device(device)
    info = get_op(op)
    return {b: info.unavailable(b, device) for b in info.backends}


def backend_report(device="cpu"):
    """One row per registered op: ``(op, auto-selected backend or error, {backend: reason-or-None})``.

    The ops register themselves when :mod:`vlfast.ops` is imported (``vlfast.ops.backend_report``
    does so first)."""
    device = torch.device(device)
    rows = []
    for name in sorted(_OPS):
        try:
            chosen = select(name, device)
        except RuntimeError as exc:
            chosen = f"error: {exc}"
        rows.append((name, chosen, available_backends(name, device)))
    return rows

