"""torch.nn integration of ``vlfast.patch``: swap vlfast's fused modules for torch.nn's, in place."""

import logging
from typing import Dict, Optional

from torch import nn

__all__ = ["patch"]

log = logging.getLogger("vlfast")

# hook dictionaries carried over to the replacement (the handles keep working: they refer to the dicts)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _convert_mha(m: nn.MultiheadAttention, backend: Optional[str]) -> nn.Module:
    from ..nn.attention import MultiheadAttention

    ref = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    # built on the meta device (no allocation, no init), then given the original's tensors
    new = MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                             add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim,
                             vdim=m.vdim, batch_first=m.batch_first, device="meta", dtype=ref.dtype,
                             backend=backend)
    originals = dict(m.named_parameters())
    for name, p in new.named_parameters():
        if name in originals:  # assign=True copies requires_grad from the new module's parameter
            p.requires_grad_(originals[name].requires_grad)
    new.load_state_dict(m.state_dict(keep_vars=True), strict=True, assign=True)
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta and not ref.is_meta]
    if leftover:
        raise RuntimeError(f"vlfast.patch: {leftover} of the replacement of {m!r} were not loaded")
    for attr in _HOOK_DICTS:
        if attr in m.__dict__:
            new.__dict__[attr] = m.__dict__[attr]
    new.train(m.training)
    return new


def patch(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    r"""Replace every ``torch.nn.MultiheadAttention`` in ``model`` by :class:`vlfast.nn.MultiheadAttention`.

    Walks all submodules (nested modules, ``nn.ModuleList`` / ``nn.Sequential`` entries,
    the ``self_attn`` / ``multihead_attn`` of ``nn.Transformer*Layer``) and swaps each
    module whose type is exactly ``torch.nn.MultiheadAttention`` for a vlfast one built
    with the same constructor arguments (embed_dim, num_heads, dropout, bias, add_bias_kv,
    add_zero_attn, kdim, vdim, batch_first, dtype) that loads the original's
    ``state_dict`` strictly.  The load assigns the original ``Parameter`` objects, so the
    replacement shares them: device, dtype, ``requires_grad``, weight tying and optimizers
    built before patching stay valid.  Forward / backward / state-dict hooks registered on
    the original are carried over, and its train/eval mode is kept.  A module shared by
    several parents is replaced once, by one shared replacement.

    Subclasses of ``torch.nn.MultiheadAttention`` are left alone (they may override
    ``forward``), vlfast modules included, so patching twice replaces nothing the second
    time.  ``nn.TransformerEncoderLayer`` keeps working, inference fast path included,
    because the replacement is still an ``nn.MultiheadAttention``.

    Args:
        model: the module to patch in place.  If ``model`` itself is a
            ``torch.nn.MultiheadAttention`` the replacement is returned (it cannot be
            swapped in place).
        backend: ``backend`` of the replacements (``None`` = automatic, see
            :func:`vlfast.ops.attention`).

    Returns:
        ``model`` (patched in place), or the replacement of ``model`` when it is itself
        an ``nn.MultiheadAttention``.  The number replaced is logged on logger ``"vlfast"``
        at INFO level.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vlfast.patch expects an nn.Module, got {type(model).__name__}")
    if type(model) is nn.MultiheadAttention:
        new = _convert_mha(model, backend)
        log.info("vlfast.patch: replaced 1 torch.nn.MultiheadAttention by vlfast.nn.MultiheadAttention")
        return new
    replaced: Dict[int, nn.Module] = {}
    skipped = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if type(child) is nn.MultiheadAttention:
                if id(child) not in replaced:
                    replaced[id(child)] = _convert_mha(child, backend)
                setattr(parent, name, replaced[id(child)])
            elif isinstance(child, nn.MultiheadAttention) and not _is_vlfast(child):
                skipped += 1
    msg = (f"vlfast.patch: replaced {len(replaced)} torch.nn.MultiheadAttention module(s) "
           "by vlfast.nn.MultiheadAttention")
    if skipped:
        msg += f" (left {skipped} subclass instance(s) of torch.nn.MultiheadAttention unchanged)"
    log.info(msg)
    return model


def _is_vlfast(m: nn.Module) -> bool:
    from ..nn.attention import MultiheadAttention

    return isinstance(m, MultiheadAttention)
