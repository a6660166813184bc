"""Eager contrastive losses that materialize the logits, written as the papers' code does: the test oracles.

Each function builds the full (queries x keys) logit matrix, so memory is quadratic in
the batch (plus queue); the vlfast ops compute the same values tile by tile.
"""

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss_reference", "clip_loss_reference", "siglip_loss_reference", "moco_loss_reference",
           "moco_v3_loss_reference", "albef_itc_reference", "ntxent_loss_reference"]


def contrastive_loss_reference(query: torch.Tensor, keys: torch.Tensor, logit_scale, positives=None,
                               soft_query: Optional[torch.Tensor] = None, soft_keys: Optional[torch.Tensor] = None,
                               alpha: float = 0.0, label_smoothing: float = 0.0,
                               reduction: str = "mean", exclude_diagonal: bool = False) -> torch.Tensor:
    r"""Oracle of :func:`vlfast.ops.contrastive_loss`: ``loss_i = -sum_j t_ij log_softmax(s_i)_j``.

    ``s = logit_scale * query @ keys.T`` (Nq, Nk), computed in the inputs' dtype (pass
    float64 for a high-precision oracle).  Hard targets ``h``: one-hot at ``positives``
    (default ``arange(Nq)``; a LongTensor (Nq,) of key indices; or ``(query_ids, key_ids)``,
    uniform over keys with the query's id), smoothed ``(1 - eps) h + eps / Nk``.  With soft
    features ``t = (1 - alpha) h + alpha softmax(logit_scale * soft_query @ soft_keys.T)``
    (no gradient through the soft part).  ``reduction``: ``"mean" | "sum" | "none"``.

    ``exclude_diagonal`` (NT-Xent, SimCLR): key i leaves query i's softmax for every i < Nq
    (``s_ii = -inf``, in the soft logits too), and the hard target puts no mass there: the
    positive must be another key and smoothing spreads ``eps / (Nk - 1)`` over the other keys;
    with ``(query_ids, key_ids)`` the positives are the keys with the query's id but key i.
    """
    s = logit_scale * query @ keys.T
    Nq, Nk = s.shape
    if exclude_diagonal:
        return _contrastive_loss_exclude_diagonal_reference(s, logit_scale, positives, soft_query, soft_keys, alpha,
                                                            label_smoothing, reduction)
    if positives is None:
        h = torch.zeros_like(s)
        h[torch.arange(Nq), torch.arange(Nq)] = 1
    elif isinstance(positives, torch.Tensor):
        h = torch.zeros_like(s)
        h[torch.arange(Nq), positives] = 1
    else:
        qid, kid = positives
        pos = (qid.view(-1, 1) == kid.view(1, -1)).to(s.dtype)
        h = pos / pos.sum(1, keepdim=True)
    h = (1 - label_smoothing) * h + label_smoothing / Nk
    if soft_query is not None:
        with torch.no_grad():
            soft = F.softmax(logit_scale * soft_query.to(s.dtype) @ soft_keys.to(s.dtype).T, dim=1)
        h = alpha * soft + (1 - alpha) * h
    loss = -(F.log_softmax(s, dim=1) * h).sum(1)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def _contrastive_loss_exclude_diagonal_reference(s, logit_scale, positives, soft_query, soft_keys, alpha,
                                                 label_smoothing, reduction):
    """:func:`contrastive_loss_reference` with ``exclude_diagonal=True`` on the logits ``s`` (Nq, Nk)."""
    Nq, Nk = s.shape
    diag = torch.zeros(Nq, Nk, dtype=torch.bool, device=s.device)
    diag[torch.arange(Nq), torch.arange(Nq)] = True
    if positives is None:
        raise ValueError("exclude_diagonal removes the default positive (key i of query i): pass positives")
    h = torch.zeros_like(s)
    if isinstance(positives, torch.Tensor):
        h[torch.arange(Nq), positives] = 1
    else:
        qid, kid = positives
        pos = ((qid.view(-1, 1) == kid.view(1, -1)) & ~diag).to(s.dtype)
        h = pos / pos.sum(1, keepdim=True)
    h = ((1 - label_smoothing) * h + label_smoothing / (Nk - 1)).masked_fill(diag, 0.0)
    if soft_query is not None:
        with torch.no_grad():
            sh = logit_scale * soft_query.to(s.dtype) @ soft_keys.to(s.dtype).T
            soft = F.softmax(sh.masked_fill(diag, float("-inf")), dim=1)
        h = alpha * soft + (1 - alpha) * h
    logp = F.log_softmax(s.masked_fill(diag, float("-inf")), dim=1).masked_fill(diag, 0.0)
    loss = -(logp * h).sum(1)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def ntxent_loss_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""SimCLR's NT-Xent (Chen et al., 2020, arXiv:2002.05709, eq. 1) over the 2N views of N pairs.

    ``z = normalize(cat([z1, z2]))`` (2N, D), ``sim = z @ z.T / temperature`` with the
    diagonal set to ``-inf`` (a view is never its own negative), the positive of row i is its
    other view ``(i + N) mod 2N``::

        loss = (1 / 2N) sum_i -log( exp(sim[i, pos(i)]) / sum_{j != i} exp(sim[i, j]) )

    The mean over the 2N rows is the paper's ``1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``.
    google-research/simclr (``tf2/objective.py`` ``add_contrastive_loss``) writes the same rows
    as ``softmax_cross_entropy(labels, [logits_ab, logits_aa - 1e9 * I])`` and returns
    ``reduce_mean(loss_a + loss_b)``: twice this value (the mean over N of the two rows' sum).
    z1, z2: (N, D) projections of the two views; computed in their dtype.
    """
    z = F.normalize(torch.cat([z1, z2], 0), dim=1)
    n2 = z.shape[0]
    sim = (z @ z.T / temperature).masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    labels = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    return F.cross_entropy(sim, labels)


def clip_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *,
                        image_keys: Optional[torch.Tensor] = None, text_keys: Optional[torch.Tensor] = None,
                        offset: int = 0) -> torch.Tensor:
    """open_clip ``ClipLoss`` (Radford et al., 2021, arXiv:2103.00020), ``open_clip/loss.py``.

    ``logits_per_image = logit_scale * image_features @ text_features.T`` (N, N),
    ``logits_per_text = logit_scale * text_features @ image_features.T``,
    ``(CE(logits_per_image, arange(N)) + CE(logits_per_text, arange(N))) / 2``.

    Data parallel (open_clip's ``local_loss=True, gather_with_grad=True``): pass every rank's
    features, gathered with their gradients, as ``image_keys`` / ``text_keys`` (M, D); the
    logits are then ``image_features @ text_keys.T`` (N, M) and ``text_features @ image_keys.T``,
    and query i's label is ``offset + i`` (``offset = rank * N``).
    """
    img_keys = image_features if image_keys is None else image_keys
    txt_keys = text_features if text_keys is None else text_keys
    logits_per_image = logit_scale * image_features @ txt_keys.T
    logits_per_text = logit_scale * text_features @ img_keys.T
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                          logit_bias, *, text_keys: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
    """open_clip ``SigLipLoss`` / big_vision sigmoid loss (Zhai et al., 2023, arXiv:2303.15343).

    ``logits = logit_scale * image_features @ text_features.T + logit_bias`` (N, N),
    ``labels = 2 * eye(N) - 1``, ``loss = -logsigmoid(labels * logits).sum() / N``.

    Data parallel: pass every rank's texts (gathered with their gradients) as ``text_keys``
    (M, D); image i's positive is text ``offset + i`` (``offset = rank * N``), every other
    text a negative (what open_clip's neighbour exchange sums up to).
    """
    keys = text_features if text_keys is None else text_keys
    logits = logit_scale * image_features @ keys.T + logit_bias
    n = logits.shape[0]
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), offset + torch.arange(n)] = 1
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


def moco_loss_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's contrastive step (He et al., 2020), ``moco/builder.py``, with the queue stored (K, dim).

    ``l_pos = einsum('nc,nc->n', q, k)[:, None]``, ``l_neg = q @ queue.T`` (N, K),
    ``logits = cat([l_pos, l_neg], 1) / T``, ``loss = CE(logits, zeros(N))``.  ``k`` and the
    queue are detached, as in MoCo.  (MoCo's buffer is ``queue.T``: (dim, K).)
    """
    k = k.detach()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, queue.detach().to(q.dtype))
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def moco_v3_loss_reference(q: torch.Tensor, k: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """MoCo v3's ``contrastive_loss`` (Chen et al., 2021, arXiv:2104.02057), ``moco/builder.py``, on
    features already normalized (and keys gathered across ranks)::

        logits = einsum('nc,mc->nm', q, k) / T       # (N, M)
        labels = arange(N) + offset                  # offset = rank * N
        loss = CE(logits, labels) * (2 * T)
    """
    logits = torch.einsum("nc,mc->nm", q, k) / temperature
    labels = torch.arange(logits.shape[0], dtype=torch.long, device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def albef_itc_reference(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                        text_feat_m: torch.Tensor, image_queue: torch.Tensor, text_queue: torch.Tensor, temp,
                        alpha: float, idx: Optional[torch.Tensor] = None,
                        idx_queue: Optional[torch.Tensor] = None, *,
                        image_keys_m: Optional[torch.Tensor] = None, text_keys_m: Optional[torch.Tensor] = None,
                        idx_keys: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
    """ALBEF's image-text contrastive loss (Li et al., 2021) and BLIP's id-based variant (Li et al., 2022).

    Queues are stored (K, dim) (ALBEF's buffers are their transposes)::

        image_feat_all = cat([image_feat_m, image_queue])        # (N + K, dim)
        text_feat_all  = cat([text_feat_m, text_queue])
        sim_i2t_m = image_feat_m @ text_feat_all.T / temp         # no grad
        sim_t2i_m = text_feat_m @ image_feat_all.T / temp
        sim_targets = eye(N, N + K)                               # ALBEF
                    = pos_idx / pos_idx.sum(1)                    # BLIP: pos_idx = idx[:, None] == idx_all
        sim_i2t_targets = alpha * softmax(sim_i2t_m) + (1 - alpha) * sim_targets   (same for t2i)
        sim_i2t = image_feat @ text_feat_all.T / temp
        sim_t2i = text_feat @ image_feat_all.T / temp
        loss = (-(log_softmax(sim_i2t) * sim_i2t_targets).sum(1).mean()
                - (log_softmax(sim_t2i) * sim_t2i_targets).sum(1).mean()) / 2

    In-batch keys gathered across ranks (``vlfast.nn.ITCLoss(gather=True)``): pass every
    rank's momentum features as ``image_keys_m`` / ``text_keys_m`` (and ids as ``idx_keys``)
    in place of ``image_feat_m`` / ``text_feat_m`` in ``*_feat_all``; query i's positive is
    then key ``offset + i`` (``offset = rank * N``).
    """
    dt = image_feat.dtype
    with torch.no_grad():
        img_keys = image_feat_m if image_keys_m is None else image_keys_m
        txt_keys = text_feat_m if text_keys_m is None else text_keys_m
        image_feat_all = torch.cat([img_keys.to(dt), image_queue.to(dt)], 0)
        text_feat_all = torch.cat([txt_keys.to(dt), text_queue.to(dt)], 0)
        sim_i2t_m = image_feat_m.to(dt) @ text_feat_all.T / temp
        sim_t2i_m = text_feat_m.to(dt) @ image_feat_all.T / temp
        if idx is None:
            sim_targets = torch.zeros_like(sim_i2t_m)
            n = sim_targets.shape[0]
            sim_targets[torch.arange(n), offset + torch.arange(n)] = 1
        else:
            idx = idx.view(-1, 1)
            keys_ids = idx.t() if idx_keys is None else idx_keys.view(1, -1)
            idx_all = torch.cat([keys_ids, idx_queue.view(1, -1)], dim=1)
            pos_idx = torch.eq(idx, idx_all).to(dt)
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all.T / temp
    sim_t2i = text_feat @ image_feat_all.T / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2
