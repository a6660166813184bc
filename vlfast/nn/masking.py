"""MAE random masking as a module."""

from typing import Optional

import torch
from torch import nn

from .._validation import mask_ratio as _check_ratio
from ..ops.masking import random_masking
from ..reference.masking import random_masking_reference


class RandomMasking(nn.Module):
    r"""MAE's per-sample random masking (He et al., 2021) on the fused op.

    ``forward(x, pos_embed=None, *, noise=None, mask=None, generator=None)`` returns
    ``(x_kept, mask, ids_restore)`` as :func:`vlfast.ops.random_masking`: x (B, L, D),
    x_kept (B, int(L * (1 - mask_ratio)), D), mask (B, L) in x's dtype (1 = removed),
    ids_restore (B, L) int64 for :func:`vlfast.ops.unshuffle_tokens`.  The positional
    embedding, when given, is added to the kept tokens in the same pass.  Masking
    runs in train and eval mode alike, as in MAE.

    Args:
        mask_ratio: fraction of tokens removed, in [0, 1).
        backend: backend of the op (``None`` = automatic).
    """

    def __init__(self, mask_ratio: float = 0.75, *, backend: Optional[str] = None):
        super().__init__()
        self.mask_ratio = _check_ratio(mask_ratio)
        self.backend = backend
        #: False: MAE's eager argsort/gather code with the same noise draw (the baseline)
        self.fused = True

    def forward(self, x: torch.Tensor, pos_embed: Optional[torch.Tensor] = None, *,
                noise: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None):
        ratio = None if mask is not None else self.mask_ratio
        if not self.fused and mask is None:
            if noise is None:
                noise = torch.rand(x.shape[0], x.shape[1], device=x.device, generator=generator)
            return random_masking_reference(x, ratio, noise, pos_embed)
        return random_masking(x, ratio, noise=noise, mask=mask, generator=generator, pos_embed=pos_embed,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"
