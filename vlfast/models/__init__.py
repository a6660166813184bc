"""Reference models that run eager or fused: ViT, MAE, CLIP, MoCo v3, ViLT and ALBEF.

``create(name, fused=True, **overrides)`` builds a registered model;
``list_models()`` names them; ``set_fused(model, flag)`` switches an existing model
between the eager baseline (plain PyTorch math attention, eager losses, masking
and momentum loops as the papers' code writes them) and vlfast's fused ops, with
the same parameters.  Every model has ``synthetic_batch(batch_size, *, device=None,
generator=None)``; pretraining models' ``forward(**batch)`` return a dict with a
scalar ``"loss"`` and its parts, ViT returns logits.
"""

from typing import Callable, Dict, List

from torch import nn

from .. import _validation as check

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register ``fn(**overrides) -> nn.Module`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def register_configs(configs: Dict[str, dict], cls: Callable[..., nn.Module], family: str) -> None:
    """Register, for each ``name: cfg`` of ``configs``, ``cls(**{**cfg, **overrides})`` under ``name``."""
    for name, cfg in configs.items():
        _register_config(name, cfg, cls, family)


def _register_config(name: str, cfg: dict, cls: Callable[..., nn.Module], family: str) -> None:
    def build(**overrides) -> nn.Module:
        return cls(**{**cfg, **overrides})

    build.__name__ = name
    build.__doc__ = f"{name}: {family} with {cfg} (overrides change any {cls.__name__} argument)."
    register_model(name)(build)


def _load_all() -> None:
    import importlib

    for mod in ("vit", "mae", "clip", "moco", "vilt", "albef", "blip", "coca", "beit", "simclr", "dino"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":  # a real import error inside the module
                raise


def list_models() -> List[str]:
    """Names accepted by :func:`create`, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def set_fused(model: nn.Module, flag: bool) -> nn.Module:
    """Switch every vlfast component of ``model`` (attention, losses, masking, momentum
    updates: any submodule with a bool ``fused`` attribute, which every ``vlfast.nn`` module
    but ``EMA`` has) to the fused ops (True) or the eager baseline (False): each op's formula
    from :mod:`vlfast.reference`.  Parameters, buffers and ``state_dict`` keys are untouched.
    Returns ``model``; a non-bool ``flag`` raises ``TypeError``."""
    check.flag("flag", flag)
    for m in model.modules():
        if hasattr(m, "fused") and isinstance(m.fused, bool):
            m.fused = flag
    return model


def create(name: str, *, fused: bool = True, **overrides) -> nn.Module:
    """Build the registered model ``name`` (see :func:`list_models`); ``overrides`` change its config."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return set_fused(_REGISTRY[name](**overrides), fused)


__all__ = ["create", "list_models", "set_fused", "register_model", "register_configs"]
