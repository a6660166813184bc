"""torch.nn integration of ``vlfast.patch``: swap vlfast's fused modules for torch.nn's, in place."""

from typing import Optional

from torch import nn

from ..nn.attention import MultiheadAttention
from ._core import PatchContext, carry_over, share_parameters

__all__ = ["INTEGRATION"]


def _convert_mha(m: nn.MultiheadAttention, backend: Optional[str]) -> nn.Module:
    ref = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    # built on the meta device (no allocation, no init), then given the original's tensors
    new = MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                             add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim,
                             vdim=m.vdim, batch_first=m.batch_first, device="meta", dtype=ref.dtype,
                             backend=backend)
    return carry_over(m, share_parameters(m, new))


class TorchNN:
    """``torch.nn``: ``MultiheadAttention`` (also inside ``TransformerEncoder/Decoder/Transformer``).

    ``nn.MultiheadAttention`` instances (exact type) become :class:`vlfast.nn.MultiheadAttention`
    (a subclass: ``isinstance`` holds; same constructor arguments, the original's tensors).
    Subclasses are left alone (they may override ``forward``), vlfast's included, so patching
    twice replaces nothing the second time.

    ``nn.TransformerEncoderLayer`` in eval mode under ``no_grad`` takes torch's fused inference
    path (``torch._transformer_encoder_layer_fwd``), which reads the attention weights directly
    and never calls ``self_attn``; and ``nn.TransformerEncoder`` may turn padded batches into
    nested tensors for it.  On a patched layer the instance attribute that admits it
    (``activation_relu_or_gelu``, read only by that check) is cleared, and so is the encoder's
    ``use_nested_tensor``, so every call reaches vlfast's attention.  Outputs are the same.
    """

    name = "torch"
    looks_for = "torch.nn.MultiheadAttention (also inside nn.TransformerEncoder/Decoder layers)"

    def applies(self, model: nn.Module) -> bool:
        return True

    def convert(self, path: str, module: nn.Module, ctx: PatchContext) -> Optional[nn.Module]:
        if not ctx.attention:
            return None
        if type(module) is nn.MultiheadAttention:
            new = _convert_mha(module, ctx.backend)
            ctx.replaced(path, "torch.nn.MultiheadAttention", module, new)
            return new
        if isinstance(module, nn.MultiheadAttention) and not isinstance(module, MultiheadAttention):
            ctx.leave(path, module, "a subclass of torch.nn.MultiheadAttention (it may override forward)")
        elif isinstance(module, nn.TransformerEncoderLayer) and type(module.self_attn) is nn.MultiheadAttention:
            if getattr(module, "activation_relu_or_gelu", False):
                module.activation_relu_or_gelu = False  # only the inference fast path reads it
                ctx.replaced(path, "torch.nn.TransformerEncoderLayer inference fast path", module,
                             "disabled (calls reach self_attn)")
        elif isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            module.use_nested_tensor = False
            ctx.replaced(path, "torch.nn.TransformerEncoder nested-tensor fast path", module,
                         "disabled (calls reach self_attn)")
        return None


INTEGRATION = TorchNN()
