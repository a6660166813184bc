"""Test set-up: run Triton kernels in the interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` kernel is
decorated, i.e. before ``vlfast.kernels`` modules are imported.
"""

import os
import types

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


def fake_z3(full: torch.Tensor, rank: int, world: int, dtype):
    """A stand-in for a ZeRO-3 parameter: empty data, the rank's padded flat shard in ds_tensor."""
    size = -(-full.numel() // world)
    flat = torch.zeros(size * world)
    flat[:full.numel()] = full.reshape(-1)
    p = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    p.ds_id, p.ds_numel, p.ds_shape, p.ds_persist = 0, full.numel(), full.shape, False
    p.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    p.ds_tensor = flat[rank * size:(rank + 1) * size].to(dtype).clone()
    return p
