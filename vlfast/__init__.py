"""vlfast: fused training kernels for vision-language and self-supervised models.

Layers, each importing only those above it (one op is found by its name in each):

* ``vlfast.kernels``   Triton kernels and their launchers (top-level ``kernels/``, installed as ``vlfast.kernels``)
* ``vlfast._C``        the native C++/OpenMP/CUDA extension (``csrc/``), optional at import
* ``vlfast.comm``      collectives (torch.distributed only)
* ``vlfast.reference`` eager PyTorch formulas, the test oracle
* ``vlfast.ops``       public functional ops: validation, backend dispatch, torch.library registration
* ``vlfast.sharding``  ZeRO-3 / FSDP shard primitives
* ``vlfast.nn``        drop-in modules; ``vlfast.schedules`` momentum / decay schedules
* ``vlfast.models``    reference models that switch between eager and fused
* ``vlfast.distributed`` the DeepSpeed engine integration; ``vlfast.training`` the trainer (``vlfast train``)
* ``vlfast.integrations`` drop-in use in models built elsewhere (:func:`patch`)
* ``vlfast.bench``     the benchmark harness (``vlfast bench``, top-level ``bench/``); ``vlfast.testing`` test helpers

``import vlfast`` is cheap: it imports no submodule (not even torch). Each name above
is imported on first access (``vlfast.models``, ``from vlfast import nn``), and so are
:func:`available_backends`, :func:`backend_report` and :func:`patch`. The
``torch.ops.vlfast.*`` operators are registered when :mod:`vlfast.ops` is first
imported (by anything that uses an op: ``vlfast.ops``, ``vlfast.nn``, ``vlfast.models``...).
"""

import importlib
import importlib.util

# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic] version = {attr = "vlfast.__version__"}).
__version__ = "0.1.0"

# vlfast.kernels and vlfast.bench come from the checkout's top-level kernels/ and bench/
# folders, mapped into the package by setup.py's package_dir: a checkout that was never
# installed has a vlfast/ without them. Fail here, with the fix, rather than at first use.
if importlib.util.find_spec(__name__ + ".kernels") is None:
    raise ImportError(
        "vlfast is not installed: run `make install` or `pip install --no-build-isolation -e .` in the "
        f"checkout. (vlfast was imported from {__path__[0]}, where vlfast.kernels cannot be found: setup.py "
        "installs the checkout's top-level kernels/ folder as vlfast.kernels. If vlfast is installed "
        "elsewhere, run Python outside the checkout's root, which shadows the installed package.)",
        name=__name__,
    )

# Subpackages and modules that `vlfast.<name>` imports on first access, in layer order.
_SUBMODULES = (
    "kernels",
    "comm",
    "reference",
    "ops",
    "sharding",
    "nn",
    "schedules",
    "models",
    "distributed",
    "training",
    "integrations",
    "testing",
    "bench",
)

# Functions that `vlfast.<name>` imports on first access: name -> (defining module, modules to import first).
# The ops register their backends with vlfast._backend when vlfast.ops is imported, so the backend
# queries import vlfast.ops first.
_FUNCTIONS = {
    "available_backends": ("vlfast._backend", ("vlfast.ops",)),
    "backend_report": ("vlfast._backend", ("vlfast.ops",)),
    "patch": ("vlfast.integrations", ()),
}

# the two tables above and the version (a literal list, for static tools; tests/test_packaging.py checks it)
__all__ = [
    "kernels", "comm", "reference", "ops", "sharding", "nn", "schedules", "models", "distributed", "training",
    "integrations", "testing", "bench", "available_backends", "backend_report", "patch", "__version__",
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _FUNCTIONS:
        module, first = _FUNCTIONS[name]
        for m in first:
            importlib.import_module(m)
        value = getattr(importlib.import_module(module), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *_SUBMODULES, *_FUNCTIONS})
