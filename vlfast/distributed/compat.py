"""Every DeepSpeed workaround of vlfast, in one place, for the DeepSpeed versions it was tested with.

Each touches a DeepSpeed internal, so each is checked by ``tests/distributed/test_compat.py``
against the installed DeepSpeed (the attributes it patches or reads still exist), and
:func:`check_version` warns once when the installed DeepSpeed is not one of
:data:`TESTED_VERSIONS` (pyproject.toml's ``deepspeed`` extra pins it).

* :func:`zero_dim_broadcast`: DeepSpeed's initial parameter broadcast (``DeepSpeedEngine._broadcast_model``,
  and ZeRO-3's ``partition_parameters.Init._zero_init_param``) views each parameter as bytes,
  which fails for 0-dim parameters (CLIP's ``logit_scale``); for the duration of
  ``deepspeed.initialize`` those are broadcast as flat 1-element views instead.
* :func:`checkpoint_loads`: DeepSpeed reads its checkpoint files through
  ``engine.checkpoint_engine.load`` with ``torch.load(weights_only=False)``, which runs any code a
  crafted file holds; for the duration of ``load_checkpoint`` they are read by a weights-only
  loader that allows only :data:`CHECKPOINT_CLASSES`.
"""

import contextlib
import importlib
import warnings
from typing import Callable, List

import torch

TESTED_VERSIONS = ("0.19.8",)

# The plain data classes DeepSpeed 0.19 pickles into its ZeRO optimizer files (found by loading
# ZeRO-1/2/3 checkpoints with weights_only=True); each is rebuilt from its attributes, none runs code.
CHECKPOINT_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")

_warned = False


class DeepSpeedCompatError(RuntimeError):
    """The installed DeepSpeed lacks something a workaround relies on."""


def check_version() -> str:
    """The installed DeepSpeed's version; warns once if vlfast was not tested with it."""
    global _warned
    import deepspeed

    v = deepspeed.__version__
    if v not in TESTED_VERSIONS and not _warned:
        _warned = True
        warnings.warn(f"DeepSpeed {v} is not a version vlfast was tested with ({', '.join(TESTED_VERSIONS)}); "
                      "its workarounds (vlfast.distributed.compat) may not fit it", RuntimeWarning, stacklevel=2)
    return v


@contextlib.contextmanager
def zero_dim_broadcast():
    """Around ``deepspeed.initialize``: 0-dim parameters broadcast as 1-element views (see the module docstring)."""
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import partition_parameters as pp

    cls = ds_engine.DeepSpeedEngine
    orig = cls._broadcast_model
    orig_init = pp.Init._zero_init_param

    def _broadcast_model(self):
        zero_dim = [p for p in self.module.parameters() if p.dim() == 0]
        if not zero_dim:
            return orig(self)
        saved = [p.data for p in zero_dim]
        for p in zero_dim:
            p.data = p.data.reshape(1)
        try:
            return orig(self)
        finally:
            for p, d in zip(zero_dim, saved):
                d.copy_(p.data.reshape(()))
                p.data = d

    def _zero_init_param(self, param):  # ZeRO-3's conversion broadcasts the same way
        if param.dim() != 0:
            return orig_init(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if pp.dist.get_world_group() == group else pp.dist.get_global_rank(group, 0)
        pp.dist.broadcast(param.data.reshape(1).view(torch.uint8), src, group)
        param.partition()

    cls._broadcast_model = _broadcast_model
    pp.Init._zero_init_param = _zero_init_param
    try:
        yield
    finally:
        cls._broadcast_model = orig
        pp.Init._zero_init_param = orig_init


def checkpoint_classes() -> List[type]:
    """The classes of :data:`CHECKPOINT_CLASSES` in the installed DeepSpeed."""
    import deepspeed

    out = []
    for name in CHECKPOINT_CLASSES:
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            raise DeepSpeedCompatError(f"DeepSpeed {deepspeed.__version__}: {name} is gone (vlfast was tested with "
                                       f"{', '.join(TESTED_VERSIONS)}); cannot read its checkpoints safely") from None
    return out


def checkpoint_loads(engine, load_file: Callable) -> contextlib.AbstractContextManager:
    """A context in which ``engine`` (a ``DeepSpeedEngine``) reads every checkpoint file with
    ``load_file(path, map_location=..., allow=checkpoint_classes())`` (a weights-only loader:
    :func:`vlfast.training.checkpoint.load_file`).  Raises :class:`DeepSpeedCompatError` at once
    when the engine has no ``checkpoint_engine.load`` to route."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not callable(getattr(ce, "load", None)):
        raise DeepSpeedCompatError("this DeepSpeed engine has no checkpoint_engine.load to read checkpoints through")
    allow = checkpoint_classes()

    @contextlib.contextmanager
    def routed():
        def load(path, map_location=None):
            return load_file(path, map_location=map_location, allow=allow)

        ce.load = load  # an instance attribute, removed again below
        try:
            yield
        finally:
            del ce.load

    return routed()
