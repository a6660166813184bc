"""Eager MAE masking (He et al., 2021, "Masked Autoencoders Are Scalable Vision Learners",
arXiv:2111.06377), written as the MAE reference code does it: the test oracle of
:func:`vlfast.ops.random_masking` and :func:`vlfast.ops.unshuffle_tokens`."""

import torch


def random_masking_reference(x, mask_ratio, noise, pos_embed=None):
    """MAE's ``random_masking`` with the positional-embedding add before it.

    ``x`` (B, L, D), ``noise`` (B, L); returns ``(x_masked, mask, ids_restore)``.
    Ties in ``noise`` are broken by the lower index (stable sort).
    """
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, *pos_embed.shape[-2:]).to(x.dtype)
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def unshuffle_tokens_reference(x_kept, ids_restore, mask_token):
    """MAE decoder: append mask tokens and unshuffle back to the original order."""
    B, K, C = x_kept.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, C).to(x_kept.dtype).expand(B, L - K, C)
    x_ = torch.cat([x_kept, mask_tokens], dim=1)
    return torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, C))
