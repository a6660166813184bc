"""Drop-in integrations: :func:`patch` swaps vlfast's fused modules into models built elsewhere.

This layer sits above :mod:`vlfast.nn` (it builds vlfast modules sharing the original
parameters).  ``vlfast.patch`` is this package's :func:`patch`.
"""

from .torch_nn import patch

__all__ = ["patch"]
