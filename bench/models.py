"""Model-level benchmarks: one training step (forward + backward + optimizer + momentum update).

Providers: ``eager`` (``vlfast.models.create(name, fused=False)``: every ``vlfast.nn``
module on the eager formulas of :mod:`vlfast.reference` -- math attention, materialized-logit
losses, MAE's argsort masking -- and MoCo's per-parameter momentum loop, as in the papers' code),
``fused`` (the same architecture and weights on vlfast ops), and on CUDA
``compile(eager)`` / ``compile(fused)`` (``torch.compile`` of the step's forward).
Reports samples/s (``items/s``) and, on CUDA, the peak memory of a step.
On CPU the micro models run.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .harness import Case, Target, peak_memory_mb, register, training_step

CUDA_CASES = [("clip_vit_b16", 256), ("mae_vit_large_patch16", 256), ("albef_base", 64), ("blip_base", 32),
              ("coca_vit_b32", 128), ("beit_base_patch16_224_pt", 128), ("simclr_vit_small", 256),
              ("dino_vit_small", 64)]
CPU_CASES = [("vit_micro", 16), ("mae_micro", 16), ("clip_micro", 16), ("moco_v3_micro", 16), ("vilt_micro", 16),
             ("albef_micro", 8), ("blip_micro", 8), ("coca_micro", 8), ("beit_micro", 8), ("simclr_micro", 16),
             ("dino_micro", 8)]
QUICK_CASES = [("vit_micro", 4)]


def _step_fn(model, batch, device, compiled: bool):
    fwd = torch.compile(model) if compiled else model

    def loss_fn():
        out = fwd(**batch)
        return out["loss"] if isinstance(out, dict) else F.cross_entropy(out.float(), batch["labels"])

    return training_step(model.parameters(), loss_fn, device)


@register("models")
def cases(device: torch.device, quick: bool):
    from vlfast import models

    table = QUICK_CASES if quick else (CUDA_CASES if device.type == "cuda" else CPU_CASES)
    known = set(models.list_models())
    for name, batch_size in table:
        if name not in known:
            raise RuntimeError(f"model {name!r} is not registered (vlfast.models.list_models(): {sorted(known)})")
        torch.manual_seed(0)
        base = models.create(name, fused=False).to(device).train()
        g = torch.Generator(device="cpu").manual_seed(0)
        batch = base.synthetic_batch(batch_size, device=device, generator=g)
        variants = {"eager": (False, False), "fused": (True, False)}
        if device.type == "cuda":
            variants.update({"compile(eager)": (False, True), "compile(fused)": (True, True)})
        providers, extra = {}, {}
        for label, (fused, compiled) in variants.items():
            model = models.set_fused(copy.deepcopy(base), fused)
            providers[label] = _step_fn(model, batch, device, compiled)
            peak = peak_memory_mb(providers[label], device)
            if peak is not None:
                extra[label] = {"peak_mb": peak}
        targets = [
            Target("H200: at least 1.3x eager throughput", "fused", baseline="eager", minimum=1.3, device="cuda",
                   device_name="H200"),
            Target("H200: at least 1.0x torch.compile(eager)", "fused", baseline="compile(eager)", minimum=1.0,
                   device="cuda", device_name="H200"),
            Target("H200: peak memory at most 0.7x eager's", "fused", metric="extra_ratio", baseline="eager",
                   key="peak_mb", maximum=0.7, device="cuda", device_name="H200"),
        ]
        yield Case(op="models", name=f"{name} train step", shape=f"batch {batch_size}",
                   dtype="bf16 autocast" if device.type == "cuda" else "fp32", providers=providers,
                   baselines=[p for p in ("eager", "compile(eager)") if p in providers],
                   candidates=[p for p in ("fused", "compile(fused)") if p in providers],
                   items=batch_size, extra=extra, targets=targets if not quick else [])
