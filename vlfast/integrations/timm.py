"""timm integration of ``vlfast.patch``: timm's ViT-family attention modules on :func:`vlfast.ops.attention`.

What is converted (exact classes; instances are swapped, timm's classes are not modified):

* ``timm.layers.Attention`` (what ``timm.models.vision_transformer`` and the models built on it
  use: ViT, DeiT, DeiT distilled, registers, ``class_token=False``, qk_norm, ``scale_norm``,
  ``gated``, ``fused_attn`` on or off) becomes :class:`vlfast.nn.Attention` holding the
  original's submodules (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``,
  ``proj``, ``proj_drop``: the same objects, so parameters, their names and hooks are kept).
* ``timm.models.eva.EvaAttention`` (EVA, EVA02) and ``timm.layers.AttentionRope`` (EVA with
  ``attn_type="rope"``: PE-Core, and others): rotary embeddings applied to q / k inside the module.
  Each becomes a :class:`FusedRopeAttention`, a plain ``nn.Module`` that keeps the original's
  parameters, buffers, submodules and attributes (``q_bias`` / ``k_bias`` / ``v_bias``,
  ``qkv`` or ``q_proj`` / ``k_proj`` / ``v_proj``, grouped-query heads...) and timm's math,
  with the attention core on the fused op.
* ``timm.layers.AttentionPoolLatent`` (the ``global_pool="map"`` head of SigLIP towers):
  learned latent queries cross-attending the tokens, becomes a :class:`FusedAttentionPoolLatent`
  the same way.

The same modules inside open_clip's ``TimmModel`` towers (SigLIP, SigLIP2, EVA02, PE-Core,
ViTamin...) are converted by this integration.  Other timm attention modules are left, with
the reason in the report (``vlfast.patch(model, report=True)``).

Masks: timm passes SDPA's ``attn_mask`` / ``is_causal``; they are mapped by
:func:`vlfast.nn.attention.sdpa_mask_to_attention_args` (per-batch bool masks run as the
kernel's key padding mask, ``is_causal`` and the exact causal mask as its causal mode).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import Attention, sdpa_mask_to_attention_args
from ..ops.attention import MAX_HEAD_DIM, attention
from ..reference.attention import attention_reference
from ._core import _HOOK_DICTS, PatchContext, carry_over, check_tested_version, module_from, qualname

__all__ = ["INTEGRATION", "FusedRopeAttention", "FusedAttentionPoolLatent", "TESTED_VERSIONS"]

#: timm versions the integration tests ran against (others get a warning)
TESTED_VERSIONS = ("1.0.31",)


# ---------------------------------------------------------------------------------- shared helpers
def attend(module: nn.Module, q, k, v, *, key_padding_mask=None, attn_bias=None, causal=False, dropout_p=0.0,
           scale=None):
    """The attention core of the wrappers: :func:`vlfast.ops.attention` with the module's ``backend``, or
    the eager formula :func:`vlfast.reference.attention_reference` when ``module.fused`` is False."""
    if module.fused:
        return attention(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias, causal=causal,
                         dropout_p=dropout_p, scale=scale, backend=module.backend)
    return attention_reference(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p=dropout_p)


_SKIP_STATE = set(_HOOK_DICTS) | {"fused_attn", "training"}


def adopt(cls, old: nn.Module, backend: Optional[str]) -> nn.Module:
    """An instance of ``cls`` (a plain ``nn.Module`` subclass with its own ``forward``) that holds ``old``'s
    parameters, buffers, submodules (the same objects, in the same order: identical ``state_dict``) and
    attributes; hooks and train/eval mode are carried over.  ``fused`` / ``backend`` are set."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in old.__dict__.items():
        if name in _SKIP_STATE:
            continue
        if name in ("_parameters", "_buffers", "_modules"):
            new.__dict__[name] = value.copy()
        elif name == "_non_persistent_buffers_set":
            new.__dict__[name] = set(value)
        elif name not in new.__dict__ or not name.startswith("_"):
            new.__dict__[name] = value
    new.backend = backend
    new.fused = True
    return carry_over(old, new)


def _missing(module: nn.Module, names) -> list:
    return [n for n in names if not hasattr(module, n)]


class _FusedFlag:
    """``fused`` (toggled by :func:`vlfast.models.set_fused`) and timm's alias ``fused_attn``."""

    fused: bool = True
    backend: Optional[str] = None

    @property
    def fused_attn(self) -> bool:
        return self.fused

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fused_attn must be a bool, got {type(value).__name__}")
        self.fused = value


# ---------------------------------------------------------------------------------- rotary (EVA) attention
class FusedRopeAttention(_FusedFlag, nn.Module):
    r"""timm's ``EvaAttention`` / ``AttentionRope`` with the attention core on :func:`vlfast.ops.attention`.

    Built by :func:`vlfast.patch` from the timm module (never directly): it holds that module's
    parameters, buffers and submodules under their names (``state_dict`` unchanged) and runs timm's
    forward, ``forward(x, rope=None, attn_mask=None, is_causal=False)``:

    .. code-block:: python

        q, k, v = projections of x                    # fused qkv (+ q_bias, zero k_bias, v_bias) or q/k/v_proj
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, rope), rotary(k, rope)       # timm's apply_rot_embed_cat on tokens after the prefix
        k, v = repeat for grouped-query heads         # AttentionRope with num_kv_heads < num_heads
        x = vlfast.ops.attention(q, k, v, masks, dropout_p, scale)
        x = self.proj_drop(self.proj(self.norm(x) [* sigmoid(gate(x))]))

    ``fused=False`` (or timm's ``fused_attn=False``) runs the eager formula instead.
    """

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        kv_heads = getattr(self, "num_kv_heads", H)
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        if self.qkv is not None:
            q_bias = getattr(self, "q_bias", None)
            if q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((q_bias, self.k_bias, self.v_bias))
                if getattr(self, "qkv_bias_separate", False):
                    qkv = self.qkv(x)
                    qkv += qkv_bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, H, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            from timm.layers.pos_embed_sincos import apply_rot_embed_cat

            npt = self.num_prefix_tokens
            half = getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        kpm, bias, causal = sdpa_mask_to_attention_args(attn_mask, is_causal, batch=B, heads=H, q_len=N, k_len=N,
                                                        dtype=q.dtype, device=q.device)
        x = attend(self, q, k, v, key_padding_mask=kpm, attn_bias=bias, causal=causal,
                   dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        x = self.norm(x.transpose(1, 2).reshape(B, N, H * hd))
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)

    def init_non_persistent_buffers(self) -> None:
        """timm's: zero the non-persistent ``k_bias`` (EvaAttention with a fused, biased qkv)."""
        if getattr(self, "k_bias", None) is not None:
            with torch.no_grad():
                self.k_bias.zero_()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}, fused={self.fused}"


# ---------------------------------------------------------------------------------- latent attention pool
class FusedAttentionPoolLatent(_FusedFlag, nn.Module):
    r"""timm's ``AttentionPoolLatent`` (SigLIP's ``map`` head) with the attention on :func:`vlfast.ops.attention`.

    Built by :func:`vlfast.patch` from the timm module: same parameters (``latent``, ``q``, ``kv``,
    ``q_norm`` / ``k_norm``, ``pos_embed``, ``proj``, ``norm``, ``mlp``), same forward
    ``forward(x, attn_mask=None)``: ``latent_len`` learned queries attend the N tokens
    (cross-attention, Nq != Nk), then ``proj``, the residual MLP and the pooling of timm.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        H, hd, Lq = self.num_heads, self.head_dim, self.latent_len
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, Lq, H, hd).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        kpm, bias, causal = sdpa_mask_to_attention_args(attn_mask, False, batch=B, heads=H, q_len=Lq, k_len=N,
                                                        dtype=q.dtype, device=q.device)
        x = attend(self, q, k, v, key_padding_mask=kpm, attn_bias=bias, causal=causal, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, Lq, C)
        x = self.proj_drop(self.proj(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            x = x[:, 0]
        elif self.pool == "avg":
            x = x.mean(1)
        return x

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, latent_len={self.latent_len}, backend={self.backend!r}, "
                f"fused={self.fused}")


# ---------------------------------------------------------------------------------- conversion
_ATTENTION = "timm.layers.attention.Attention"
_ATTENTION_ROPE = "timm.layers.attention.AttentionRope"
_EVA = "timm.models.eva.EvaAttention"
_POOL = "timm.layers.attention_pool.AttentionPoolLatent"
_KIND = {_ATTENTION: "timm Attention", _ATTENTION_ROPE: "timm AttentionRope", _EVA: "timm EvaAttention",
         _POOL: "timm AttentionPoolLatent"}

#: timm attention modules vlfast knows and leaves, with the reason (any other timm module with a
#: ``fused_attn`` attribute is left with a generic reason)
_LEFT = {
    "timm.layers.diff_attention.DiffAttention":
        "differential attention (two softmax maps subtracted, per-layer lambda); not converted",
    "timm.models.vision_transformer.ParallelScalingBlock":
        "attention computed inline in the block's forward (no attention module to swap)",
    "timm.models.vision_transformer.DiffParallelScalingBlock":
        "differential attention computed inline in the block's forward (no attention module to swap)",
    "timm.layers.attention_pool.AttentionPoolPrr": "parameter-free attention pool; not converted",
}
_GENERIC = ("timm attention module not converted (vlfast converts timm.layers.Attention, AttentionRope, "
            "timm.models.eva.EvaAttention and AttentionPoolLatent)")


def _check_head_dim(module) -> Optional[str]:
    hd = getattr(module, "head_dim", None)
    if not isinstance(hd, int) or not 1 <= hd <= MAX_HEAD_DIM:
        return f"head dim {hd!r} outside the fused kernel's range [1, {MAX_HEAD_DIM}]"
    return None


def _convert_attention(m: nn.Module, backend: Optional[str]):
    """timm ``Attention`` -> :class:`vlfast.nn.Attention` holding ``m``'s submodules (or a reason not to)."""
    missing = _missing(m, ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads",
                           "head_dim", "scale"))
    if missing or m._parameters or m._buffers:
        return f"unexpected structure (missing {missing} or own parameters; another timm version?)"
    if not isinstance(m.qkv, nn.Linear) or not isinstance(m.proj, nn.Linear):
        return "qkv / proj are not nn.Linear"
    reason = _check_head_dim(m)
    if reason:
        return reason
    gate = getattr(m, "gate", None)
    new = Attention(m.qkv.in_features, m.num_heads, attn_head_dim=m.head_dim, dim_out=m.proj.out_features,
                    qkv_bias=m.qkv.bias is not None, proj_bias=m.proj.bias is not None, gated=gate is not None,
                    device="meta", backend=backend)
    if list(new._modules) != list(m._modules):
        return f"submodules {list(m._modules)} differ from vlfast.nn.Attention's {list(new._modules)}"
    for name, child in m._modules.items():
        new._modules[name] = child  # the original objects: parameters, names and their hooks stay
    new.scale = m.scale
    return carry_over(m, new)


def _convert_rope(m: nn.Module, backend: Optional[str]):
    missing = _missing(m, ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads",
                           "head_dim", "scale", "num_prefix_tokens"))
    if missing:
        return f"unexpected structure (missing {missing}; another timm version?)"
    if m.qkv is None and _missing(m, ("q_proj", "k_proj", "v_proj")):
        return "neither a fused qkv nor q_proj / k_proj / v_proj"
    return _check_head_dim(m) or adopt(FusedRopeAttention, m, backend)


def _convert_pool(m: nn.Module, backend: Optional[str]):
    missing = _missing(m, ("latent", "q", "kv", "q_norm", "k_norm", "pos_embed", "proj", "proj_drop", "norm", "mlp",
                           "pool", "num_heads", "head_dim", "latent_len", "scale"))
    if missing:
        return f"unexpected structure (missing {missing}; another timm version?)"
    return _check_head_dim(m) or adopt(FusedAttentionPoolLatent, m, backend)


_CONVERTERS = {_ATTENTION: _convert_attention, _ATTENTION_ROPE: _convert_rope, _EVA: _convert_rope,
               _POOL: _convert_pool}


class Timm:
    """timm: ``Attention``, ``AttentionRope``, ``EvaAttention``, ``AttentionPoolLatent`` (see the module doc)."""

    name = "timm"
    looks_for = ("timm attention (timm.layers.Attention / AttentionRope / AttentionPoolLatent, "
                 "timm.models.eva.EvaAttention; also inside open_clip TimmModel towers)")

    def applies(self, model: nn.Module) -> bool:
        return any(module_from(m, "timm.") for m in model.modules())

    def prepare(self, model: nn.Module, ctx: PatchContext) -> None:
        check_tested_version("timm", TESTED_VERSIONS)

    def convert(self, path: str, module: nn.Module, ctx: PatchContext) -> Optional[nn.Module]:
        if not ctx.attention:
            return None
        name = qualname(module)
        converter = _CONVERTERS.get(name)
        if converter is not None:
            new = converter(module, ctx.backend)
            if isinstance(new, str):
                ctx.leave(path, module, new)
                return None
            ctx.replaced(path, _KIND[name], module, new)
            return new
        # a subclass (timm's own or the user's) of a converted class may override forward: left
        supported = [qualname(c) for c in type(module).__mro__[1:] if c.__module__.startswith("timm.") and
                     qualname(c) in _CONVERTERS]
        if supported:
            ctx.leave(path, module, f"a subclass of {supported[0]} (it may override forward)")
        elif not module_from(module, "timm."):
            return None
        elif name in _LEFT:
            ctx.leave(path, module, _LEFT[name])
        elif "fused_attn" in type(module).__dict__.get("__annotations__", {}) or "fused_attn" in module.__dict__:
            ctx.leave(path, module, _GENERIC)
        return None


INTEGRATION = Timm()
