"""Test set-up: Triton in its interpreter without a GPU, markers, a fixed seed.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` kernel is decorated,
i.e. before ``vlfast`` (which imports ``vlfast.kernels``) is imported: this file is
loaded before any test module.

Helpers for tests live in :mod:`vlfast.testing` (import them from there, never from
this file).

Markers (registered here; an unregistered marker is an error, as with ``--strict-markers``):

``slow``         single-process tests that take long (whole training runs, benchmark runs,
                 long sequences in the Triton interpreter); ``-m "not slow and not distributed"``
                 is the fast suite (``make test-fast``, under 3 minutes on 2 cores).  Besides the
                 explicit marks, one rule: the ``cpu-triton`` cases of the op tests (tests/ops)
                 are ``slow``: Triton runs CPU tensors only in its interpreter, where these cases
                 take most of the suite's time; the fast suite still runs every Triton kernel in the interpreter
                 through tests/kernels (small sizes), and the op layer on its other backends.
``distributed``  tests that start several processes (gloo ranks, DeepSpeed, ``--nproc``,
                 ``mp.spawn``, subprocess ranks).
``gpu``          tests that need CUDA; skipped automatically without it.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["pytester"]  # tests/test_testing.py runs pytest on small files with this conftest

MARKERS = {
    "slow": "a long single-process test; deselect with -m 'not slow'",
    "distributed": "starts several processes (gloo / DeepSpeed ranks, --nproc, mp.spawn, subprocess ranks)",
    "gpu": "needs CUDA; skipped automatically when torch sees no GPU",
}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def _registered_markers(config) -> set:
    # lines are "name: doc" or "name(args): doc" (pytest's own format for the markers ini option)
    return {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}


_OPS_TESTS = Path(__file__).resolve().parent / "ops"


def _interpreted_op_case(item) -> bool:
    """A (device="cpu", backend="triton") case of an op test, run by Triton's interpreter."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (params.get("device") == "cpu" and params.get("backend") == "triton"
            and _OPS_TESTS in Path(item.path).resolve().parents)


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    known = _registered_markers(config)
    unknown = sorted({(m.name, item.nodeid) for item in items for m in item.iter_markers() if m.name not in known})
    if unknown:
        names = ", ".join(sorted({n for n, _ in unknown}))
        raise pytest.UsageError(f"unregistered pytest markers: {names} (first use: {unknown[0][1]}); "
                                f"register them in tests/conftest.py MARKERS")
    for item in items:
        if _interpreted_op_case(item):
            item.add_marker(pytest.mark.slow)
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA (marker gpu): torch sees no GPU")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
