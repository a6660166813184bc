"""Drop-in integrations: :func:`patch` swaps vlfast's fused modules into models built elsewhere.

This layer sits above :mod:`vlfast.nn` (it builds vlfast modules that share the original
parameters).  ``vlfast.patch`` is this package's :func:`patch`.  Each supported library
has a module here (``torch_nn``; the others import their library only when a model uses it).
"""

from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Union

from torch import nn

from . import open_clip, timm, torch_nn, transformers
from ._core import Left, PatchContext, PatchReport, Replaced, walk_and_swap

__all__ = ["patch", "PatchReport", "Replaced", "Left", "INTEGRATIONS"]

log = logging.getLogger("vlfast")

#: The integrations :func:`patch` consults, in order (the first that converts a module wins).
INTEGRATIONS: List = [transformers.INTEGRATION, timm.INTEGRATION, open_clip.INTEGRATION, torch_nn.INTEGRATION]


def patch(model: nn.Module, *, attention: bool = True, masking: bool = True, backend: Optional[str] = None,
          report: bool = False) -> Union[nn.Module, PatchReport]:
    r"""Swap vlfast's fused modules into ``model``, in place; parameters shared, ``state_dict`` keys unchanged.

    Each submodule one of the integrations knows (see :data:`INTEGRATIONS` and the README's
    coverage table) is replaced by a vlfast module that reuses its ``Parameter`` and buffer
    objects (so optimizers built before patching, device, dtype, ``requires_grad`` and weight
    tying stay valid), its hooks and its train/eval mode.  A module shared by several parents
    is replaced once.  Instances are swapped; no class of another library is modified.

    Args:
        model: the module to patch.
        attention: replace attention modules (and select vlfast's attention where a library
            dispatches through a registry).
        masking: replace MAE-style random masking.
        backend: ``backend`` of the replacements' ops (``None``: automatic, or ``VLFAST_BACKEND``;
            see :func:`vlfast.ops.attention`).
        report: return a :class:`PatchReport` instead of the model.

    Returns:
        ``model`` (or, when ``model`` itself is replaced, its replacement); with
        ``report=True`` the :class:`PatchReport` (``.model`` holds the patched model).
        The report's summary is logged on logger ``"vlfast"`` (INFO); a model with nothing
        to patch gets a ``UserWarning`` naming what was looked for.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vlfast.patch expects an nn.Module, got {type(model).__name__}")
    for name, flag in (("attention", attention), ("masking", masking), ("report", report)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    ctx = PatchContext(attention=attention, masking=masking, backend=backend)
    active = [i for i in INTEGRATIONS if i.applies(model)]
    ctx.report.looked_for = [i.looks_for for i in INTEGRATIONS]
    for integ in active:
        prepare = getattr(integ, "prepare", None)
        if prepare is not None:
            prepare(model, ctx)

    def convert(path, module):
        for integ in active:
            new = integ.convert(path, module, ctx)
            if new is not None:
                return new
        return None

    patched = walk_and_swap(model, convert)
    rep = ctx.report
    rep.model = patched
    if not rep.replaced:
        why = f" ({len(rep.left)} left: {rep.summary()})" if rep.left else ""
        warnings.warn("vlfast.patch: nothing to patch in " + type(model).__name__ + "; looked for "
                      + "; ".join(rep.looked_for) + why, UserWarning, stacklevel=2)
    log.info(rep.summary())
    return rep if report else patched
