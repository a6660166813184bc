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


def backends_for(device: str):
    """Backends that can run on ``device`` here (an unavailable one is reported as a skip with its reason)."""
    from vlfast._backend import BACKENDS, _CHECKS

    out = []
    for b in BACKENDS:
        reason = _CHECKS[b](torch.device(device))
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)) if reason else b)
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
