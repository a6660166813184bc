"""CLIP and SigLIP losses on the memory-linear contrastive primitives, single-process or data-parallel.

Both losses follow the "local loss" convention of open_clip (``local_loss=True,
gather_with_grad=True``) and big_vision's SigLIP: each rank scores its own rows against
the all-gathered rows of every rank (:func:`vlfast.distributed.all_gather_with_grad`),
and returns a mean over its local rows.  After the usual data-parallel averaging of
gradients (DDP, DeepSpeed, FSDP), every gradient -- of the features' producers and of
``logit_scale`` / ``logit_bias`` -- equals the single-process gradient of the loss over
the global batch, while no rank ever holds a (global batch)^2 logit matrix: the
primitives of :mod:`vlfast.ops.contrastive` work tile by tile.
"""

from typing import Optional

import torch

from ..comm import all_gather_with_grad, world_info
from .. import _validation as check
from .contrastive import contrastive_loss, siglip_rows

__all__ = ["clip_loss", "siglip_loss"]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *, gather: bool = True,
              group=None, backend: Optional[str] = None) -> torch.Tensor:
    r"""Symmetric InfoNCE of CLIP (Radford et al., 2021), as open_clip's ``ClipLoss``.

    With logits :math:`s_{ij} = \tau \langle x_i, y_j \rangle` (``tau = logit_scale``,
    normally ``model.logit_scale.exp()``; features normalized by the caller):

    .. math::
        L = \tfrac12\Big(\tfrac1N \sum_i -\log \mathrm{softmax}_j(s_{ij})_i
            + \tfrac1N \sum_i -\log \mathrm{softmax}_j(s_{ji})_i\Big)

    computed by two :func:`vlfast.ops.contrastive_loss` calls (image->text, text->image),
    never materializing the N x N logits.

    Data parallel (``torch.distributed`` initialized, ``gather=True``, more than one rank
    in ``group``): rank r scores its N local rows against the W*N gathered rows of the
    other modality, positives ``arange(N) + r * N`` (open_clip's ``local_loss=True``), and
    returns the mean over its local rows.  The mean over ranks of these losses is the
    global-batch loss, and after gradient averaging across ranks every gradient equals the
    single-process gradient of the global-batch loss.  Every rank needs the same N.

    Args:
        image_features: (N, D) fp32 / fp16 / bf16.
        text_features: (N, D), same dtype and device.
        logit_scale: float or one-element tensor (gets a gradient when it requires one).
        gather: all-gather across ranks when distributed; ``False`` gives the local loss.
        group: process group (default: the world group).
        backend: backend of the contrastive op (``None`` = automatic).

    Returns:
        0-dim fp32 loss.
    """
    image_features, text_features = check.feature_pair(image_features, text_features)
    check.flag("gather", gather)
    tau = check.scalar_tensor("logit_scale", logit_scale, image_features.device)
    rank, world = world_info(group) if gather else (0, 1)
    if world == 1:
        i2t = contrastive_loss(image_features, text_features, tau, backend=backend)
        t2i = contrastive_loss(text_features, image_features, tau, backend=backend)
        return 0.5 * (i2t + t2i)
    n = image_features.shape[0]
    all_img = all_gather_with_grad(image_features, group)
    all_txt = all_gather_with_grad(text_features, group)
    pos = torch.arange(n, device=image_features.device) + rank * n
    i2t = contrastive_loss(image_features, all_txt, tau, positives=pos, backend=backend)
    t2i = contrastive_loss(text_features, all_img, tau, positives=pos, backend=backend)
    return 0.5 * (i2t + t2i)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                gather: bool = True, group=None, backend: Optional[str] = None) -> torch.Tensor:
    r"""Sigmoid loss of SigLIP (Zhai et al., 2023), as open_clip's ``SigLipLoss`` / big_vision.

    .. math::
        L = -\frac1N \sum_{i,j} \log \sigma\big(z_{ij} (t \langle x_i, y_j\rangle + b)\big),
        \qquad z_{ij} = +1 \text{ if } i = j \text{ else } -1

    with ``t = logit_scale`` (normally ``exp`` of a learnable parameter) and
    ``b = logit_bias``, N the number of images.  Computed row-tile by row-tile
    (:func:`vlfast.ops.siglip_rows`), never storing N x N.

    Data parallel (``gather=True``, more than one rank): rank r's N images are scored
    against the W*N gathered texts (positive of local image i: text ``r * N + i``) and the
    sum is divided by the local N.  The mean over ranks is the global-batch loss; after
    gradient averaging every gradient (features, ``logit_scale``, ``logit_bias``) equals the
    single-process one.  One all-gather replaces big_vision's ring of ppermutes.

    Args:
        image_features: (N, D) fp32 / fp16 / bf16.
        text_features: (N, D), same dtype and device.
        logit_scale, logit_bias: floats or one-element tensors (differentiable).
        gather: all-gather the texts across ranks when distributed.
        group: process group (default: the world group).
        backend: backend of the SigLIP op (``None`` = automatic).

    Returns:
        0-dim fp32 loss.
    """
    image_features, text_features = check.feature_pair(image_features, text_features)
    check.flag("gather", gather)
    scale = check.scalar_tensor("logit_scale", logit_scale, image_features.device)
    bias = check.scalar_tensor("logit_bias", logit_bias, image_features.device)
    rank, world = world_info(group) if gather else (0, 1)
    n = image_features.shape[0]
    if world > 1:
        text_features = all_gather_with_grad(text_features, group)
    rows = siglip_rows(image_features, text_features, scale, bias, pos_offset=rank * n, backend=backend)
    return rows.sum() / n
