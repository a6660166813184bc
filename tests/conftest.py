"""Test set-up: run Triton kernels in the interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` kernel is
decorated, i.e. before ``vlfast.kernels`` modules are imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cases_for(op: str):
    """``(device, backend)`` parameters for ``op`` on every device here; unavailable ones skip with the reason."""
    import vlfast  # noqa: F401
    from vlfast._backend import _OPS

    info = _OPS[op]
    out = []
    for device in DEVICES:
        for b in info.backends:
            reason = info.unavailable(b, torch.device(device))
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param(device, b, marks=marks, id=f"{device}-{b}"))
    return out
