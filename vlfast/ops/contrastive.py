"""Contrastive losses with memory linear in the batch: InfoNCE (CLIP, MoCo, ALBEF, BLIP) and SigLIP.

Every reference implementation materializes the Nq x Nk logits, their softmax and
their gradient.  Here the loss is split into

* terms that need every (i, j) pair: the log-sum-exp ``lse_i = log sum_j exp(s_ij)``
  and, for momentum-distilled soft targets, ``sum_j softmax(s^m_i)_j s_ij``.  They are
  computed tile by tile (online log-sum-exp forward, split over the keys when the
  queries are few; Milakov & Gimelshein 2018, FlashAttention, Inf-CL (Cheng et al., 2024)),
  by a Triton kernel or by the chunked torch backend.  The Triton backward computes each
  score tile once per pass into a bounded gradient workspace (256 MiB by default,
  ``$VLFAST_CONTRASTIVE_WORKSPACE_MB``: the whole Nq x Nk gradient when it fits, else key
  and query chunks of it) and forms the feature gradients with GEMMs on it; the torch
  backend never stores an Nq x Nk tensor;
* terms of the hard targets (positives, label smoothing), which are linear in the
  logits and reduce to O((Nq + Nk) D) vector work: ``sum_j h_ij s_ij =
  logit_scale * <q_i, (1 - eps) * mean(positive keys of i) + eps / Nk * sum_j k_j>``.

So ``loss_i = lse_i - (1 - alpha) * sum_j h_ij s_ij - alpha * sum_j t^soft_ij s_ij``
with exact gradients for query, keys and logit_scale.

``exclude_diagonal`` (SimCLR's NT-Xent over 2N views) removes key i from query i's softmax:
every backend sets ``s_ii = -inf`` inside its tiles (``lse_i = log sum_{j != i} exp(s_ij)``,
zero probability in the backward), and the hard-target term leaves key i out.
"""

from typing import Optional, Tuple

import torch

from .. import _backend
from .. import _validation as check

_PREF = {"cuda": ("triton", "torch"), "cpu": ("torch",)}
OP = _backend.register_op("contrastive_loss", _PREF, native_devices=())
SIGLIP_OP = _backend.register_op("siglip_rows", _PREF, native_devices=())

#: Tile of the torch backend: at most ``keys`` keys per tile and ``elems`` (queries x keys)
#: elements per tile (fp32: 16 MiB).  The Triton tiles are in ``vlfast.kernels.contrastive``.
TORCH_TILE = {"keys": 4096, "elems": 1 << 22}


# ------------------------------------------------------------------ torch (chunked) backend
def _chunks(Nq: int, Nk: int):
    ck = min(Nk, TORCH_TILE["keys"])
    cq = max(1, min(Nq, TORCH_TILE["elems"] // max(ck, 1)))
    return cq, ck


def _diag_tile(i0, ni, j0, nj, device):
    """(ni, nj) bool: True where query ``i0 + r`` meets key ``j0 + c`` of the same index."""
    return torch.arange(i0, i0 + ni, device=device)[:, None] == torch.arange(j0, j0 + nj, device=device)[None, :]


@OP.implement("torch", "forward")
def _contrastive_loss_lse_forward_torch(q, k, scale, sq=None, sk=None, soft_scale=1.0, exclude_diagonal=False):
    Nq, Nk = q.shape[0], k.shape[0]
    cq, ck = _chunks(Nq, Nk)
    soft = sq is not None
    lse = torch.empty(Nq, dtype=torch.float32, device=q.device)
    soft_dot = torch.empty_like(lse) if soft else None
    soft_lse = torch.empty_like(lse) if soft else None
    for i0 in range(0, Nq, cq):
        qi = q[i0:i0 + cq].float()
        m = torch.full((qi.shape[0],), float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        if soft:
            sqi = sq[i0:i0 + cq].float()
            ms, ls_, acc = m.clone(), l.clone(), l.clone()
        for j0 in range(0, Nk, ck):
            s = (qi @ k[j0:j0 + ck].float().T).mul_(scale)
            if exclude_diagonal:
                diag = _diag_tile(i0, qi.shape[0], j0, s.shape[1], q.device)
                s = s.masked_fill_(diag, float("-inf"))
                m_new = torch.maximum(m, s.max(1).values)
                m_ref = m_new.clamp_min(torch.finfo(torch.float32).min)  # a row whose keys so far are all excluded
                l = l * torch.exp(m - m_ref) + torch.exp(s - m_ref[:, None]).sum(1)
            else:
                m_new = torch.maximum(m, s.max(1).values)
                l = l * torch.exp(m - m_new) + torch.exp(s - m_new[:, None]).sum(1)
            m = m_new
            if soft:
                sh = (sqi @ sk[j0:j0 + ck].float().T).mul_(soft_scale)
                if exclude_diagonal:
                    sh = sh.masked_fill_(diag, float("-inf"))
                    ms_new = torch.maximum(ms, sh.max(1).values)
                    ms_ref = ms_new.clamp_min(torch.finfo(torch.float32).min)
                    w = torch.exp(sh - ms_ref[:, None])
                    r = torch.exp(ms - ms_ref)
                    ls_ = ls_ * r + w.sum(1)
                    acc = acc * r + (w * s.masked_fill(diag, 0.0)).sum(1)  # w is 0 there; s is -inf
                    ms = ms_new
                    continue
                ms_new = torch.maximum(ms, sh.max(1).values)
                w = torch.exp(sh - ms_new[:, None])
                r = torch.exp(ms - ms_new)
                ls_ = ls_ * r + w.sum(1)
                acc = acc * r + (w * s).sum(1)
                ms = ms_new
        lse[i0:i0 + cq] = m + torch.log(l)
        if soft:
            soft_lse[i0:i0 + cq] = ms + torch.log(ls_)
            soft_dot[i0:i0 + cq] = acc / ls_
    return lse, soft_dot, soft_lse


@OP.implement("torch", "backward")
def _contrastive_loss_lse_backward_torch(q, k, scale, lse, g_lse, sq=None, sk=None, soft_scale=1.0, soft_lse=None,
                                         g_soft=None, exclude_diagonal=False):
    Nq, Nk = q.shape[0], k.shape[0]
    cq, ck = _chunks(Nq, Nk)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dscale = torch.zeros((), dtype=torch.float32, device=q.device)
    soft = sq is not None and g_soft is not None
    for i0 in range(0, Nq, cq):
        qi = q[i0:i0 + cq].float()
        gl = g_lse[i0:i0 + cq, None]
        li = lse[i0:i0 + cq, None]
        if soft:
            sqi = sq[i0:i0 + cq].float()
            gs = g_soft[i0:i0 + cq, None]
            sli = soft_lse[i0:i0 + cq, None]
        for j0 in range(0, Nk, ck):
            kj = k[j0:j0 + ck].float()
            raw = qi @ kj.T
            G = torch.exp(raw * scale - li).mul_(gl)
            if soft:
                G += torch.exp((sqi @ sk[j0:j0 + ck].float().T).mul_(soft_scale) - sli).mul_(gs)
            if exclude_diagonal:
                G = G.masked_fill_(_diag_tile(i0, qi.shape[0], j0, kj.shape[0], q.device), 0.0)
            dscale += (G * raw).sum()
            dq[i0:i0 + cq] += G @ kj
            dk[j0:j0 + ck] += G.T @ qi
    return (dq * scale).to(q.dtype), (dk * scale).to(k.dtype), dscale


@SIGLIP_OP.implement("torch", "forward")
def _siglip_rows_forward_torch(x, y, scale, bias, pos_offset=0):
    Nx, Ny = x.shape[0], y.shape[0]
    cq, ck = _chunks(Nx, Ny)
    rows = torch.zeros(Nx, dtype=torch.float32, device=x.device)
    for i0 in range(0, Nx, cq):
        xi = x[i0:i0 + cq].float()
        for j0 in range(0, Ny, ck):
            u = (xi @ y[j0:j0 + ck].float().T).mul_(scale).add_(bias)
            z = _siglip_signs(i0, xi.shape[0], j0, u.shape[1], pos_offset, x.device)
            rows[i0:i0 + cq] += torch.nn.functional.softplus(-z * u).sum(1)
    return rows


def _siglip_signs(i0, ni, j0, nj, pos_offset, device):
    i = torch.arange(i0, i0 + ni, device=device)[:, None]
    j = torch.arange(j0, j0 + nj, device=device)[None, :]
    return torch.where(j == i + pos_offset, 1.0, -1.0)


@SIGLIP_OP.implement("torch", "backward")
def _siglip_rows_backward_torch(x, y, scale, bias, g_row, pos_offset=0):
    Nx, Ny = x.shape[0], y.shape[0]
    cq, ck = _chunks(Nx, Ny)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dy = torch.zeros(y.shape, dtype=torch.float32, device=x.device)
    dscale = torch.zeros((), dtype=torch.float32, device=x.device)
    dbias = torch.zeros((), dtype=torch.float32, device=x.device)
    for i0 in range(0, Nx, cq):
        xi = x[i0:i0 + cq].float()
        gi = g_row[i0:i0 + cq, None]
        for j0 in range(0, Ny, ck):
            yj = y[j0:j0 + ck].float()
            raw = xi @ yj.T
            z = _siglip_signs(i0, xi.shape[0], j0, yj.shape[0], pos_offset, x.device)
            G = -gi * z * torch.sigmoid(-z * (raw * scale + bias))
            dscale += (G * raw).sum()
            dbias += G.sum()
            dx[i0:i0 + cq] += G @ yj
            dy[j0:j0 + ck] += G.T @ xi
    return (dx * scale).to(x.dtype), (dy * scale).to(y.dtype), dscale, dbias


OP.implement("triton", "forward")(_backend.triton_launcher("contrastive", "contrastive_loss_lse_forward"))
OP.implement("triton", "backward")(_backend.triton_launcher("contrastive", "contrastive_loss_lse_backward"))
SIGLIP_OP.implement("triton", "forward")(_backend.triton_launcher("contrastive", "siglip_rows_forward"))
SIGLIP_OP.implement("triton", "backward")(_backend.triton_launcher("contrastive", "siglip_rows_backward"))


# ------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("vlfast::contrastive_loss_lse", mutates_args=())
def _contrastive_loss_lse_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, sq: Optional[torch.Tensor],
                 sk: Optional[torch.Tensor], soft_scale: float,
                 backend: str, exclude_diagonal: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if exclude_diagonal:
        lse, soft_dot, soft_lse = OP.impl(backend, "forward")(q, k, float(scale), sq, sk, soft_scale,
                                                              exclude_diagonal=True)
    else:
        lse, soft_dot, soft_lse = OP.impl(backend, "forward")(q, k, float(scale), sq, sk, soft_scale)
    if soft_dot is None:
        soft_dot, soft_lse = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return lse, soft_dot, soft_lse


@_contrastive_loss_lse_op.register_fake
def _(q, k, scale, sq, sk, soft_scale, backend, exclude_diagonal=False):
    n = q.shape[0] if sq is not None else 0
    f = dict(dtype=torch.float32)
    return q.new_empty(q.shape[0], **f), q.new_empty(n, **f), q.new_empty(n, **f)


@torch.library.custom_op("vlfast::contrastive_loss_lse_backward", mutates_args=())
def _contrastive_loss_lse_backward_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                                      g_lse: torch.Tensor,
                     sq: Optional[torch.Tensor], sk: Optional[torch.Tensor], soft_scale: float,
                     soft_lse: Optional[torch.Tensor], g_soft: Optional[torch.Tensor],
                     backend: str, exclude_diagonal: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if exclude_diagonal:
        dq, dk, dscale = OP.impl(backend, "backward")(q, k, float(scale), lse, g_lse, sq, sk, soft_scale,
                                                      soft_lse, g_soft, exclude_diagonal=True)
    else:
        dq, dk, dscale = OP.impl(backend, "backward")(q, k, float(scale), lse, g_lse, sq, sk, soft_scale,
                                                      soft_lse, g_soft)
    return dq, dk, dscale.clone()  # a custom op's outputs must not alias (kernels may return views)


@_contrastive_loss_lse_backward_op.register_fake
def _(q, k, scale, lse, g_lse, sq, sk, soft_scale, soft_lse, g_soft, backend, exclude_diagonal=False):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=torch.float32)


def _contrastive_loss_lse_setup(ctx, inputs, output):
    q, k, scale, sq, sk, soft_scale, backend = inputs[:7]
    lse, soft_dot, soft_lse = output
    ctx.save_for_backward(q, k, scale, lse, sq, sk, soft_lse)
    ctx.soft_scale, ctx.backend = soft_scale, backend
    ctx.exclude_diagonal = bool(inputs[7]) if len(inputs) > 7 else False
    ctx.soft = sq is not None


def _contrastive_loss_lse_autograd_backward(ctx, g_lse, g_soft, _g_soft_lse):
    q, k, scale, lse, sq, sk, soft_lse = ctx.saved_tensors
    g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.float().contiguous()
    if ctx.soft and g_soft is not None:
        g_soft = g_soft.float().contiguous()
    else:
        g_soft = None
    dq, dk, dscale = torch.ops.vlfast.contrastive_loss_lse_backward(
        q, k, scale, lse, g_lse, sq, sk, ctx.soft_scale, soft_lse if ctx.soft else None, g_soft, ctx.backend,
        ctx.exclude_diagonal)
    return dq, dk, dscale.to(scale.dtype).reshape(scale.shape), None, None, None, None, None


torch.library.register_autograd("vlfast::contrastive_loss_lse", _contrastive_loss_lse_autograd_backward,
                                setup_context=_contrastive_loss_lse_setup)


@torch.library.custom_op("vlfast::siglip_rows", mutates_args=())
def _siglip_rows_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, pos_offset: int,
                    backend: str) -> torch.Tensor:
    return SIGLIP_OP.impl(backend, "forward")(x, y, float(scale), float(bias), pos_offset)


@_siglip_rows_op.register_fake
def _(x, y, scale, bias, pos_offset, backend):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("vlfast::siglip_rows_backward", mutates_args=())
def _siglip_rows_backward_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        g_row: torch.Tensor, pos_offset: int,
                        backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dy, dscale, dbias = SIGLIP_OP.impl(backend, "backward")(x, y, float(scale), float(bias), g_row, pos_offset)
    return dx, dy, dscale.clone(), dbias.clone()  # outputs must not alias (kernels may return views)


@_siglip_rows_backward_op.register_fake
def _(x, y, scale, bias, g_row, pos_offset, backend):
    z = x.new_empty((), dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(y), z, z.clone()


def _siglip_setup(ctx, inputs, output):
    x, y, scale, bias, pos_offset, backend = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.pos_offset, ctx.backend = pos_offset, backend


def _siglip_rows_autograd_backward(ctx, g_row):
    x, y, scale, bias = ctx.saved_tensors
    dx, dy, dscale, dbias = torch.ops.vlfast.siglip_rows_backward(
        x, y, scale, bias, g_row.float().contiguous(), ctx.pos_offset, ctx.backend)
    return dx, dy, dscale.to(scale.dtype).reshape(scale.shape), dbias.to(bias.dtype).reshape(bias.shape), None, None


torch.library.register_autograd("vlfast::siglip_rows", _siglip_rows_autograd_backward, setup_context=_siglip_setup)


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ------------------------------------------------------------------ public ops
def _positive_keys(keys_f, positives, Nq, Nk, exclude_diagonal=False):
    """(Nq, D) fp32: the mean of each query's positive keys (differentiable); with
    ``exclude_diagonal`` key i is never a positive of query i."""
    if exclude_diagonal:
        return _positive_keys_excluding_diagonal(keys_f, positives, Nq, Nk)
    if positives is None:
        if Nk < Nq:
            raise ValueError(f"default positives pair query i with key i: need Nk >= Nq, got Nq={Nq}, Nk={Nk}")
        return keys_f[:Nq]
    if isinstance(positives, torch.Tensor):
        if positives.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"positives must be an int64 tensor of key indices, got {positives.dtype}")
        if positives.shape != (Nq,):
            raise ValueError(f"positives must have shape (Nq,) = ({Nq},), got {tuple(positives.shape)}")
        if positives.device != keys_f.device:
            raise ValueError(f"positives is on {positives.device} but the features are on {keys_f.device}")
        if not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(positives)
            if int(lo) < 0 or int(hi) >= Nk:
                raise ValueError(f"positive index out of range [0, {Nk}): got [{int(lo)}, {int(hi)}]")
        return keys_f[positives.long()]
    if isinstance(positives, (tuple, list)) and len(positives) == 2:
        qid, kid = positives
        for nm, t, n in (("query_ids", qid, Nq), ("key_ids", kid, Nk)):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"positives {nm} must be an int64 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.shape != (n,):
                raise ValueError(f"positives {nm} must have shape ({n},), got {tuple(t.shape)}")
            if t.device != keys_f.device:
                raise ValueError(f"positives {nm} is on {t.device} but the features are on {keys_f.device}")
        uniq, inv = torch.unique(kid.long(), return_inverse=True)
        sums = torch.zeros(uniq.numel(), keys_f.shape[1], dtype=keys_f.dtype, device=keys_f.device)
        sums = sums.index_add(0, inv, keys_f)
        counts = torch.bincount(inv, minlength=uniq.numel()).to(keys_f.dtype)
        slot = torch.searchsorted(uniq, qid.long()).clamp(max=uniq.numel() - 1)
        if not torch.compiler.is_compiling() and not bool((uniq[slot] == qid.long()).all()):
            raise ValueError("positives: some query id matches no key id, so that query has no positive key")
        return (sums / counts[:, None])[slot]
    raise TypeError("positives must be None, a LongTensor (Nq,) of key indices, or a pair (query_ids, key_ids)")


def _positive_keys_excluding_diagonal(keys_f, positives, Nq, Nk):
    """:func:`_positive_keys` when key i has left query i's softmax (``exclude_diagonal``)."""
    if positives is None:
        raise ValueError("exclude_diagonal removes key i from query i's softmax, which is the default positive: "
                         "pass positives (e.g. NT-Xent's (i + N) % 2N)")
    if isinstance(positives, torch.Tensor):
        kpos = _positive_keys(keys_f, positives, Nq, Nk)
        if not torch.compiler.is_compiling():
            own = positives.long() == torch.arange(Nq, device=positives.device)
            if bool(own.any()):
                i = int(own.nonzero()[0, 0])
                raise ValueError(f"exclude_diagonal: positives[{i}] = {i} is the excluded key of query {i}")
        return kpos
    kpos = _positive_keys(keys_f, positives, Nq, Nk)  # validates the ids; the mean over all matching keys
    qid, kid = positives
    self_pos = (kid[:Nq].long() == qid.long()).to(keys_f.dtype)           # key i is among query i's positives
    uniq, inv = torch.unique(kid.long(), return_inverse=True)
    counts = torch.bincount(inv, minlength=uniq.numel()).to(keys_f.dtype)
    n = counts[torch.searchsorted(uniq, qid.long()).clamp(max=uniq.numel() - 1)]
    rest = n - self_pos
    if not torch.compiler.is_compiling() and bool((rest == 0).any()):
        i = int((rest == 0).nonzero()[0, 0])
        raise ValueError(f"exclude_diagonal: query {i}'s only positive is its own key {i}, which is excluded")
    return (kpos * n[:, None] - self_pos[:, None] * keys_f[:Nq]) / rest.clamp_min(1)[:, None]


def contrastive_loss(query: torch.Tensor, keys: torch.Tensor, logit_scale, *, positives=None,
                     soft_query: Optional[torch.Tensor] = None, soft_keys: Optional[torch.Tensor] = None,
                     alpha: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                     backend: Optional[str] = None, exclude_diagonal: bool = False) -> torch.Tensor:
    r"""InfoNCE / cross-entropy over all keys, with hard, smoothed and soft targets, never storing Nq x Nk.

    Logits :math:`s_{ij} = \tau \langle q_i, k_j\rangle` (``tau = logit_scale``; features are
    normalized by the caller, as in open_clip).  Hard target :math:`h_i = (1-\epsilon)\,
    \mathrm{pos}_i + \epsilon / N_k`; with soft features (ALBEF / BLIP momentum
    distillation) :math:`t_i = (1-\alpha) h_i + \alpha\,\mathrm{softmax}_j(\tau \langle \hat q_i,
    \hat k_j\rangle)`, else :math:`t_i = h_i`;
    :math:`\mathrm{loss}_i = -\sum_j t_{ij} \log\mathrm{softmax}(s_i)_j`.

    Args:
        query: (Nq, D), keys: (Nk, D); fp32, fp16 or bf16 (accumulated in fp32).
        logit_scale: float or 0-dim tensor (gets a gradient when it requires one).
            Soft targets use its value without gradient (as ALBEF computes them under
            ``no_grad``).
        positives: ``None`` (query i's positive is key i; needs Nk >= Nq), a LongTensor
            (Nq,) of key indices, or a pair ``(query_ids, key_ids)`` of LongTensors (Nq,),
            (Nk,): every key with the query's id is a positive and the hard target is
            uniform over them (BLIP retrieval).
        soft_query, soft_keys: (Nq, D'), (Nk, D') momentum features for soft targets;
            no gradient flows into them.  Both or neither.
        alpha: weight of the soft targets in [0, 1] (needs soft features when > 0).
        label_smoothing: epsilon in [0, 1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-query losses, fp32).
        backend: ``None``/``"auto"``, ``"triton"`` (CUDA; CPU under TRITON_INTERPRET=1)
            or ``"torch"`` (chunked tiles inside a custom autograd op).
        exclude_diagonal: remove key i from query i's softmax (its logit is ``-inf``) for every
            i < Nq, when the queries are (the first Nq of) the keys themselves, as in SimCLR's
            NT-Xent over 2N views (``query = keys = normalize(cat(z1, z2))``, ``positives =
            (arange(2N) + N) % 2N``):
            :math:`\mathrm{loss}_i = -\sum_{j \ne i} t_{ij} \log \frac{e^{s_{ij}}}{\sum_{l \ne i}
            e^{s_{il}}}`.  Needs Nk >= Nq, Nk >= 2 and ``positives`` other than key i; label
            smoothing spreads ``eps / (Nk - 1)`` over the keys j != i, soft targets are the
            softmax over j != i too, and with ``(query_ids, key_ids)`` query i's positives are
            the other keys with its id.

    Memory is O((Nq + Nk) D) plus one tile (torch backend) or the bounded gradient workspace
    (Triton backward, ``vlfast.kernels.contrastive.WORKSPACE_BYTES``).  Returns an fp32 loss.
    """
    query = check.features("query", query)
    D = query.shape[1]
    keys = check.features("keys", keys, D)
    if keys.dtype != query.dtype:
        raise TypeError(f"query and keys must have one dtype, got {query.dtype} and {keys.dtype}")
    if keys.device != query.device:
        raise ValueError(f"keys is on {keys.device} but query is on {query.device}")
    Nq, Nk = query.shape[0], keys.shape[0]
    tau = check.scalar_tensor("logit_scale", logit_scale, query.device)
    alpha = check.unit_interval("alpha", alpha)
    eps = check.unit_interval("label_smoothing", label_smoothing, hi_open=True)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if (soft_query is None) != (soft_keys is None):
        raise ValueError("soft_query and soft_keys must be given together")
    soft = soft_query is not None
    if soft:
        soft_query = check.features("soft_query", soft_query).detach()
        soft_keys = check.features("soft_keys", soft_keys, soft_query.shape[1]).detach()
        if soft_query.shape[0] != Nq or soft_keys.shape[0] != Nk:
            raise ValueError(f"soft_query and soft_keys must have Nq={Nq} and Nk={Nk} rows, got "
                             f"{soft_query.shape[0]} and {soft_keys.shape[0]}")
        if soft_keys.dtype != soft_query.dtype:
            raise TypeError("soft_query and soft_keys must have one dtype")
    elif alpha > 0:
        raise ValueError("alpha > 0 needs soft_query and soft_keys")
    exclude = check.flag("exclude_diagonal", exclude_diagonal)
    if exclude and (Nk < Nq or Nk < 2):
        raise ValueError(f"exclude_diagonal removes key i from query i: needs Nk >= Nq and Nk >= 2 (the queries "
                         f"are the first Nq keys), got Nq={Nq}, Nk={Nk}")
    name = OP.select(query.device, backend)
    if soft and name == "triton" and soft_query.dtype != query.dtype:
        # the Triton kernel runs the soft dots with the query's dot settings (dtype, TF32)
        soft_query, soft_keys = soft_query.to(query.dtype), soft_keys.to(query.dtype)
    if exclude:
        kpos = _positive_keys(keys.float(), positives, Nq, Nk, exclude_diagonal=True)
        lse, soft_dot, _ = torch.ops.vlfast.contrastive_loss_lse(query, keys, tau, soft_query, soft_keys,
                                                                 float(tau.detach()) if soft else 1.0, name, True)
        kf = keys.float()
        qf = query.float()
        hard = (qf * ((1.0 - eps) * kpos + (eps / (Nk - 1)) * (kf.sum(0) - kf[:Nq]))).sum(1) * tau
        loss = lse - (1.0 - alpha) * hard - alpha * soft_dot if soft else lse - hard
        return _reduce(loss, reduction)
    kpos = _positive_keys(keys.float(), positives, Nq, Nk)
    lse, soft_dot, _ = torch.ops.vlfast.contrastive_loss_lse(query, keys, tau, soft_query, soft_keys,
                                                 float(tau.detach()) if soft else 1.0, name)
    qf = query.float()
    hard = (qf * ((1.0 - eps) * kpos + (eps / Nk) * keys.float().sum(0))).sum(1) * tau
    if soft:
        loss = lse - (1.0 - alpha) * hard - alpha * soft_dot
    else:
        loss = lse - hard
    return _reduce(loss, reduction)


def siglip_rows(x: torch.Tensor, y: torch.Tensor, logit_scale, logit_bias, *, pos_offset: int = 0,
                backend: Optional[str] = None) -> torch.Tensor:
    """Per-row SigLIP losses ``-sum_j log sigmoid(z_ij (scale <x_i, y_j> + bias))``, z = +1 iff j == i + pos_offset.

    The tile-wise primitive of :func:`siglip_loss` (fp32 (Nx,)); memory O((Nx + Ny) D).
    """
    x = check.features("image_features", x)
    y = check.features("text_features", y, x.shape[1])
    if x.dtype != y.dtype:
        raise TypeError(f"image and text features must have one dtype, got {x.dtype} and {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"text_features is on {y.device} but image_features is on {x.device}")
    scale = check.scalar_tensor("logit_scale", logit_scale, x.device)
    bias = check.scalar_tensor("logit_bias", logit_bias, x.device)
    name = SIGLIP_OP.select(x.device, backend)
    return torch.ops.vlfast.siglip_rows(x, y, scale, bias, int(pos_offset), name)
