"""Lazy access to the native extension ``vlfast._C``.

The extension takes raw tensor addresses plus dtype codes (see DTYPE_CODES),
so it has no dependency on torch's C++ ABI.

    from vlfast import _native
    C = _native.load()          # module or None
    if C is None: print(_native.error())
    C = _native.require()       # module or RuntimeError with the reason
"""
from __future__ import annotations

import importlib
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

__all__ = ["DTYPE_CODES", "load", "error", "require", "has_cuda", "dtype_code"]

#: dtype codes shared with csrc/ema.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` from the vlfast source tree"

_NO_NATIVE_MARKER = Path(__file__).with_name("_no_native.txt")

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_error: Optional[str] = None


def load() -> Optional[ModuleType]:
    """Import ``vlfast._C`` once; return it, or None when unavailable."""
    global _loaded, _module, _error
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        try:
            _module = importlib.import_module("vlfast._C")
            _error = None
        except ImportError as exc:
            _module = None
            if _NO_NATIVE_MARKER.exists():
                _error = (
                    "vlfast was built without the extension: VLFAST_NO_NATIVE was set "
                    f"({type(exc).__name__}: {exc})"
                )
            else:
                _error = f"vlfast._C could not be imported: {type(exc).__name__}: {exc}"
        _loaded = True
    return _module


def error() -> Optional[str]:
    """Why ``vlfast._C`` is unavailable (with a rebuild hint), or None if it loads."""
    if load() is not None:
        return None
    return f"{_error}; {REBUILD_HINT}"


def require() -> ModuleType:
    """Return ``vlfast._C`` or raise RuntimeError explaining why it is unavailable."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"vlfast native extension unavailable: {error()}")
    return mod


def has_cuda() -> bool:
    """True when the extension loads and was compiled with the CUDA kernels."""
    mod = load()
    return bool(mod is not None and mod.has_cuda())


def dtype_code(dtype: torch.dtype) -> int:
    """Native dtype code of a torch dtype (ValueError for unsupported dtypes)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype} for vlfast native kernels; "
            f"expected one of {list(DTYPE_CODES)}"
        ) from None
