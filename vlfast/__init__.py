"""vlfast: fused training kernels for vision-language and self-supervised models.

Layers (one op is found by its name in each):

* ``vlfast.kernels``   Triton kernels and their launchers (top-level ``kernels/``)
* ``vlfast._C``        the native C++/OpenMP/CUDA extension (``csrc/``), optional at import
* ``vlfast.ops``       public functional ops: validation, backend dispatch, torch.library registration
* ``vlfast.nn``        drop-in modules
* ``vlfast.reference`` eager PyTorch formulas, the test oracle
"""

__version__ = "0.1.0"

from . import ops, nn, reference, schedules  # noqa: E402,F401
from ._backend import available_backends, backend_report  # noqa: E402,F401
from .patch import patch  # noqa: E402,F401

__all__ = ["ops", "nn", "reference", "schedules", "available_backends", "backend_report", "patch", "__version__"]
