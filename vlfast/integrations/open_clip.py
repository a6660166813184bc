"""open_clip integration of ``vlfast.patch``: open_clip's towers on :func:`vlfast.ops.attention`.

open_clip builds its attention from three kinds of modules; all end in vlfast's kernel:

* ``torch.nn.MultiheadAttention`` inside ``ResidualAttentionBlock`` (the text and vision towers
  of CLIP, CoCa's text tower and its multimodal decoder, self- and cross-attention) and inside
  CoCa's ``AttentionalPooler`` (learned queries attending the image tokens, Nq != Nk, with
  ``kdim`` / ``vdim``): converted by the torch integration to
  :class:`vlfast.nn.MultiheadAttention`.  The text tower's causal mask arrives there as a dense
  float (L, L) ``attn_mask`` (``-inf`` above the diagonal, a slice of a buffer on every call); it
  is recognised as the causal mask once per mask tensor and shape (and in-place change) and runs
  the kernel's causal mode (:func:`vlfast.nn.attention.is_causal_mask`).  Padding masks that
  open_clip adds to it ((B * H, L, L), CoCa's CLS masking) stay an additive bias.
* open_clip's own ``open_clip.transformer.Attention`` (``CustomResidualAttentionBlock``:
  qk_norm, ``scale_heads``, ``inner_norm``): becomes :class:`FusedOpenClipAttention`, a plain
  module holding the original's parameters (``in_proj_weight``, ``in_proj_bias``, ``ln_q``,
  ``ln_k``, ``head_scale``, ``ln_inner``, ``out_proj``...) and open_clip's math.  The
  scaled-cosine variant is left: open_clip 3.3's own forward fails on it.
* timm towers (``TimmModel``: SigLIP, SigLIP2, EVA02, PE-Core, ViTamin...): converted by the
  timm integration (:mod:`vlfast.integrations.timm`).

``open_clip.modified_resnet.AttentionPool2d`` (the ResNet CLIPs' pooling, which calls
``F.multi_head_attention_forward`` with its own projections) is left, with the reason in the report.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import is_causal_mask
from ..ops.attention import MAX_HEAD_DIM
from ._core import PatchContext, check_tested_version, module_from, qualname
from .timm import _FusedFlag, adopt, attend

__all__ = ["INTEGRATION", "FusedOpenClipAttention", "TESTED_VERSIONS"]

#: open_clip_torch versions the integration tests ran against (others get a warning)
TESTED_VERSIONS = ("3.3.0",)

_NEG_INF = float("-inf")


class FusedOpenClipAttention(_FusedFlag, nn.Module):
    r"""open_clip's ``transformer.Attention`` with the attention core on :func:`vlfast.ops.attention`.

    Built by :func:`vlfast.patch` from the open_clip module (never directly): same parameters,
    buffers and submodules under the same names, same ``forward(x, attn_mask=None)``:

    .. code-block:: python

        q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, -1)   # each (N, H, L, hd)
        q, k = self.ln_q(q), self.ln_k(k)
        x = vlfast.ops.attention(q, k, v, attn_mask, dropout_p=attn_drop.p in training)
        x = x * self.head_scale                                            # scale_heads
        x = self.out_drop(self.out_proj(self.ln_inner(x)))

    ``attn_mask`` follows open_clip (torch's ``MultiheadAttention`` convention): (L, L) or
    (N * num_heads, L, L); bool with True = masked, or float added to the scores.  The exact
    causal (L, L) mask runs the kernel's causal mode (recognised once per mask tensor).
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        N, L, C = x.shape
        H = self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q = q.reshape(N, L, H, -1).transpose(1, 2)
        k = k.reshape(N, L, H, -1).transpose(1, 2)
        v = v.reshape(N, L, H, -1).transpose(1, 2)
        causal, bias = False, None
        if attn_mask is not None:
            if attn_mask.dim() == 2 and is_causal_mask(attn_mask, true_allows=False):
                causal = True
            else:
                if attn_mask.dim() == 3:
                    attn_mask = attn_mask.reshape(N, H, L, L)
                if attn_mask.dtype == torch.bool:
                    bias = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, _NEG_INF)
                else:
                    bias = attn_mask.to(dtype=q.dtype)
        q, k = self.ln_q(q), self.ln_k(k)
        x = attend(self, q, k, v, attn_bias=bias, causal=causal,
                   dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        if self.head_scale is not None:
            x = x * self.head_scale
        x = x.transpose(1, 2).reshape(N, L, C)
        x = self.ln_inner(x)
        x = self.out_proj(x)
        return self.out_drop(x)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}, fused={self.fused}"


_ATTENTION = "open_clip.transformer.Attention"
_NEEDED = ("in_proj_weight", "in_proj_bias", "ln_q", "ln_k", "logit_scale", "attn_drop", "head_scale", "ln_inner",
           "out_proj", "out_drop", "num_heads", "head_dim", "scale")
_LEFT = {
    "open_clip.modified_resnet.AttentionPool2d":
        "calls F.multi_head_attention_forward with its own q/k/v projections; not converted",
}


def _convert_attention(m: nn.Module, backend: Optional[str]):
    missing = [n for n in _NEEDED if not hasattr(m, n)]
    if missing:
        return f"unexpected structure (missing {missing}; another open_clip version?)"
    if m.logit_scale is not None:
        return "scaled cosine attention (open_clip 3.3's own forward fails on it: torch.bmm of 4-D tensors)"
    if not 1 <= m.head_dim <= MAX_HEAD_DIM:
        return f"head dim {m.head_dim} outside the fused kernel's range [1, {MAX_HEAD_DIM}]"
    return adopt(FusedOpenClipAttention, m, backend)


class OpenClip:
    """open_clip: its own ``transformer.Attention``; the rest goes through the torch and timm integrations."""

    name = "open_clip"
    looks_for = ("open_clip attention (open_clip.transformer.Attention; its nn.MultiheadAttention and timm "
                 "towers through the torch and timm integrations)")

    def applies(self, model: nn.Module) -> bool:
        return any(module_from(m, "open_clip.") for m in model.modules())

    def prepare(self, model: nn.Module, ctx: PatchContext) -> None:
        check_tested_version("open_clip_torch", TESTED_VERSIONS)

    def convert(self, path: str, module: nn.Module, ctx: PatchContext) -> Optional[nn.Module]:
        if not ctx.attention or not module_from(module, "open_clip."):
            return None
        name = qualname(module)
        if name == _ATTENTION:
            new = _convert_attention(module, ctx.backend)
            if isinstance(new, str):
                ctx.leave(path, module, new)
                return None
            ctx.replaced(path, "open_clip Attention", module, new)
            return new
        if name in _LEFT:
            ctx.leave(path, module, _LEFT[name])
        elif any(qualname(c) == _ATTENTION for c in type(module).__mro__[1:]):
            ctx.leave(path, module, f"a subclass of {_ATTENTION} (it may override forward)")
        return None


INTEGRATION = OpenClip()
