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

from typing import Optional

import torch
from torch import nn

from .. import _validation as check
from ..comm import all_gather_no_grad, all_gather_with_grad, world_info
from ..ops.contrastive import contrastive_loss
from ..ops.contrastive_losses import clip_loss, siglip_loss
from ..reference.contrastive import (albef_itc_reference, clip_loss_reference, moco_loss_reference,
                                     moco_v3_loss_reference, siglip_loss_reference)

__all__ = ["ClipLoss", "SigLipLoss", "MoCoQueueLoss", "MoCoV3Loss", "ITCLoss"]


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


def _gather_pairs(image_features, text_features, gather: bool, group, images_too: bool = True):
    """Eager data parallelism (open_clip's ``gather_features(gather_with_grad=True)``): every rank's
    texts (and images), gathered with their gradients, and this rank's offset; ``{}`` on one process."""
    rank, world = world_info(group) if gather else (0, 1)
    if world == 1:
        return {}
    keys = dict(text_keys=all_gather_with_grad(text_features, group), offset=rank * image_features.shape[0])
    if images_too:
        keys["image_keys"] = all_gather_with_grad(image_features, group)
    return keys


class _PairLoss(nn.Module):
    """The constructor shared by :class:`ClipLoss` and :class:`SigLipLoss` (open_clip's losses)."""

    def __init__(self, gather: bool = True, group=None, backend: Optional[str] = None, *, fused: bool = True):
        super().__init__()
        self.gather = check.flag("gather", gather)
        self.group = group
        self.backend = backend
        #: False runs the eager formula of vlfast.reference; see ``vlfast.models.set_fused``
        self.fused = check.flag("fused", fused)


class ClipLoss(_PairLoss):
    r"""CLIP's symmetric InfoNCE (Radford et al., 2021, arXiv:2103.00020), a drop-in for open_clip's ``ClipLoss``.

    ``loss = (CE(logit_scale * img @ txt.T, arange) + CE(logit_scale * txt @ img.T, arange)) / 2``,
    see :func:`vlfast.ops.contrastive_losses.clip_loss`.  When ``torch.distributed`` is
    initialized and ``gather``, it behaves like open_clip's ``ClipLoss(local_loss=True,
    gather_with_grad=True)``: local rows against the gathered batch, and gradients averaged
    by DDP equal the single-process gradients of the global-batch loss.

    Args:
        gather: all-gather features across ranks when distributed.
        group: process group (default: the world group).
        backend: backend of the contrastive op (``None`` = automatic).
        fused: True: :func:`vlfast.ops.clip_loss` (0-dim fp32, never forms the N x N logits);
            False: open_clip's eager formula :func:`vlfast.reference.clip_loss_reference`
            (the logits materialized, in the features' dtype; gathered the same way).
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        """Loss of image_features (N, D) and text_features (N, D) (normalized) at ``logit_scale``.

        ``logit_bias`` (open_clip's optional shift of every logit) leaves a softmax
        cross-entropy unchanged, so it is accepted and ignored.  Returns the 0-dim loss, or
        ``{"contrastive_loss": loss}`` when ``output_dict``.
        """
        if self.fused:
            loss = clip_loss(image_features, text_features, logit_scale, gather=self.gather, group=self.group,
                             backend=self.backend)
        else:
            img, txt = check.feature_pair(image_features, text_features)
            tau = check.scalar_tensor("logit_scale", logit_scale, img.device)
            loss = clip_loss_reference(img, txt, tau, **_gather_pairs(img, txt, self.gather, self.group))
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(_PairLoss):
    r"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023, arXiv:2303.15343), a drop-in for open_clip's ``SigLipLoss``.

    ``loss = -sum_ij log sigmoid(z_ij (logit_scale * x_i . y_j + logit_bias)) / N`` with
    ``z = 2 I - 1``; see :func:`vlfast.ops.contrastive_losses.siglip_loss` (the data-parallel
    form gathers texts once instead of open_clip's neighbour exchange; same loss and, after
    gradient averaging, same gradients).

    Args:
        gather: all-gather texts across ranks when distributed.
        group: process group (default: the world group).
        backend: backend of the SigLIP op (``None`` = automatic).
        fused: True: :func:`vlfast.ops.siglip_loss` (row tiles, never the N x N logits);
            False: :func:`vlfast.reference.siglip_loss_reference` (materialized logits).
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        """Loss of image_features (N, D), text_features (N, D); returns the loss or ``{"contrastive_loss": loss}``."""
        if self.fused:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, gather=self.gather,
                               group=self.group, backend=self.backend)
        else:
            img, txt = check.feature_pair(image_features, text_features)
            scale = check.scalar_tensor("logit_scale", logit_scale, img.device)
            bias = check.scalar_tensor("logit_bias", logit_bias, img.device)
            loss = siglip_loss_reference(img, txt, scale, bias,
                                         **_gather_pairs(img, txt, self.gather, self.group, images_too=False))
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
