"""Contrastive loss modules: open_clip's ``ClipLoss`` / ``SigLipLoss``, MoCo's queue loss, MoCo v3's loss,
ALBEF/BLIP's ITC.

With ``fused=True`` (the default) they run on the memory-linear primitives of
:mod:`vlfast.ops.contrastive`: no module ever materializes the (batch x keys) logit matrix,
its softmax or its gradient, so the queue size (65536 in MoCo / ALBEF / BLIP) and the
global batch (CLIP, SigLIP) only cost O((N + K) D) memory.  With ``fused=False`` (see
:func:`vlfast.models.set_fused`) each runs the papers' eager formula from
:mod:`vlfast.reference.contrastive` on the same inputs, gathers, queues and enqueues: the
baseline that materializes the logits.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as check
from ..comm import all_gather_no_grad, all_gather_with_grad, world_info
from ..ops.contrastive import contrastive_loss
from ..ops.contrastive_losses import clip_loss, siglip_loss
from ..reference.contrastive import (albef_itc_reference, clip_loss_reference, moco_loss_reference,
                                     moco_v3_loss_reference, ntxent_loss_reference, siglip_loss_reference)

__all__ = ["ClipLoss", "SigLipLoss", "MoCoQueueLoss", "MoCoV3Loss", "ITCLoss", "NTXentLoss"]


def _random_unit(rows: int, dim: int) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(rows, dim), dim=1)


def _transpose_layout_hook(names, idx_name=None):
    """load_state_dict pre-hook: accept the (dim, queue_size) queues of MoCo / ALBEF / BLIP by transposing."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        K, dim = module.queue_size, module.dim
        for n in names:
            key = prefix + n
            t = state_dict.get(key)
            if isinstance(t, torch.Tensor) and t.dim() == 2 and tuple(t.shape) == (dim, K) and dim != K:
                state_dict[key] = t.t().contiguous()
        if idx_name is not None:
            key = prefix + idx_name
            t = state_dict.get(key)
            if isinstance(t, torch.Tensor) and tuple(t.shape) == (1, K):  # BLIP's idx_queue (1, K)
                state_dict[key] = t.reshape(K)

    return hook


def _enqueue_(queue: torch.Tensor, ptr: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` at ``queue[ptr : ptr + B]`` and advance ``ptr`` modulo the queue size (in place)."""
    K, B = queue.shape[0], rows.shape[0]
    p = int(ptr[0])
    queue[p:p + B] = rows.to(queue.dtype)
    ptr[0] = (p + B) % K


def _check_divides(batch: int, K: int, what: str):
    if K % batch != 0:
        raise ValueError(f"queue_size ({K}) must be a multiple of the {what} ({batch}), as in MoCo's "
                         f"_dequeue_and_enqueue; choose queue_size = k * batch")


class MoCoV3Loss(nn.Module):
    r"""MoCo v3's InfoNCE (Chen, Xie and He, 2021, "An Empirical Study of Training Self-Supervised
    Vision Transformers", arXiv:2104.02057): moco-v3's ``MoCo.contrastive_loss``.

    .. math::
        \hat q = q / \lVert q\rVert, \quad \hat k = k / \lVert k\rVert, \qquad
        \mathrm{loss} = 2T \cdot \mathrm{CE}\big(\hat q\, \hat k_{\mathrm{all}}^\top / T,\ \mathrm{arange}(N) + rN\big)

    ``forward(q, k)``: queries q (N, D) and keys k (N, D), fp32 / fp16 / bf16 (in MoCo the keys
    come from the momentum encoder, without gradient).  When ``torch.distributed`` is
    initialized the keys of every rank are gathered (no gradient, moco-v3's
    ``concat_all_gather``) and rank r's query i has the positive key ``r N + i``.
    Returns a 0-dim loss (fp32 when fused; in q's dtype when not).

    Args:
        temperature: T (moco-v3: 0.2 for ViT, 1.0 for ResNet).
        backend: backend of the contrastive op (``None`` = automatic).
        fused: True: :func:`vlfast.ops.contrastive_loss` at ``logit_scale = 1 / T`` (tile-wise,
            never stores the N x M logits); False: moco-v3's eager code
            :func:`vlfast.reference.moco_v3_loss_reference` (materialized logits).
    """

    def __init__(self, temperature: float = 0.2, *, backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self.temperature = check.positive_real("temperature", temperature)
        self.backend = backend
        #: False runs moco-v3's eager code (vlfast.reference); see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        q, k = check.features("q", q), check.features("k", k, q.shape[1])
        if k.dtype != q.dtype:
            raise TypeError(f"k must have the dtype of q, got {k.dtype} and {q.dtype}")
        q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
        rank, world = world_info()
        if world > 1:
            k = all_gather_no_grad(k)
        offset = rank * q.shape[0]
        if not self.fused:
            return moco_v3_loss_reference(q, k, T, offset=offset)
        positives = None if offset == 0 else torch.arange(offset, offset + q.shape[0], device=q.device)
        return contrastive_loss(q, k, 1.0 / T, positives=positives, backend=self.backend) * (2 * T)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, fused={self.fused}"


#: dtype of open_clip's loss for a configuration, see :func:`_open_clip_dtype`
_OPEN_CLIP_DTYPES: Dict[tuple, torch.dtype] = {}


def _open_clip_dtype(kind: str, features: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of the loss open_clip's ``ClipLoss`` (``kind="clip"``) / ``SigLipLoss`` returns.

    open_clip computes the logits ``scale * x @ y.T (+ bias)`` in the features' dtype and
    ``cross_entropy`` / ``-logsigmoid(z * logits).sum() / N`` on them, so the loss has the
    features' dtype, except under autocast, whose op lists decide (e.g. ``cross_entropy`` and,
    on CUDA, ``sum`` run in float32).  Rather than copying those lists, the same ops run once on
    a 1 x 1 slice of the inputs (same device, same autocast state) and the answer is cached per
    configuration: one dictionary lookup per call afterwards.
    """
    dev = features.device.type
    autocast = torch.is_autocast_enabled(dev)
    key = (kind, dev, features.dtype, scale.dtype, None if bias is None else bias.dtype, autocast,
           torch.get_autocast_dtype(dev) if autocast else None)
    dtype = _OPEN_CLIP_DTYPES.get(key)
    if dtype is None:
        with torch.no_grad():
            x = features[:1].detach()
            logits = scale.detach() * x @ x.T
            if bias is not None:
                logits += bias.detach()
            if kind == "clip":
                out = F.cross_entropy(logits, torch.zeros(1, dtype=torch.long, device=x.device))
            else:
                labels = torch.ones((1, 1), dtype=x.dtype, device=x.device)
                out = -F.logsigmoid(labels * logits).sum() / 1
        dtype = _OPEN_CLIP_DTYPES[key] = out.dtype
    return dtype


def _bias_term(bias: Optional[torch.Tensor]):
    """``0 * logit_bias``: a softmax ignores a shift of every logit, but open_clip's ``ClipLoss``
    adds ``logit_bias`` to its logits, so the bias gets a (zero) gradient: DDP then sees it used."""
    return None if bias is None or not bias.requires_grad else 0.0 * bias


def _replace_own_rows(gathered: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """open_clip's ``gather_features(gather_with_grad=False, local_loss=False)``: the gathered rows
    (no gradient) with this rank's own block replaced by ``local`` (which keeps its gradient)."""
    n = local.shape[0]
    return torch.cat([gathered[:rank * n], local, gathered[(rank + 1) * n:]], 0)


class _PairLoss(nn.Module):
    """What :class:`ClipLoss` and :class:`SigLipLoss` share: open_clip's ``rank`` / ``world_size``
    (``None``: from ``torch.distributed``), vlfast's ``gather`` / ``group`` / ``backend`` / ``fused``."""

    def _init_common(self, cache_labels, rank, world_size, gather, group, backend, fused) -> None:
        self.cache_labels = check.flag("cache_labels", cache_labels)
        self.rank = None if rank is None else check.integer("rank", rank, 0)
        self.world_size = None if world_size is None else check.positive_int("world_size", world_size)
        self.gather = None if gather is None else check.flag("gather", gather)
        if self.gather is False and self.world_size is not None and self.world_size > 1:
            raise ValueError(f"gather=False (no gather) contradicts world_size={self.world_size}; pass one of them")
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size, got rank={self.rank}, world_size={self.world_size}")
        self.group = group
        self.backend = backend
        #: False runs the eager formula of vlfast.reference; see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)
        # open_clip's label cache (ClipLoss.get_ground_truth)
        self.prev_num_logits = 0
        self.labels = {}

    def __deepcopy__(self, memo):
        # a torch.distributed ProcessGroup cannot be deep-copied (EMA / MomentumEncoder of a model
        # holding the loss): the copy shares ``group``, the rest is copied as nn.Module's default would
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "group" else copy.deepcopy(value, memo)
        return new

    def _world(self) -> Tuple[int, int]:
        """``(rank, world_size)`` of this call: open_clip's when given (checked against the process
        group), else ``torch.distributed``'s; ``(0, 1)`` with ``gather=False``."""
        if self.gather is False:
            return 0, 1
        rank, world = world_info(self.group)
        if self.world_size is None and self.rank is None:
            return rank, world
        ws = world if self.world_size is None else self.world_size
        if ws == 1:  # open_clip: world_size=1 never gathers, whatever the process group
            return 0, 1
        r = rank if self.rank is None else self.rank
        if (r, ws) != (rank, world):
            where = ("torch.distributed is not initialized" if world == 1 and rank == 0 else
                     f"this process is rank {rank} of {world} in the process group")
            raise ValueError(f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}): {where}; "
                             f"pass this process's rank and world size (or leave both None to read them "
                             f"from torch.distributed)")
        return r, ws


class ClipLoss(_PairLoss):
    r"""CLIP's symmetric InfoNCE (Radford et al., 2021, arXiv:2103.00020): open_clip's ``ClipLoss``
    with its arguments and their meaning, on the tile-wise op (never the N x N logits).

    ``loss = (CE(logit_scale * img @ txt.T, labels) + CE(logit_scale * txt @ img.T, labels)) / 2``.
    Data parallel (``world_size > 1``), exactly as open_clip's ``gather_features``:

    ======================================  ==================================================================
    ``local_loss``, ``gather_with_grad``    every rank computes
    ======================================  ==================================================================
    False, False (open_clip's default)      the global loss (W N x W N) of the gathered features; the other
                                            ranks' rows carry no gradient, its own rows do (as queries and
                                            keys): after DDP's averaging the features' gradients are the
                                            global loss's divided by W (open_clip's behaviour), logit_scale's
                                            are the global loss's
    False, True                             the global loss; the gather is differentiable
    True, False                             its N rows against the W N gathered rows (labels
                                            ``arange(N) + rank * N``); the gathered keys, its own included,
                                            carry no gradient
    True, True                              as above with a differentiable gather: after DDP's averaging every
                                            gradient equals the single-process gradient of the global loss
                                            (vlfast's ``gather=True``, :func:`vlfast.ops.clip_loss`)
    ======================================  ==================================================================

    The global loss runs the same tile-wise op on the W N gathered rows (O(W N D) memory, W times
    the local form's compute, as open_clip's full logit matrix does).

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``:
    features (N, D) normalized by the caller; ``logit_scale`` float or one-element tensor;
    ``logit_bias`` (added to every logit by open_clip) leaves a softmax unchanged and gets a zero
    gradient.  Returns the 0-dim loss, or ``{"contrastive_loss": loss}`` with ``output_dict``, in
    the dtype open_clip returns (the features' dtype; float32 under autocast): the op
    accumulates in float32 and the result is cast once.

    Args (open_clip's, in its order):
        local_loss, gather_with_grad: the table above.
        cache_labels: cache the label tensor per device (open_clip's :meth:`get_ground_truth`).
        rank, world_size: this process's place in the data-parallel group, as open_clip's
            training code passes them.  ``None`` (the default here; open_clip's defaults are 0
            and 1): read from ``torch.distributed`` (``group``) at each call, so one process
            computes the local loss and a process group gathers.  Given explicitly,
            ``world_size=1`` never gathers (open_clip) and values that contradict the process
            group raise ``ValueError``.
        use_horovod: must be False (vlfast gathers with ``torch.distributed`` only).

    vlfast's keyword arguments:
        gather: ``None``: gather when the world (above) has several ranks.  ``True``:
            vlfast's data-parallel form, ``local_loss=True, gather_with_grad=True`` (the default
            of :func:`vlfast.ops.clip_loss`); ``False``: never gather (the local loss).
        group: process group (default: the world group).
        backend: backend of the contrastive op (``None`` = automatic).
        fused: True: :func:`vlfast.ops.clip_loss` / :func:`vlfast.ops.contrastive_loss`
            (tile-wise); False: open_clip's eager formula :func:`vlfast.reference.clip_loss_reference`
            (the logits materialized, in the features' dtype; gathered the same way).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None, use_horovod: bool = False, *,
                 gather: Optional[bool] = None, group=None, backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self.local_loss = check.flag("local_loss", local_loss)
        self.gather_with_grad = check.flag("gather_with_grad", gather_with_grad)
        if check.flag("use_horovod", use_horovod):
            raise ValueError("use_horovod=True is not supported: vlfast.nn.ClipLoss gathers with torch.distributed "
                             "(initialize a process group, e.g. with torchrun, instead of horovod)")
        self.use_horovod = False
        self._init_common(cache_labels, rank, world_size, gather, group, backend, fused)
        if self.gather:
            if self.local_loss != self.gather_with_grad:
                raise ValueError(f"gather=True is open_clip's local_loss=True, gather_with_grad=True; it contradicts "
                                 f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}")
            self.local_loss = self.gather_with_grad = True

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, fused={self.fused}")

    def get_ground_truth(self, device, num_logits: int) -> torch.Tensor:
        """open_clip's labels: ``arange(num_logits)`` (``+ num_logits * rank`` for the local loss of
        several ranks), cached per device with ``cache_labels``."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            rank, world = self._world()
            if world > 1 and self.local_loss:
                labels = labels + num_logits * rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        """Loss of image_features (N, D) and text_features (N, D) at ``logit_scale`` (see the class)."""
        img, txt = check.feature_pair(image_features, text_features)
        tau = check.scalar_tensor("logit_scale", logit_scale, img.device)
        bias = None if logit_bias is None else check.scalar_tensor("logit_bias", logit_bias, img.device)
        out_dtype = _open_clip_dtype("clip", img, tau, bias)
        rank, world = self._world()
        n = img.shape[0]
        if world == 1:
            if self.fused:
                loss = clip_loss(img, txt, tau, gather=False, backend=self.backend)
            else:
                loss = clip_loss_reference(img, txt, tau)
        elif self.local_loss and self.fused and self.gather_with_grad:  # vlfast's data-parallel form
            loss = clip_loss(img, txt, tau, gather=True, group=self.group, backend=self.backend)
        elif self.local_loss:
            gather = all_gather_with_grad if self.gather_with_grad else all_gather_no_grad
            all_img, all_txt = gather(img, self.group), gather(txt, self.group)
            if self.fused:
                pos = self.get_ground_truth(img.device, n)
                loss = 0.5 * (contrastive_loss(img, all_txt, tau, positives=pos, backend=self.backend)
                              + contrastive_loss(txt, all_img, tau, positives=pos, backend=self.backend))
            else:
                loss = clip_loss_reference(img, txt, tau, image_keys=all_img, text_keys=all_txt, offset=rank * n)
        else:  # the global loss, on every rank
            if self.gather_with_grad:
                all_img, all_txt = all_gather_with_grad(img, self.group), all_gather_with_grad(txt, self.group)
            else:
                all_img = _replace_own_rows(all_gather_no_grad(img, self.group), img, rank)
                all_txt = _replace_own_rows(all_gather_no_grad(txt, self.group), txt, rank)
            if self.fused:
                loss = 0.5 * (contrastive_loss(all_img, all_txt, tau, backend=self.backend)
                              + contrastive_loss(all_txt, all_img, tau, backend=self.backend))
            else:
                loss = clip_loss_reference(all_img, all_txt, tau)
        zero = _bias_term(bias)
        if zero is not None:
            loss = loss + zero
        loss = loss.to(out_dtype)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(_PairLoss):
    r"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023, arXiv:2303.15343): open_clip's ``SigLipLoss``
    with its arguments and their meaning, on the tile-wise op (never the N x N logits).

    ``loss = -sum_ij log sigmoid(z_ij (logit_scale * x_i . y_j + logit_bias)) / N``, ``z = 2 I - 1``.
    Data parallel (``world_size > 1``): rank r's N images against the texts of every rank
    (positives: its own), divided by its N; the texts of other ranks carry their gradient back.
    open_clip's ``dist_impl`` values ``"bidir"`` (its default), ``"shift"``, ``"reduce"`` and
    ``"gather"`` are four communication patterns of this one loss with the same gradients; here
    each runs as one differentiable all-gather of the texts (:func:`vlfast.ops.siglip_loss`):
    same loss and gradients, O(W N D) memory for the gathered texts, where ``"bidir"`` /
    ``"shift"`` hold one or two peers' texts at a time at the price of W - 1 exchanges.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``
    returns the 0-dim loss or ``{"contrastive_loss": loss}``, in the dtype open_clip returns.

    Args (open_clip's, in its order):
        cache_labels: accepted (open_clip keeps it for a label cache it does not use).
        rank, world_size: as :class:`ClipLoss` (``None``: from ``torch.distributed``).
        dist_impl: ``None`` (= ``"bidir"``), ``"bidir"``, ``"shift"``, ``"reduce"`` or ``"gather"``.

    vlfast's keyword arguments: ``gather`` (``None``: gather when there are several ranks;
    ``False``: never), ``group``, ``backend``, ``fused`` (False:
    :func:`vlfast.reference.siglip_loss_reference`, materialized logits), as :class:`ClipLoss`.
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
                 dist_impl: Optional[str] = None, *, gather: Optional[bool] = None, group=None,
                 backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self._init_common(cache_labels, rank, world_size, gather, group, backend, fused)
        self.dist_impl = check.choice("dist_impl", dist_impl or "bidir", self.DIST_IMPLS)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, fused={self.fused}"

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        """Loss of image_features (N, D), text_features (N, D); returns the loss or ``{"contrastive_loss": loss}``."""
        img, txt = check.feature_pair(image_features, text_features)
        scale = check.scalar_tensor("logit_scale", logit_scale, img.device)
        bias = check.scalar_tensor("logit_bias", logit_bias, img.device)
        out_dtype = _open_clip_dtype("siglip", img, scale, bias)
        rank, world = self._world()
        if self.fused:
            loss = siglip_loss(img, txt, scale, bias, gather=world > 1, group=self.group, backend=self.backend)
        elif world > 1:
            loss = siglip_loss_reference(img, txt, scale, bias, text_keys=all_gather_with_grad(txt, self.group),
                                         offset=rank * img.shape[0])
        else:
            loss = siglip_loss_reference(img, txt, scale, bias)
        loss = loss.to(out_dtype)
        return {"contrastive_loss": loss} if output_dict else loss


class MoCoQueueLoss(nn.Module):
    r"""MoCo's InfoNCE against a queue of negative keys (He et al., 2020, arXiv:1911.05722; MoCo v2:
    Chen et al., 2020, arXiv:2003.04297).

    For normalized queries ``q`` (N, dim) and momentum keys ``k`` (N, dim), with the queue
    ``Q`` (K, dim) *as it was before this batch* and temperature T, MoCo computes
    ``CE(cat([q.k, q @ Q.T], 1) / T, 0)`` (:func:`vlfast.reference.moco_loss_reference`).
    Here (``fused=True``), without building the (N, K + 1) logits:

    .. math::
        s_i = \langle q_i, k_i\rangle / T, \qquad
        \mathrm{loss}_i = \mathrm{logaddexp}\big(s_i, \mathrm{LSE}_j \langle q_i, Q_j\rangle / T\big) - s_i,

    the log-sum-exp over the queue from :func:`vlfast.ops.contrastive_loss` (per-query losses
    against the queue with query i's positive at queue row i are ``LSE_i - <q_i, Q_i> / T``;
    adding ``<q_i, Q_i> / T`` back leaves the LSE).  The loss is the mean over i (0-dim fp32;
    ``fused=False``: in q's dtype); gradients flow into ``q`` only (``k`` is detached and the
    queue is a buffer, as in MoCo).  Afterwards the keys -- all-gathered across ranks when
    ``torch.distributed`` is initialized (MoCo's ``concat_all_gather``) -- are written to the
    ring buffer at ``queue_ptr``; the (global) batch size must divide ``queue_size``.

    Buffers (in the ``state_dict``): ``queue`` (queue_size, dim) float32, initialized to
    random unit vectors; ``queue_ptr`` (1,) int64.  ``load_state_dict`` also accepts MoCo's
    own layout ``queue`` (dim, queue_size), transposing it (not detectable when
    dim == queue_size).

    Args:
        dim: feature dimension (MoCo: 128).
        queue_size: K, the number of queued negatives (MoCo: 65536).
        temperature: T (MoCo v1: 0.07, v2: 0.2).
        backend: backend of the contrastive op (``None`` = automatic).
        fused: True: the tiled op; False: MoCo's eager logits (the baseline).
    """

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.2, backend: Optional[str] = None,
                 *, fused: bool = True):
        super().__init__()
        self.dim = check.positive_int("dim", dim)
        self.queue_size = check.positive_int("queue_size", queue_size)
        self.temperature = check.positive_real("temperature", temperature)
        self.backend = backend
        #: False runs the eager formula of vlfast.reference; see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)
        self.register_buffer("queue", _random_unit(self.queue_size, self.dim))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_load_state_dict_pre_hook(_transpose_layout_hook(("queue",)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, queue_size={self.queue_size}, temperature={self.temperature}, fused={self.fused}"

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, dim) -- all-gathered across ranks when distributed -- at ``queue_ptr``
        and advance it by B modulo ``queue_size`` (MoCo's ``_dequeue_and_enqueue``).

        Raises ``ValueError`` when the gathered B does not divide ``queue_size``.
        """
        keys = check.features("keys", keys, self.dim)
        keys = all_gather_no_grad(keys)
        _check_divides(keys.shape[0], self.queue_size, "global batch size")
        _enqueue_(self.queue, self.queue_ptr, keys)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Loss of queries ``q`` (N, dim) and keys ``k`` (N, dim), then enqueue ``k``."""
        q = check.features("q", q, self.dim)
        k = check.features("k", k, self.dim).detach()
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k must have as many rows as q, got {k.shape[0]} and {q.shape[0]}")
        if k.device != q.device:
            raise ValueError(f"k is on {k.device} but q is on {q.device}")
        if self.queue.device != q.device:
            raise ValueError(f"q is on {q.device} but the queue is on {self.queue.device}; move the module")
        keys_all = all_gather_no_grad(k)
        _check_divides(keys_all.shape[0], self.queue_size, "global batch size")
        # a copy: the backward needs the queue of this batch, which the enqueue below overwrites
        queue = self.queue.detach().to(q.dtype, copy=True)
        if self.fused:
            inv_t = 1.0 / self.temperature
            n = q.shape[0]  # <= queue_size, which the global batch divides
            qf = q.float()
            lse_neg = (contrastive_loss(q, queue, inv_t, reduction="none", backend=self.backend)
                       + (qf * queue[:n].float()).sum(1) * inv_t)
            s_pos = (qf * k.float()).sum(1) * inv_t
            loss = (torch.logaddexp(s_pos, lse_neg) - s_pos).mean()
        else:
            loss = moco_loss_reference(q, k, queue, self.temperature)
        with torch.no_grad():
            _enqueue_(self.queue, self.queue_ptr, keys_all)
        return loss


class ITCLoss(nn.Module):
    r"""Image-text contrastive loss with momentum queues and distillation (ALBEF: Li et al., 2021,
    arXiv:2107.07651; BLIP: Li et al., 2022, arXiv:2201.12086).

    With queues ``I_q``, ``T_q`` (K, dim), keys ``T = cat([text_feat_m, T_q])`` and
    ``I = cat([image_feat_m, I_q])`` (momentum features, no gradient) and the learnable
    temperature ``temp`` (clamped in place to [0.001, 0.5] at every forward, as ALBEF):

    .. math::
        \mathrm{sim}^{i2t} = \mathrm{image\_feat}\, T^\top / \mathrm{temp}, \quad
        t^{i2t} = \alpha\, \mathrm{softmax}(\mathrm{image\_feat\_m}\, T^\top / \mathrm{temp})
            + (1 - \alpha)\, y, \quad
        L_{i2t} = \mathrm{mean}_i -\textstyle\sum_j t^{i2t}_{ij} \log\mathrm{softmax}(\mathrm{sim}^{i2t}_i)_j

    and symmetrically ``L_t2i`` (text_feat vs I, soft targets from text_feat_m);
    ``loss = (L_i2t + L_t2i) / 2``.  Hard targets ``y``: the diagonal (key i of the current
    batch) when ``idx`` is None (ALBEF pre-training), else BLIP's
    ``pos = (idx[:, None] == cat([idx, idx_queue])[None]); y = pos / pos.sum(1)`` (every
    queued or in-batch sample of the same image id is a positive; queue slots hold -100
    until filled).  Computed by :func:`vlfast.ops.contrastive_loss` without the
    (N, N + K) similarity matrices; gradients reach ``image_feat``, ``text_feat`` and ``temp``.

    After the loss, the momentum features (and ``idx``) -- all-gathered across ranks when
    distributed -- are enqueued at ``queue_ptr``; the global batch must divide ``queue_size``.
    With ``fused=False`` the loss is ALBEF's eager formula
    (:func:`vlfast.reference.albef_itc_reference`, materializing the (N, N + K) similarities, in
    the features' dtype) with the same temperature clamp, gathers, queues and enqueue.

    ``gather=False`` (ALBEF / BLIP): the in-batch keys are this rank's momentum features.
    ``gather=True``: they are every rank's (all-gathered, no gradient needed: keys are
    momentum features), so the keys are ``cat([all_gather(text_feat_m), T_q])`` and query
    ``i`` of rank ``r``'s positive is key ``r * N + i`` (with ``idx``: the gathered ids);
    the mean over ranks of the per-rank losses is then the single-process loss of the
    global batch, whatever the number of ranks.

    Parameters / buffers: ``temp`` (nn.Parameter, 0-dim); ``image_queue``, ``text_queue``
    (queue_size, dim) float32 random unit vectors; ``idx_queue`` (queue_size,) int64 filled
    with -100; ``queue_ptr`` (1,) int64.  ``load_state_dict`` also accepts ALBEF/BLIP's
    layout ((dim, queue_size) queues, (1, queue_size) ``idx_queue``).

    Args:
        dim: embedding dim (ALBEF / BLIP: 256).
        queue_size: K (ALBEF / BLIP: 65536; BLIP retrieval 57600).
        temperature: initial ``temp`` (0.07).
        alpha: default weight of the momentum-distillation targets (0.4); ``forward(alpha=...)``
            overrides it (ALBEF ramps it up during the first epoch).
        backend: backend of the contrastive op (``None`` = automatic).
        gather: in-batch keys from every rank of ``group`` (see above); default False.
        group: process group of the gathers (default: the world group).
        fused: True: :func:`vlfast.ops.contrastive_loss` (0-dim fp32); False: the eager formula.
    """

    TEMP_MIN, TEMP_MAX = 0.001, 0.5

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.07, alpha: float = 0.4,
                 backend: Optional[str] = None, *, gather: bool = False, group=None, fused: bool = True):
        super().__init__()
        self.gather = check.flag("gather", gather)
        self.group = group
        self.dim = check.positive_int("dim", dim)
        self.queue_size = check.positive_int("queue_size", queue_size)
        temperature = check.positive_real("temperature", temperature)
        self.alpha = check.unit_interval("alpha", alpha)
        self.backend = backend
        #: False runs ALBEF's eager formula (vlfast.reference); see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)
        self.temp = nn.Parameter(torch.tensor(temperature, dtype=torch.float32))
        self.register_buffer("image_queue", _random_unit(self.queue_size, self.dim))
        self.register_buffer("text_queue", _random_unit(self.queue_size, self.dim))
        self.register_buffer("idx_queue", torch.full((self.queue_size,), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_load_state_dict_pre_hook(_transpose_layout_hook(("image_queue", "text_queue"), "idx_queue"))

    def __deepcopy__(self, memo):
        # copy.deepcopy of a module holding it (EMA, MomentumEncoder): a torch.distributed
        # ProcessGroup cannot be deep-copied, so the copy shares ``group``; the rest is copied
        # as nn.Module's default deepcopy would
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "group" else copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, queue_size={self.queue_size}, alpha={self.alpha}, fused={self.fused}"

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                            idx: Optional[torch.Tensor] = None) -> None:
        """Enqueue momentum features (B, dim) and ids (B,) -- all-gathered when distributed -- at ``queue_ptr``.

        ALBEF / BLIP's ``_dequeue_and_enqueue``; without ``idx`` the id slots are reset to -100.
        Raises ``ValueError`` when the gathered B does not divide ``queue_size``.
        """
        img = all_gather_no_grad(check.features("image_feat_m", image_feat_m, self.dim), self.group)
        txt = all_gather_no_grad(check.features("text_feat_m", text_feat_m, self.dim), self.group)
        ids = None if idx is None else all_gather_no_grad(idx.reshape(-1).long(), self.group)
        _check_divides(img.shape[0], self.queue_size, "global batch size")
        self._write(img, txt, ids)

    def _write(self, img, txt, ids):
        if ids is None:  # no ids: the slots are reset
            ids = torch.full((img.shape[0],), -100, dtype=torch.long, device=img.device)
        p = int(self.queue_ptr[0])
        for q, rows in ((self.image_queue, img), (self.text_queue, txt)):
            self.queue_ptr[0] = p
            _enqueue_(q, self.queue_ptr, rows)
        self.queue_ptr[0] = p
        _enqueue_(self.idx_queue, self.queue_ptr, ids)

    def _check_idx(self, idx, n, device):
        if idx is None:
            return None
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be an integer tensor of N = {n} sample ids, got {type(idx).__name__}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
        if idx.numel() != n:
            raise ValueError(f"idx must hold N = {n} ids (shape (N,) or (N, 1)), got shape {tuple(idx.shape)}")
        if idx.device != device:
            raise ValueError(f"idx is on {idx.device} but the features are on {device}")
        return idx.reshape(n).long()

    def forward(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                text_feat_m: torch.Tensor, alpha: Optional[float] = None,
                idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ITC loss (0-dim fp32) of normalized features (N, dim) each; then enqueue the momentum features.

        Args:
            image_feat, text_feat: (N, dim) online features (receive gradients).
            image_feat_m, text_feat_m: (N, dim) momentum features (detached).
            alpha: distillation weight for this call (default: ``self.alpha``).
            idx: optional (N,) or (N, 1) integer image ids (BLIP retrieval positives).
        """
        image_feat = check.features("image_feat", image_feat, self.dim)
        dtype, device = image_feat.dtype, image_feat.device
        n = image_feat.shape[0]
        feats = {}
        for name, t in (("text_feat", text_feat), ("image_feat_m", image_feat_m), ("text_feat_m", text_feat_m)):
            t = check.features(name, t, self.dim)
            if t.shape[0] != n:
                raise ValueError(f"{name} must have N = {n} rows like image_feat, got {t.shape[0]}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but image_feat is on {device}")
            feats[name] = t
        text_feat = feats["text_feat"].to(dtype)
        image_feat_m = feats["image_feat_m"].detach()
        text_feat_m = feats["text_feat_m"].detach()
        if self.image_queue.device != device:
            raise ValueError(f"image_feat is on {device} but the queues are on {self.image_queue.device}; "
                             f"move the module")
        a = self.alpha if alpha is None else check.unit_interval("alpha", alpha)
        idx = self._check_idx(idx, n, device)

        img_all, txt_all, ids_all, offset = self._gathered_keys(image_feat_m, text_feat_m, idx)
        with torch.no_grad():
            self.temp.clamp_(self.TEMP_MIN, self.TEMP_MAX)
        if self.fused:
            loss = self._fused_loss(image_feat, text_feat, image_feat_m, text_feat_m, a, idx,
                                    img_all, txt_all, ids_all, offset)
        else:
            keys = dict(image_keys_m=img_all, text_keys_m=txt_all, idx_keys=ids_all, offset=offset) \
                if self.gather else {}
            loss = albef_itc_reference(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                                       self.text_queue, self.temp, a, idx=idx,
                                       idx_queue=None if idx is None else self.idx_queue, **keys)
        with torch.no_grad():
            self._write(img_all, txt_all, ids_all)
        return loss

    def _fused_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, a, idx, img_all, txt_all, ids_all,
                    offset):
        dtype, device, n = image_feat.dtype, image_feat.device, image_feat.shape[0]
        logit_scale = 1.0 / self.temp
        if self.gather:
            in_img, in_txt, in_ids = img_all, txt_all, ids_all
        else:
            in_img, in_txt, in_ids = image_feat_m, text_feat_m, idx
        text_keys = torch.cat([in_txt.to(dtype), self.text_queue.to(dtype)], 0)
        image_keys = torch.cat([in_img.to(dtype), self.image_queue.to(dtype)], 0)
        if idx is not None:
            positives = (idx, torch.cat([in_ids, self.idx_queue]))
        elif offset:
            positives = torch.arange(offset, offset + n, device=device)
        else:
            positives = None
        soft = a > 0
        i2t = contrastive_loss(image_feat, text_keys, logit_scale, positives=positives,
                               soft_query=image_feat_m.to(dtype) if soft else None,
                               soft_keys=text_keys if soft else None, alpha=a, backend=self.backend)
        t2i = contrastive_loss(text_feat, image_keys, logit_scale, positives=positives,
                               soft_query=text_feat_m.to(dtype) if soft else None,
                               soft_keys=image_keys if soft else None, alpha=a, backend=self.backend)
        return 0.5 * (i2t + t2i)

    @torch.no_grad()
    def _gathered_keys(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: Optional[torch.Tensor]):
        """Every rank's momentum features and ids (``None`` without ``idx``) -- enqueued after the
        loss, and the in-batch keys with ``gather`` -- and this rank's offset in them (0 without
        ``gather``: query i's positive key).  Checks that the global batch divides the queue."""
        img_all = all_gather_no_grad(image_feat_m, self.group)
        txt_all = all_gather_no_grad(text_feat_m, self.group)
        ids_all = None if idx is None else all_gather_no_grad(idx, self.group)
        _check_divides(img_all.shape[0], self.queue_size, "global batch size")
        offset = world_info(self.group)[0] * image_feat_m.shape[0] if self.gather else 0
        return img_all, txt_all, ids_all, offset


class NTXentLoss(nn.Module):
    r"""SimCLR's NT-Xent (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations", arXiv:2002.05709, eq. 1; google-research/simclr ``tf2/objective.py``).

    ``forward(z1, z2)``: the projections (N, D) of two views of N images (fp32 / fp16 / bf16, one
    dtype).  With :math:`z = \mathrm{normalize}(\mathrm{cat}(z_1, z_2))` (2N, D) and
    :math:`s_{ij} = \langle z_i, z_j\rangle / T`, row i's positive is its other view
    :math:`p(i) = (i + N) \bmod 2N` and its negatives the other 2N - 2 rows:

    .. math::
        \mathrm{loss} = \frac{1}{2N} \sum_{i} -\log \frac{e^{s_{i p(i)}}}{\sum_{j \ne i} e^{s_{ij}}}

    Returns a 0-dim loss (fp32 when fused; in z's dtype when not).  google-research/simclr
    reports ``reduce_mean(loss_a + loss_b)``, twice this mean over the 2N rows.  The negatives are
    this process's 2N views (no gather across ranks).

    Args:
        temperature: T (SimCLR: 0.1, the default of google-research/simclr and of the paper's
            ImageNet runs at batch 4096 with LARS; the paper's CIFAR-10 ablations use 0.5).
        backend: backend of the contrastive op (``None`` = automatic).
        fused: True: :func:`vlfast.ops.contrastive_loss` with ``exclude_diagonal=True`` at
            ``logit_scale = 1 / T`` (tile-wise, never stores the 2N x 2N logits); False: the eager
            formula :func:`vlfast.reference.ntxent_loss_reference` (materialized logits).
    """

    def __init__(self, temperature: float = 0.1, *, backend: Optional[str] = None, fused: bool = True):
        super().__init__()
        self.temperature = check.positive_real("temperature", temperature)
        self.backend = backend
        #: False runs the eager formula of vlfast.reference; see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1 = check.features("z1", z1)
        z2 = check.features("z2", z2, z1.shape[1])
        if z2.dtype != z1.dtype:
            raise TypeError(f"z2 must have the dtype of z1, got {z2.dtype} and {z1.dtype}")
        if z2.shape[0] != z1.shape[0]:
            raise ValueError(f"z1 and z2 must hold the two views of one batch: got {z1.shape[0]} and "
                             f"{z2.shape[0]} rows")
        check.same_device("z2", z2, z1.device, "z1")
        if not self.fused:
            return ntxent_loss_reference(z1, z2, self.temperature)
        z = F.normalize(torch.cat([z1, z2], 0), dim=1)
        n2 = z.shape[0]
        positives = (torch.arange(n2, device=z.device) + n2 // 2) % n2
        return contrastive_loss(z, z, 1.0 / self.temperature, positives=positives, exclude_diagonal=True,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, fused={self.fused}"
