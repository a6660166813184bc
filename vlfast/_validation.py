"""Argument checks shared by every layer of vlfast (private; one place for each kind of mistake).

One exception type per kind of mistake, whoever calls:

* ``TypeError``  the argument has the wrong Python type, or a tensor has the wrong dtype;
* ``ValueError`` the type is right but the shape, device or value is not.

Every message names the argument and says what was expected.  Never ``assert`` what a
caller passes: ``python -O`` strips asserts.  Each check returns the normalized value
(a float, an int, a contiguous tensor...) so call sites read ``x = check_...(...)``.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable, Optional, Sequence, Tuple

import torch

#: dtypes of the attention and contrastive kernels
HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes of the EMA and masking kernels (float64 too)
FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def real(name: str, value, *, allow_tensor: bool = True, finite: bool = True) -> float:
    """A real number (not a bool); a one-element tensor is read with ``.item()`` when allowed."""
    if isinstance(value, torch.Tensor) and allow_tensor:
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def in_range(name: str, value, lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False,
             allow_tensor: bool = True) -> float:
    """A real number in [lo, hi] (open ends where asked); rejects nan."""
    value = real(name, value, allow_tensor=allow_tensor, finite=False)
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):  # nan fails both
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                         f"got {value}")
    return value


def unit_interval(name: str, value, *, hi_open: bool = False) -> float:
    """A weight or probability in [0, 1] (or [0, 1) with ``hi_open``)."""
    return in_range(name, value, 0.0, 1.0, hi_open=hi_open)


def decay(value, name: str = "decay") -> float:
    """An EMA decay / momentum in [0, 1] (float or one-element tensor)."""
    return unit_interval(name, value)


def mask_ratio(value, name: str = "mask_ratio") -> float:
    """MAE's mask ratio: the removed fraction, in [0, 1)."""
    return unit_interval(name, value, hi_open=True)


def integer(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An int (or anything with ``__index__``; not a bool), in [``minimum``, ``maximum``] where given."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def positive_int(name: str, value) -> int:
    return integer(name, value, 1)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def choice(name: str, value, options: Sequence) -> object:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
           shape_doc: Optional[str] = None) -> torch.Tensor:
    """A tensor with ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        doc = shape_doc or f"{ndim} dimensions"
        raise ValueError(f"{name} must have shape {doc}, got {tuple(t.shape)}" if shape_doc else
                         f"{name} must have {doc}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    return t


def bool_mask(name: str, t, shape: Tuple[int, ...], device: torch.device,
              meaning: str = "True = padding") -> torch.Tensor:
    """A bool tensor of ``shape`` on ``device``."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor ({meaning}), got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    same_device(name, t, device)
    return t


def same_device(name: str, t: torch.Tensor, device: torch.device, other: str = "the inputs") -> None:
    if t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but {other} are on {device}")


def features(name: str, t, D: Optional[int] = None) -> torch.Tensor:
    """Contrastive features: (N, D) fp32/fp16/bf16 with N >= 1; returned with a unit last stride."""
    t = tensor(name, t, dtypes=HALF_AND_FLOAT)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
    if D is not None and t.shape[1] != D:
        raise ValueError(f"{name} has feature dim {t.shape[1]}, expected D = {D}")
    if t.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row")
    return t if t.stride(-1) == 1 else t.contiguous()


def feature_pair(image_features, text_features) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paired (N, D) image and text features (one caption per image) of one dtype and device."""
    image_features = features("image_features", image_features)
    text_features = features("text_features", text_features, image_features.shape[1])
    if text_features.shape[0] != image_features.shape[0]:
        raise ValueError(f"text_features must have as many rows as image_features (one caption per image), got "
                         f"{text_features.shape[0]} and {image_features.shape[0]}")
    if text_features.dtype != image_features.dtype:
        raise TypeError(f"text_features must have the dtype of image_features, got {text_features.dtype} and "
                        f"{image_features.dtype}")
    if text_features.device != image_features.device:
        raise ValueError(f"text_features is on {text_features.device} but image_features is on "
                         f"{image_features.device}")
    return image_features, text_features


def positive_real(name: str, value) -> float:
    """A finite real number > 0 (a temperature); not a bool, not a tensor."""
    value = real(name, value, allow_tensor=False)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def scalar_tensor(name: str, v, device: torch.device, *, allow_negative: bool = True) -> torch.Tensor:
    """A float or one-element floating tensor (kept, for its gradient) as a 0-dim tensor on ``device``."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or not v.is_floating_point():
            raise TypeError(f"{name} must be a float or a one-element floating tensor, got {tuple(v.shape)} {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but the features are on {device}")
        return v.reshape(())
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a float or a one-element floating tensor, got {type(v).__name__}")
    if not allow_negative and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return torch.tensor(float(v), dtype=torch.float32, device=device)


def tensor_list(name: str, seq, dtypes: Sequence[torch.dtype] = FLOATING) -> list:
    """A sequence of floating tensors (not a single tensor)."""
    if isinstance(seq, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors, got a single Tensor; wrap it in a list")
    try:
        out = list(seq)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(seq).__name__}") from None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] must be a floating tensor of dtype {_dtype_names(dtypes)}, got {t.dtype}")
    return out
