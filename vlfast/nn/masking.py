"""MAE's masking steps as modules (He et al., 2021, "Masked Autoencoders Are Scalable Vision
Learners", arXiv:2111.06377): :class:`RandomMasking` (encoder) and :class:`UnshuffleTokens` (decoder).

``fused=True`` runs :func:`vlfast.ops.random_masking` / :func:`vlfast.ops.unshuffle_tokens`;
``fused=False`` (see :func:`vlfast.models.set_fused`) runs MAE's eager code from
:mod:`vlfast.reference.masking` on the same noise draw.
"""

from typing import Optional

import torch
from torch import nn

from .. import _validation as check
from ..ops.masking import random_masking, unshuffle_tokens
from ..reference.masking import random_masking_reference, unshuffle_tokens_reference

__all__ = ["RandomMasking", "UnshuffleTokens"]


class RandomMasking(nn.Module):
    r"""MAE's per-sample random masking on the fused op.

    ``forward(x, pos_embed=None, *, noise=None, mask=None, generator=None)`` returns
    ``(x_kept, mask, ids_restore)`` as :func:`vlfast.ops.random_masking`: x (B, L, D)
    floating, x_kept (B, int(L * (1 - mask_ratio)), D) in x's dtype, mask (B, L) in x's
    dtype (1 = removed), ids_restore (B, L) int64 for :class:`UnshuffleTokens`.  With noise
    ``n ~ U(0, 1)`` (B, L) (drawn as ``torch.rand(B, L, generator=generator)`` unless given),
    sample b keeps its ``len_keep`` tokens of smallest noise, in increasing noise order:

    .. code-block:: python

        ids_shuffle = argsort(noise, dim=1); ids_restore = argsort(ids_shuffle, dim=1)
        x_kept = gather(x + pos_embed, 1, ids_shuffle[:, :len_keep])

    The positional embedding ((L, D) or (1, L, D)), when given, is added to the kept
    tokens in the same pass.  Masking runs in train and eval mode alike, as in MAE.  A
    precomputed bool ``mask`` (True = removed) always takes the op.

    Args:
        mask_ratio: fraction of tokens removed, in [0, 1).
        backend: backend of the op (``None`` = automatic).
        fused: True: :func:`vlfast.ops.random_masking` (no sort, one gather pass); False:
            :func:`vlfast.reference.random_masking_reference` (MAE's ``x + pos``, two argsorts,
            two gathers) with the same noise draw, hence the same outputs.
    """

    def __init__(self, mask_ratio: float = 0.75, *, backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self.mask_ratio = check.mask_ratio(mask_ratio)
        self.backend = backend
        #: False runs MAE's eager code (vlfast.reference) with the same noise; see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)

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
        return f"mask_ratio={self.mask_ratio}, fused={self.fused}"


class UnshuffleTokens(nn.Module):
    r"""MAE's decoder step: mask tokens into the removed slots, then undo the shuffle.

    ``forward(x_kept, ids_restore, mask_token)``: x_kept (B, K, C) floating, ids_restore
    (B, L) int64 (from :class:`RandomMasking`), mask_token (C,), (1, C) or (1, 1, C) (cast
    to x_kept's dtype) -> (B, L, C) in x_kept's dtype::

        out = gather(cat([x_kept, mask_token.expand(B, L - K, C)], 1), 1, ids_restore[..., None])

    i.e. ``out[b, j] = x_kept[b, ids_restore[b, j]]`` if ``ids_restore[b, j] < K`` else
    ``mask_token``.  Gradients reach ``x_kept`` and ``mask_token``.

    Args:
        backend: backend of the op (``None`` = automatic).
        fused: True: :func:`vlfast.ops.unshuffle_tokens` (one pass, no concatenation);
            False: :func:`vlfast.reference.unshuffle_tokens_reference` (MAE's ``cat`` + ``gather``).
    """

    def __init__(self, *, backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self.backend = backend
        #: False runs MAE's cat + gather (vlfast.reference); see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)

    def forward(self, x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return unshuffle_tokens(x_kept, ids_restore, mask_token, backend=self.backend)
        return unshuffle_tokens_reference(x_kept, ids_restore, mask_token)

    def extra_repr(self) -> str:
        return f"fused={self.fused}"
