"""Hugging Face transformers integration of ``vlfast.patch``: the ``"vlfast"`` attention implementation.

Hugging Face models dispatch attention through two registries, and a custom name needs both:

* ``AttentionInterface`` (``transformers.modeling_utils``): ``"vlfast"`` ->
  :func:`vlfast_attention_forward`, which runs :func:`vlfast.ops.attention`;
* ``AttentionMaskInterface`` (``transformers.masking_utils``): ``"vlfast"`` -> :func:`vlfast_mask`.
  Without it HF's mask helpers return ``None`` for an unknown name and padding is silently
  dropped (transformers #46132: BertForMaskedLM gradients off by 52%).

Both are registered when this module is imported: at once if ``transformers`` is already
imported, else right after ``transformers.modeling_utils`` / ``transformers.masking_utils``
finish loading (a one-shot import hook; importing transformers here would cost seconds to
every ``vlfast.patch`` user), and by :func:`register` / ``vlfast.patch`` on any HF model.
Then ``from_pretrained(..., attn_implementation="vlfast")``, ``Model(config)`` with
``config._attn_implementation = "vlfast"`` and ``model.set_attn_implementation("vlfast")`` work.

**Masks.** :func:`vlfast_mask` returns what ``eager`` gets, an additive float mask (0 where a
query sees a key, ``finfo(dtype).min`` elsewhere, (B, 1, Nq, Nk), broadcast views where it can),
so the models that add it to their scores by hand (BLIP, ViLT) or add a bias to it (BEiT) stay
correct; for the plain padding and causal masks it also records what the mask *is* on the tensor,
and :func:`vlfast_attention_forward` runs it as the kernel's ``key_padding_mask`` / ``causal``
instead of a dense bias.  Any other 4D mask (an ``eager`` or ``sdpa`` one, a user's) is
recognised once per mask tensor: key padding, exactly causal (bottom-right) with padding, or
else a dense ``attn_bias`` (``-inf`` where masked); a float mask with other values (BEiT's
relative position bias, with its gradient) is passed as ``attn_bias`` as it is.  A query row
with no visible key outputs zeros, as ``sdpa`` gives (``eager`` gives the mean of the values).

**Modules whose attention is hard-coded** (transformers 5.24: BLIP's vision ``BlipAttention``,
BLIP's text ``BlipTextSelfAttention``, self- and cross-attention, ViLT's ``ViltSelfAttention``)
never call the interface: ``vlfast.patch`` swaps each instance for a subclass instance (same
class name prefix ``Vlfast``, ``isinstance`` holds, the same ``Parameter`` objects and
attributes) whose forward runs :func:`vlfast.ops.attention`.  BEiT, CLIP, SigLIP(2), ViT,
ViTMAE, BERT, RoBERTa and the BLIP-2 Q-Former use the interface in 5.24.
``vlfast.patch`` also swaps ``ViTMAEEmbeddings`` so that ``random_masking`` runs
:func:`vlfast.ops.random_masking` (bit-identical for the same ``noise``, and for the same
seed without one).

**Refused or handed back, never silently different**: ``output_attentions`` (vlfast computes
no probabilities) falls back to the model's own eager attention with a logged warning (the
swapped modules to HF's forward); ``softcap``, attention sinks (``s_aux``) and ``head_mask``
raise ``ValueError``; HF dropout (attention-probability dropout while training) is passed as
``dropout_p``; ``scaling`` as ``scale``; grouped KV heads (``num_key_value_groups``) are
repeated.  The backend is the one ``vlfast.patch(backend=...)`` set on the module, else the
automatic choice / ``VLFAST_BACKEND``.  ``vlfast.patch`` refuses a model whose config has
``output_attentions=True`` (``ValueError``): HF would collect ``None`` attentions.

**What ``vlfast.patch`` does on an HF model**: ``set_attn_implementation("vlfast")`` on every
``PreTrainedModel`` whose class supports it (HF's own test), then the config of every
interface-calling attention module HF's recursion misses (ViTMAE's decoder layers hold a deep
copy of the config, which ``set_attn_implementation`` never reaches), the patch's backend on
each (one report entry per attention module, kind ``"HF attention interface"``); the swaps
above; hard-coded HF attention it has no swap for is reported as left (it runs HF's code, and
the ``"vlfast"`` mask keeps it correct).

Limits: under ``torch.compile`` masks are not recognised (no host syncs): they run as dense
biases.  The ``Vlfast*`` classes are made when a model is patched; pickling rebuilds them from
the HF base class (``torch.save(model)`` works).
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import inspect
import logging
import math
import sys
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import _backend
from ..ops.attention import attention
from ..ops.masking import random_masking
from ._core import PatchContext, carry_over, check_tested_version, module_from

__all__ = ["INTEGRATION", "NAME", "TESTED_VERSIONS", "register", "vlfast_attention_forward", "vlfast_mask"]

log = logging.getLogger("vlfast")

#: the attention implementation name registered in transformers
NAME = "vlfast"
#: transformers versions the integration tests ran against (others get a warning from vlfast.patch)
TESTED_VERSIONS = ("5.24",)

_BACKEND_ATTR = "_vlfast_backend"  # instance attribute set by vlfast.patch on the modules it prepares
_PLAN_ATTR = "_vlfast_mask_plan"  # what a 4D mask is, recorded on the mask tensor
_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


# ====================================================================== registration
def _register_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, vlfast_attention_forward)


def _register_mask() -> None:
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(NAME, vlfast_mask)


def register() -> None:
    """Register ``"vlfast"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` now.

    Idempotent.  Importing this module already does it (see the module docstring); call this
    when in doubt (it imports ``transformers.modeling_utils`` and ``transformers.masking_utils``).
    """
    _register_attention()
    _register_mask()
    _HOOK.pending.clear()
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: run a registration right after a module of transformers has executed.

    It finds the module's spec with the other finders and wraps that spec's own loader
    instance's ``exec_module`` (nothing of transformers is modified); it removes itself from
    ``sys.meta_path`` once both registrations ran.
    """

    def __init__(self):
        self.pending: Dict[str, Callable[[], None]] = {}

    def find_spec(self, fullname, path=None, target=None):
        action = self.pending.get(fullname)
        if action is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if self.pending.pop(fullname, None) is not None:
                try:
                    action()
                except (ImportError, AttributeError) as exc:  # an API vlfast did not test: never break the import
                    log.warning("vlfast: could not register the '%s' attention implementation with %s (%s: %s); "
                                "vlfast.integrations.transformers.register() raises the error", NAME, fullname,
                                type(exc).__name__, exc)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module  # this module's own loader object only
        return spec


_HOOK = _RegisterAfterImport()


def _install_registration() -> None:
    for name, action in (("transformers.modeling_utils", _register_attention),
                         ("transformers.masking_utils", _register_mask)):
        if name in sys.modules:
            action()
        else:
            _HOOK.pending[name] = action
    if _HOOK.pending and _HOOK not in sys.meta_path and importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _HOOK)


# ====================================================================== masks
@dataclasses.dataclass(frozen=True)
class _MaskPlan:
    """How a 4D attention mask runs in :func:`vlfast.ops.attention`.

    ``key_padding_mask`` (B or 1, Nk) bool, True = padding; ``causal`` (bottom-right);
    ``bias`` an additive (broadcastable) bias when the mask is neither, or ``as_is``: the
    mask itself is that bias (a float mask with other values than 0 and "masked").
    """

    version: int
    shape: Tuple[int, ...]
    key_padding_mask: Optional[torch.Tensor] = None
    causal: bool = False
    bias: Optional[torch.Tensor] = None
    as_is: bool = False


def _attach(mask: torch.Tensor, key_padding_mask=None, causal=False, bias=None) -> torch.Tensor:
    setattr(mask, _PLAN_ATTR, _MaskPlan(mask._version, tuple(mask.shape), key_padding_mask, causal, bias))
    return mask


def _causal_keep(Nq: int, Nk: int, device) -> torch.Tensor:
    """(Nq, Nk) bool: query i sees key j <= i + Nk - Nq (the kernel's bottom-right causal rule)."""
    return torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(Nk - Nq)


def vlfast_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask: Optional[torch.Tensor] = None, allow_is_bidirectional_skip: bool = False,
                dtype: torch.dtype = torch.float32, device="cpu", **kwargs) -> Optional[torch.Tensor]:
    """The ``"vlfast"`` entry of ``AttentionMaskInterface`` (HF's mask-function signature).

    Returns HF ``eager``'s mask: additive float (batch_size, 1, q_length, kv_length) in ``dtype``,
    0 = visible, ``finfo(dtype).min`` = masked (or ``None`` where eager skips it: bidirectional,
    no padding, skip allowed).  For HF's plain masks (``causal_mask_function`` or
    ``bidirectional_mask_function`` with a 2D padding mask, integer offsets) it is built as
    broadcast views where possible and tagged with its key padding mask / causal flag, which
    :func:`vlfast_attention_forward` reads instead of the values.  Any other pattern (sliding
    windows, packed sequences, overlays) is ``transformers.masking_utils.eager_mask``'s.
    """
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    causal = mask_function is mu.causal_mask_function
    simple = ((causal or mask_function is mu.bidirectional_mask_function)
              and isinstance(q_offset, int) and isinstance(kv_offset, int)
              and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
              and (not causal or q_offset - kv_offset == kv_length - q_length))
    if not simple:
        return mu.eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                             allow_is_bidirectional_skip=allow_is_bidirectional_skip, dtype=dtype, device=device,
                             **kwargs)
    keep_keys = None  # (B, Nk) bool, True = a real key
    if attention_mask is not None:
        padded = mu.prepare_padding_mask(attention_mask.to(device=device, dtype=torch.bool), kv_length, kv_offset)
        keep_keys = padded[:, kv_offset:kv_offset + kv_length]
        if bool(keep_keys.all()):
            keep_keys = None
    if not causal and keep_keys is None and allow_is_bidirectional_skip:
        return None
    zero = torch.zeros((), dtype=dtype, device=device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    shape = (batch_size, 1, q_length, kv_length)
    if causal:
        keep = _causal_keep(q_length, kv_length, device)
        if keep_keys is None:
            mask = torch.where(keep, zero, low)[None, None].expand(shape)
        else:
            mask = torch.where(keep[None] & keep_keys[:, None, :], zero, low)[:, None]
    else:
        if keep_keys is None:
            mask = zero.expand(shape)
        else:
            mask = torch.where(keep_keys, zero, low)[:, None, None, :].expand(shape)
    return _attach(mask, None if keep_keys is None else ~keep_keys, causal)


def _analyze(mask: torch.Tensor) -> _MaskPlan:
    """What an unannotated 4D mask is (bool: True = visible; float: additive)."""
    version, shape = mask._version, tuple(mask.shape)
    if mask.dtype == torch.bool:
        keep = mask
        bias_dtype = torch.float32
    elif mask.is_floating_point():
        # a bias (BEiT's relative position bias, with its gradient), or per-head values: as it is
        if mask.requires_grad or mask.dim() != 4 or mask.shape[1] != 1 or torch.compiler.is_compiling():
            return _MaskPlan(version, shape, as_is=True)
        masked = mask <= torch.finfo(mask.dtype).min / 2  # eager's finfo.min, or -inf
        if not bool((masked | (mask == 0)).all()):
            return _MaskPlan(version, shape, as_is=True)
        keep = ~masked
        bias_dtype = mask.dtype
    else:
        raise TypeError(f"attention_mask must be a bool or floating tensor, got {mask.dtype}")
    if keep.dim() == 4 and keep.shape[1] == 1 and not torch.compiler.is_compiling():
        rows = keep[:, 0]  # (B', Nq, Nk)
        if bool((rows == rows[:, :1]).all()):  # every query sees the same keys: key padding
            kpm = ~rows[:, 0]
            return _MaskPlan(version, shape, key_padding_mask=kpm if bool(kpm.any()) else None)
        last = rows[:, -1]  # under bottom-right causality the last query sees every real key
        if bool((rows == (_causal_keep(rows.shape[1], rows.shape[2], rows.device)[None] & last[:, None])).all()):
            kpm = ~last
            return _MaskPlan(version, shape, key_padding_mask=kpm if bool(kpm.any()) else None, causal=True)
    bias = torch.zeros(keep.shape, dtype=bias_dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    return _MaskPlan(version, shape, bias=bias)


def _plan(mask: torch.Tensor) -> _MaskPlan:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None for the '{NAME}' attention implementation, got "
                        f"{type(mask).__name__} (a BlockMask needs attn_implementation='flex_attention')")
    plan = getattr(mask, _PLAN_ATTR, None)
    if plan is not None and plan.version == mask._version and plan.shape == tuple(mask.shape):
        return plan
    plan = _analyze(mask)
    if not mask.requires_grad and not torch.compiler.is_compiling():
        setattr(mask, _PLAN_ATTR, plan)  # recognised once per mask tensor (HF passes one mask to every layer)
    return plan


# ====================================================================== attention
def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    B, H, N, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, N, D).reshape(B, H * n_rep, N, D)


def _refuse(kwargs) -> None:
    if kwargs.get("softcap") is not None:
        raise ValueError(f"the '{NAME}' attention implementation has no logit softcapping (softcap="
                         f"{kwargs['softcap']}); use attn_implementation='eager' for this model")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"the '{NAME}' attention implementation has no attention sinks (s_aux); use "
                         "attn_implementation='eager' for this model")
    if kwargs.get("head_mask") is not None:
        raise ValueError(f"the '{NAME}' attention implementation does not take head_mask; use "
                         "attn_implementation='eager' to mask heads")


def _wants_attentions(module: nn.Module, kwargs) -> bool:
    return bool(kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False))


def _attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: Optional[torch.Tensor], *, dropout: float, scaling: Optional[float], causal: bool,
            position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`vlfast.ops.attention` on HF's (B, H, N, D) tensors and 4D mask; returns (B, H, Nq, D).

    ``causal`` applies only without a mask (a mask carries its own causality, as in ``sdpa``).
    """
    Nq, Nk = query.shape[2], key.shape[2]
    kpm = bias = None
    if attention_mask is None:
        causal = causal and Nq > 1  # one query token sees every key (decoding)
        if causal and Nk > Nq:  # as sdpa: prefill into an empty static cache (upper-left causal)
            key, value = key[:, :, :Nq], value[:, :, :Nq]
            if position_bias is not None:
                position_bias = position_bias[..., :Nq]
            Nk = Nq
    else:
        plan = _plan(attention_mask)
        if plan.shape[-1] != Nk or plan.shape[-2] not in (1, Nq):
            raise ValueError(f"attention_mask of shape {plan.shape} does not match {Nq} queries and {Nk} keys")
        kpm, causal = plan.key_padding_mask, plan.causal
        bias = attention_mask if plan.as_is else plan.bias
    if position_bias is not None:
        bias = position_bias if bias is None else position_bias + bias
    B = max(query.shape[0], key.shape[0])  # BLIP-2's learned queries may come with batch 1
    if query.shape[0] != B:
        query = query.expand(B, *query.shape[1:])
    if key.shape[0] != B:
        key, value = key.expand(B, *key.shape[1:]), value.expand(B, *value.shape[1:])
    if kpm is not None and kpm.shape[0] != B:
        kpm = kpm.expand(B, Nk)
    return attention(query, key, value, key_padding_mask=kpm, attn_bias=bias, causal=bool(causal),
                     dropout_p=float(dropout), scale=scaling, backend=getattr(module, _BACKEND_ATTR, None))


def vlfast_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs) -> Tuple[torch.Tensor, None]:
    """The ``"vlfast"`` entry of ``AttentionInterface`` (``sdpa_attention_forward``'s contract).

    Args:
        module: the calling attention module (``is_causal``, ``num_key_value_groups`` and the
            backend set by ``vlfast.patch`` are read from it).
        query: (B, H, Nq, D); ``key``, ``value``: (B, H_kv, Nk, D) (H_kv = H / num_key_value_groups).
        attention_mask: ``None`` or a 4D mask (see the module docstring).
        dropout: attention-probability dropout (HF passes 0 outside training).
        scaling: the softmax scale (default 1/sqrt(D)).
        is_causal: without a mask, causal attention (default: ``module.is_causal``, else True, as sdpa).
        **kwargs: ``position_bias`` (additive, T5-style) is added; ``output_attentions=True``
            falls back to the model's eager attention (logged); ``softcap``, ``s_aux``,
            ``head_mask`` raise ``ValueError``; other HF kwargs are ignored, as sdpa does.

    Returns:
        ``(attn_output (B, Nq, H, D), None)``.
    """
    _refuse(kwargs)
    if _wants_attentions(module, kwargs):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"the '{NAME}' attention implementation computes no attention probabilities and "
                             f"{type(module).__name__}'s module has no eager_attention_forward to fall back to; "
                             "use attn_implementation='eager' for output_attentions=True")
        _warn_once(("output_attentions", type(module)),
                   f"vlfast: output_attentions=True: {type(module).__name__} runs its eager attention (the "
                   f"'{NAME}' kernel computes no attention probabilities)")
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if isinstance(groups, int) and groups > 1:
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = _attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, causal=bool(causal),
                  position_bias=kwargs.get("position_bias"))
    return out.transpose(1, 2).contiguous(), None


# ====================================================================== swapped modules (hard-coded attention)
def _fallback(module: nn.Module, what: str) -> None:
    _warn_once(("output_attentions", type(module)),
               f"vlfast: {what}: {type(module).__name__} runs Hugging Face's own attention (vlfast's kernel "
               "computes no attention probabilities)")


def _make_blip_attention(base):
    class VlfastBlipAttention(base):
        """BLIP vision attention (hard-coded in HF) running :func:`vlfast.ops.attention`; HF's forward contract."""

        def forward(self, hidden_states: torch.Tensor, **kwargs):
            if _wants_attentions(self, kwargs):
                _fallback(self, "output_attentions=True")
                return super().forward(hidden_states, **kwargs)
            _refuse(kwargs)
            bsz, tgt_len, embed_dim = hidden_states.size()
            qkv = (self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, embed_dim // self.num_heads)
                   .permute(2, 0, 3, 1, 4))
            out = _attend(self, qkv[0], qkv[1], qkv[2], None, dropout=self.dropout.p if self.training else 0.0,
                          scaling=self.scale, causal=False)
            out = out.permute(0, 2, 1, 3).reshape(bsz, tgt_len, self.embed_dim)
            return self.projection(out), None

    return VlfastBlipAttention


def _make_blip_text_self_attention(base):
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.utils.deprecation import deprecate_kwarg

    class VlfastBlipTextSelfAttention(base):
        """BLIP text self-/cross-attention (hard-coded in HF) running :func:`vlfast.ops.attention`.

        HF's forward, caches included; the mask is the one HF's eager code adds (``None`` in
        the cross-attention, which BLIP's ``BlipTextAttention`` never passes a mask to).
        """

        @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                    cache=None, **kwargs):
            if _wants_attentions(self, kwargs):
                _fallback(self, "output_attentions=True")
                return super().forward(hidden_states, attention_mask=attention_mask,
                                       encoder_hidden_states=encoder_hidden_states,
                                       encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)
            _refuse(kwargs)
            input_shape = hidden_states.shape[:-1]
            query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
            is_cross_attention = encoder_hidden_states is not None
            attention_mask = encoder_attention_mask if is_cross_attention else attention_mask
            is_updated = False
            curr_cache = None
            if cache is not None:
                if isinstance(cache, EncoderDecoderCache):
                    is_updated = cache.is_updated.get(self.layer_idx)
                    curr_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
                else:
                    curr_cache = cache
            current_states = encoder_hidden_states if is_cross_attention else hidden_states
            if is_cross_attention and cache is not None and is_updated:
                key = curr_cache.layers[self.layer_idx].keys
                value = curr_cache.layers[self.layer_idx].values
            else:
                kv_shape = (*current_states.shape[:-1], -1, self.attention_head_size)
                key = self.key(current_states).view(kv_shape).transpose(1, 2)
                value = self.value(current_states).view(kv_shape).transpose(1, 2)
                if cache is not None:
                    key, value = curr_cache.update(key, value, self.layer_idx, kwargs=kwargs)
                    if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                        cache.is_updated[self.layer_idx] = True
            out = _attend(self, query, key, value, attention_mask, dropout=self.dropout.p if self.training else 0.0,
                          scaling=1.0 / math.sqrt(self.attention_head_size), causal=False)
            out = out.permute(0, 2, 1, 3).reshape(*input_shape, self.all_head_size)
            return out, None

    return VlfastBlipTextSelfAttention


def _make_vilt_self_attention(base):
    class VlfastViltSelfAttention(base):
        """ViLT self-attention (hard-coded in HF) running :func:`vlfast.ops.attention`; HF's forward contract."""

        def forward(self, hidden_states, attention_mask=None, output_attentions=False):
            if output_attentions:
                _fallback(self, "output_attentions=True")
                return super().forward(hidden_states, attention_mask, output_attentions)
            input_shape = hidden_states.shape[:-1]
            shape = (*input_shape, -1, self.attention_head_size)
            q = self.query(hidden_states).view(shape).transpose(1, 2)
            k = self.key(hidden_states).view(shape).transpose(1, 2)
            v = self.value(hidden_states).view(shape).transpose(1, 2)
            out = _attend(self, q, k, v, attention_mask, dropout=self.dropout.p if self.training else 0.0,
                          scaling=1.0 / math.sqrt(self.attention_head_size), causal=False)
            return (out.permute(0, 2, 1, 3).reshape(*input_shape, self.all_head_size),)

    return VlfastViltSelfAttention


def _make_vit_mae_embeddings(base):
    class VlfastViTMAEEmbeddings(base):
        """ViTMAE embeddings whose ``random_masking`` is :func:`vlfast.ops.random_masking` (same outputs)."""

        def random_masking(self, sequence, noise=None):
            if noise is not None:
                noise = noise.to(sequence.device)  # HF accepts noise on another device
            kept, mask, ids_restore = random_masking(sequence, self.config.mask_ratio, noise=noise,
                                                     backend=getattr(self, _BACKEND_ATTR, None))
            # HF's mask is torch.ones(...): the default dtype, whatever the sequence's
            return kept, mask.to(torch.get_default_dtype()), ids_restore

    return VlfastViTMAEEmbeddings


#: (module, class) of HF -> (report kind, factory of the vlfast subclass, "attention" or "masking")
_SWAPS = {
    ("transformers.models.blip.modeling_blip", "BlipAttention"):
        ("HF BlipAttention (hard-coded)", _make_blip_attention, "attention"),
    ("transformers.models.blip.modeling_blip_text", "BlipTextSelfAttention"):
        ("HF BlipTextSelfAttention (hard-coded)", _make_blip_text_self_attention, "attention"),
    ("transformers.models.vilt.modeling_vilt", "ViltSelfAttention"):
        ("HF ViltSelfAttention (hard-coded)", _make_vilt_self_attention, "attention"),
    ("transformers.models.vit_mae.modeling_vit_mae", "ViTMAEEmbeddings"):
        ("HF ViTMAE random_masking", _make_vit_mae_embeddings, "masking"),
}
_subclasses: Dict[type, type] = {}


def _subclass(base: type, factory) -> type:
    if base not in _subclasses:
        cls = factory(base)
        cls.__reduce_ex__ = _reduce_swapped
        _subclasses[base] = cls
    return _subclasses[base]


def _reduce_swapped(self, protocol):
    # the Vlfast* classes are made at patch time, so pickle (torch.save(model), spawn) cannot find them by
    # name: an instance is rebuilt from its HF base class, and nn.Module.__setstate__ restores its state
    base = type(self).__mro__[1]
    return _rebuild_swapped, (base.__module__, base.__qualname__), self.__dict__


def _rebuild_swapped(module: str, qualname: str) -> nn.Module:
    """Unpickling helper: an empty instance of the ``Vlfast*`` subclass of HF's ``module.qualname``."""
    import importlib

    base = getattr(importlib.import_module(module), qualname)
    cls = _subclass(base, _SWAPS[(module, qualname)][1])
    return cls.__new__(cls)


def _clone_as(old: nn.Module, cls: type) -> nn.Module:
    """An instance of ``cls`` (a subclass of ``type(old)``) with ``old``'s state: the same
    ``Parameter``/buffer/submodule objects and attributes (config included), fresh containers."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = type(old.__dict__[name])(old.__dict__[name])
    new.__dict__["_non_persistent_buffers_set"] = set(old.__dict__["_non_persistent_buffers_set"])
    return carry_over(old, new)


# ====================================================================== which HF classes do what
_source_cache: Dict[type, str] = {}


def _forward_source(cls: type) -> str:
    if cls not in _source_cache:
        try:
            _source_cache[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _source_cache[cls] = ""
    return _source_cache[cls]


def _calls_interface(module: nn.Module) -> bool:
    """Whether the module's forward dispatches through ``ALL_ATTENTION_FUNCTIONS`` (HF's own heuristic, per class)."""
    return "ALL_ATTENTION_FUNCTIONS" in _forward_source(type(module))


def _hard_coded(module: nn.Module) -> bool:
    """An HF attention module that computes attention itself (softmax in its forward, no interface)."""
    src = _forward_source(type(module))
    return "Attention" in type(module).__name__ and "softmax" in src and "ALL_ATTENTION_FUNCTIONS" not in src


# ====================================================================== the integration
class Transformers:
    """Hugging Face ``transformers``: the ``"vlfast"`` attention implementation, hard-coded attention, MAE masking.

    ``prepare`` registers ``"vlfast"``, calls ``set_attn_implementation("vlfast")`` on every
    ``PreTrainedModel`` whose class supports it, then also switches the config of every
    interface-calling attention module that HF's recursion misses (ViTMAE's decoder layers
    hold a deep copy of the config) and marks each with the patch's backend; one report
    entry per attention module.  ``convert`` swaps the hard-coded attention modules and
    ``ViTMAEEmbeddings`` (exact types) for ``Vlfast*`` subclass instances sharing their
    state; other hard-coded HF attention modules are left, with the reason.
    """

    name = "transformers"
    looks_for = ("Hugging Face transformers attention (the 'vlfast' AttentionInterface, hard-coded BLIP/ViLT "
                 "attention) and ViTMAE random_masking")

    def applies(self, model: nn.Module) -> bool:
        return any(module_from(m, "transformers.") for m in model.modules())

    def prepare(self, model: nn.Module, ctx: PatchContext) -> None:
        check_tested_version("transformers", list(TESTED_VERSIONS))
        register()
        if not ctx.attention:
            return
        from transformers import PreTrainedConfig, PreTrainedModel

        for path, m in model.named_modules():
            if isinstance(m, PreTrainedModel) and getattr(m.config, "output_attentions", False):
                raise ValueError(f"vlfast.patch: {type(m).__name__} ({path or '<model>'}) has config.output_attentions"
                                 f"=True, which the '{NAME}' attention cannot honour (it computes no attention "
                                 "probabilities); set it to False, or pass output_attentions=True per call (those "
                                 "calls then run the model's eager attention)")
        for m in model.modules():
            if not isinstance(m, PreTrainedModel) or m.config._attn_implementation == NAME:
                continue
            can_set = getattr(type(m), "_can_set_attn_implementation", None)  # HF's own test; no warning
            if can_set is None or can_set():
                m.set_attn_implementation(NAME)
        for path, m in model.named_modules():
            if not module_from(m, "transformers.") or not _calls_interface(m):
                continue
            config = getattr(m, "config", None)
            if not isinstance(config, PreTrainedConfig):
                ctx.leave(path, m, "calls the attention interface but has no config to select 'vlfast' in")
                continue
            if config._attn_implementation != NAME:
                config._attn_implementation_internal = NAME  # e.g. ViTMAEDecoder's deep-copied config
            setattr(m, _BACKEND_ATTR, ctx.backend)
            ctx.replaced(path, "HF attention interface", m, f"attn_implementation='{NAME}'")

    def convert(self, path: str, module: nn.Module, ctx: PatchContext) -> Optional[nn.Module]:
        if not module_from(module, "transformers."):
            return None
        cls = type(module)
        entry = _SWAPS.get((cls.__module__, cls.__qualname__))
        if entry is None:
            if ctx.attention and _hard_coded(module) and not _calls_interface(module):
                for (mod, name) in _SWAPS:
                    base = getattr(sys.modules.get(mod), name, None)
                    if base is not None and isinstance(module, base):
                        ctx.leave(path, module, f"a subclass of {name} (it may override forward)")
                        return None
                ctx.leave(path, module, "hard-coded attention vlfast has no swap for (runs Hugging Face's code)")
            return None
        kind, factory, option = entry
        if not (ctx.attention if option == "attention" else ctx.masking):
            return None
        new = _clone_as(module, _subclass(cls, factory))
        backend = ctx.backend
        masking_backends = ("auto", *_backend.get_op("random_masking").backends)
        if option == "masking" and backend is not None and backend not in masking_backends:
            ctx.note(f"random_masking has no '{backend}' backend: automatic choice")
            backend = None
        setattr(new, _BACKEND_ATTR, backend)
        ctx.replaced(path, kind, module, new)
        return new


INTEGRATION = Transformers()

_install_registration()
