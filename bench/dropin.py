"""Drop-in benchmarks: a training step of timm, open_clip and Hugging Face models, with and without vlfast.patch.

Providers, measured side by side in one run on the same weights and batch:

* ``unpatched``: the library's own model (its attention: SDPA or its eager math);
* ``vlfast.patch``: the same model after :func:`vlfast.patch` (vlfast's fused attention);
* on CUDA ``compile(unpatched)`` / ``compile(patched)``: ``torch.compile`` of the forward.

One step is forward, backward and AdamW; samples/s (``items/s``) and, on CUDA, the peak
memory of a step.  CUDA: bf16 autocast at real sizes (timm ``vit_base_patch16_224`` and
open_clip ``ViT-B-16`` at batch 256, HF ``CLIPModel`` ViT-B/16 at batch 256, HF
``BertForMaskedLM`` base at batch 64 x 512 tokens with ~30% padding).  CPU: tiny
configurations of the same classes, fp32.  A library that is not installed gives rows
marked unavailable with the reason.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from typing import Callable, Dict, Tuple

import torch

from .harness import Case, Target, peak_memory_mb, register, training_step

_PAD_FRACTION = 0.3


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(gone)} (pip install 'vlfast[integrations]')" if gone else None


def _timm_vit(device, quick, big):
    import timm

    kw = {} if big else dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kw)
    n, size, classes = (256, 224, 1000) if big else ((2 if quick else 16), 32, 10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (n,), generator=g).to(device)

    def loss(m):
        return torch.nn.functional.cross_entropy(m(x).float(), y)

    return model, loss, n


def _open_clip_vit(device, quick, big):
    import open_clip

    if big:
        model = open_clip.create_model("ViT-B-16", pretrained=None)
    else:
        cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16),
                   text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=4, layers=2))
        model = open_clip.CLIP(**cfg)
    n = 256 if big else (2 if quick else 16)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    ctx = model.context_length
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    text = torch.randint(1, model.vocab_size, (n, ctx), generator=g).to(device)
    crit = open_clip.ClipLoss()

    def loss(m):
        img, txt, scale = m(images, text)[:3]
        return crit(img.float(), txt.float(), scale.float())

    return model, loss, n


def _hf_clip(device, quick, big):
    from transformers import CLIPConfig, CLIPModel

    if big:
        cfg = CLIPConfig(vision_config=dict(patch_size=16), text_config={})
    else:
        cfg = CLIPConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4),
                         text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=16, vocab_size=1000,
                                          pad_token_id=1, bos_token_id=0, eos_token_id=2),
                         projection_dim=32)
    model = CLIPModel(cfg)
    n = 256 if big else (2 if quick else 16)
    L = 77 if big else 16
    size = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, size, size, generator=g).to(device)
    ids = torch.randint(1, cfg.text_config.vocab_size, (n, L), generator=g).to(device)
    mask = _padding_mask(n, L, g).to(device)

    def loss(m):
        return m(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss

    return model, loss, n


def _padding_mask(n: int, L: int, g: torch.Generator) -> torch.Tensor:
    """1 = real token; the real lengths are uniform so that ~30% of the tokens are padding."""
    lengths = (L * (1 - 2 * _PAD_FRACTION * torch.rand(n, generator=g))).long().clamp(1, L)
    return (torch.arange(L)[None, :] < lengths[:, None]).long()


def _hf_bert_mlm(device, quick, big):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig() if big else BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, vocab_size=1000, max_position_embeddings=64)
    model = BertForMaskedLM(cfg)
    n, L = (64, 512) if big else ((2 if quick else 16), 48)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (n, L), generator=g)
    mask = _padding_mask(n, L, g)
    labels = torch.where(torch.rand(n, L, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    labels = labels.masked_fill(mask == 0, -100)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)

    def loss(m):
        return m(input_ids=ids, attention_mask=mask, labels=labels).loss

    return model, loss, n


# (case name, builder, modules it needs)
CASES: Tuple[Tuple[str, Callable, Tuple[str, ...]], ...] = (
    ("timm vit_base_patch16_224", _timm_vit, ("timm", "torchvision")),
    ("open_clip ViT-B-16", _open_clip_vit, ("open_clip", "torchvision")),
    ("HF CLIPModel ViT-B/16", _hf_clip, ("transformers",)),
    ("HF BertForMaskedLM 30% padding", _hf_bert_mlm, ("transformers",)),
)


@register("dropin")
def cases(device: torch.device, quick: bool):
    import vlfast

    big = device.type == "cuda" and not quick
    table = CASES[:1] if quick else CASES
    for name, build, needs in table:
        why = _missing(*needs)
        if why is not None:
            yield Case(op="dropin", name=f"{name} train step", shape="-", dtype="-", providers={},
                       unavailable={"unpatched": why, "vlfast.patch": why})
            continue
        torch.manual_seed(0)
        model, loss_fn, n = build(device, quick, big)
        model = model.to(device).train()
        patched = copy.deepcopy(model)
        report = vlfast.patch(patched, report=True)
        if not report.replaced:
            raise RuntimeError(f"vlfast.patch replaced nothing in {name}: {report}")
        variants: Dict[str, Tuple[torch.nn.Module, bool]] = {"unpatched": (model, False),
                                                              "vlfast.patch": (patched, False)}
        if device.type == "cuda":
            variants.update({"compile(unpatched)": (copy.deepcopy(model), True),
                             "compile(patched)": (copy.deepcopy(patched), True)})
        providers, extra = {}, {}
        for label, (m, compiled) in variants.items():
            fwd = torch.compile(m) if compiled else m
            providers[label] = training_step(m.parameters(), functools.partial(loss_fn, fwd), device)
            peak = peak_memory_mb(providers[label], device)
            if peak is not None:
                extra[label] = {"peak_mb": peak}
        targets = [
            Target("H200: vlfast.patch at least 1.0x the unpatched model", "vlfast.patch", baseline="unpatched",
                   minimum=1.0, device="cuda", device_name="H200"),
            Target("H200: peak memory at most the unpatched model's", "vlfast.patch", metric="extra_ratio",
                   baseline="unpatched", key="peak_mb", maximum=1.0, device="cuda", device_name="H200"),
        ]
        counts = ", ".join(f"{v} {k}" for k, v in sorted(report.counts().items()))
        yield Case(op="dropin", name=f"{name} train step ({counts})", shape=f"batch {n}",
                   dtype="bf16 autocast" if device.type == "cuda" else "fp32", providers=providers,
                   baselines=[p for p in ("unpatched", "compile(unpatched)") if p in providers],
                   candidates=[p for p in ("vlfast.patch", "compile(patched)") if p in providers],
                   items=n, extra=extra, targets=targets if not quick else [])
