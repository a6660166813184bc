"""The numpy >= 2.4 fix of Triton <= 3.6's interpreter (``kernels/_common.py::_fix_interpreter_index``,
triton-lang/triton#9171): applied where the interpreter's ``tl.tensor.__index__`` does ``int()`` of a
1-element 1-D array, left out where it works (triton >= 3.7), restored with the interpreter's patches."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language as tl  # noqa: E402

from vlfast.kernels import _common  # noqa: E402

ti = pytest.importorskip("triton.runtime.interpreter")


def _buggy_patch_lang_tensor(tensor, scope):
    """Triton 3.6.0's ``__index__`` patch, as shipped (interpreter.py, ``_patch_lang_tensor``)."""
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


class _Tensor:
    pass


def _scalar(value):
    t = _Tensor()
    t.handle = ti.TensorHandle(np.array([value], dtype=np.int32), tl.int32)
    return t


def test_fix_applies_to_the_buggy_patch_only(monkeypatch):
    monkeypatch.setattr(ti, "_patch_lang_tensor", _buggy_patch_lang_tensor)
    applies = np.lib.NumpyVersion(np.__version__) >= "1.25.0"      # numpy 1.25-2.3 warns, 2.4 raises
    assert _common._fix_interpreter_index() is applies
    assert _common._fix_interpreter_index() is False                  # idempotent
    scope = ti._LangPatchScope()
    ti._patch_lang_tensor(_Tensor, scope)
    assert list(range(0, _scalar(40), 16)) == [0, 16, 32]            # range() over a runtime bound
    scope.restore()
    assert not hasattr(_Tensor, "__index__")


def test_installed_interpreter_converts_scalars():
    """Whatever triton is installed (fixed upstream or by the workaround), a scalar's __index__ works."""
    scope = ti._LangPatchScope()
    ti._patch_lang_tensor(_Tensor, scope)
    try:
        assert int(_scalar(7).__index__()) == 7
    finally:
        scope.restore()
