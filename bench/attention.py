"""Attention benchmarks: forward + backward of ViT / BERT / long-sequence shapes.

Providers:

* ``eager``: :func:`vlfast.reference.attention_reference`, plain PyTorch math
  (``softmax((q * scale) k^T, masked) v``, timm's ``fused_attn=False`` path): exactly what
  the ``vlfast.nn`` attention modules run with ``fused=False``;
* ``sdpa``: ``F.scaled_dot_product_attention`` with torch's own backend choice
  (flash / memory-efficient / cuDNN / math), given the same mask;
* ``compile``: ``torch.compile`` of ``eager`` (CUDA only: compile time);
* ``xformers``: ``memory_efficient_attention`` when installed;
* ``vlfast``: ``vlfast.ops.attention`` (auto backend: Triton on CUDA, SDPA on CPU).

TFLOP/s count 4 * B * H * Nq * Nk * D for the forward and 2.5x that for the
backward (FlashAttention's convention), halved for causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, Target, register

# name -> (B, H, N, D, padding fraction, causal)
CUDA_CASES = {
    "vit_b16": (256, 12, 197, 64, 0.0, False),
    "vit_h14": (64, 16, 257, 80, 0.0, False),
    "bert_128_pad30": (256, 12, 128, 64, 0.3, False),
    "bert_512_pad30": (256, 12, 512, 64, 0.3, False),
    "long_4096": (4, 16, 4096, 128, 0.0, False),
}
CPU_CASES = {
    "vit_s16_small": (8, 6, 197, 64, 0.0, False),
    "bert_128_pad30_small": (8, 12, 128, 64, 0.3, False),
}
QUICK_CASES = {"tiny": (2, 2, 17, 32, 0.3, False)}

_TARGETS = {
    "vit_b16": [("sdpa", 1.0, "at least as fast as the best SDPA backend"), ("eager", 2.5, "at least 2.5x eager")],
    "vit_h14": [("sdpa", 1.1, "at least 1.1x the best SDPA backend")],
    "bert_128_pad30": [("sdpa", 1.5, "at least 1.5x SDPA given the same mask")],
    "bert_512_pad30": [("sdpa", 1.5, "at least 1.5x SDPA given the same mask")],
    "long_4096": [("sdpa", 0.9, "at least 0.9x SDPA's flash backend")],
}


def _fwd_bwd(fn, leaves, do):
    def run():
        out = fn(*leaves)
        torch.autograd.backward(out, do)
        for t in leaves:
            t.grad = None

    return run


@register("attention")
def cases(device: torch.device, quick: bool):
    from vlfast import available_backends
    from vlfast.ops import attention
    from vlfast.reference import attention_reference

    table = QUICK_CASES if quick else (CUDA_CASES if device.type == "cuda" else CPU_CASES)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reasons = available_backends("attention", device)
    for name, (B, H, N, D, pad, causal) in table.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        do = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
        kpm = None
        if pad:
            lengths = (N * (1 - pad * 2 * torch.rand(B, generator=g))).long().clamp(1, N)  # mean padding ~= pad
            kpm = (torch.arange(N)[None, :] >= lengths[:, None]).to(device)

        def eager(q, k, v, kpm=kpm, causal=causal):  # what vlfast.nn runs with fused=False
            return attention_reference(q, k, v, key_padding_mask=kpm, causal=causal)

        leaves = (q, k, v)
        providers = {
            "eager": _fwd_bwd(eager, leaves, do),
            "sdpa": _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if kpm is None else ~kpm[:, None, None, :], is_causal=causal),
                leaves, do),
        }
        unavailable = {}
        if device.type == "cuda":
            compiled = torch.compile(eager)
            providers["compile"] = _fwd_bwd(compiled, leaves, do)
            if reasons.get("xformers") is None:
                providers["xformers"] = _fwd_bwd(lambda q, k, v: attention(
                    q, k, v, key_padding_mask=kpm, causal=causal, backend="xformers"), leaves, do)
            else:
                unavailable["xformers"] = reasons["xformers"]
        providers["vlfast"] = _fwd_bwd(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, causal=causal),
                                       leaves, do)
        flops = int(4 * B * H * N * N * D * 3.5 * (0.5 if causal else 1.0))
        targets = [Target(f"H200: {desc}", "vlfast", baseline=base, minimum=m, device="cuda", device_name="H200")
                   for base, m, desc in _TARGETS.get(name, [])]
        baselines = [p for p in ("eager", "sdpa", "compile", "xformers") if p in providers]
        yield Case(
            op="attention", name=f"{name} fwd+bwd",
            shape=f"B={B} H={H} N={N} D={D}" + (f" pad~{pad:.0%}" if pad else ""),
            dtype=str(dtype).replace("torch.", ""), providers=providers, baselines=baselines, candidates=["vlfast"],
            flops=flops, unavailable=unavailable, targets=targets)
