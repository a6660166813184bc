"""Data pipeline benchmark: how fast ``vlfast train``'s real-data pipeline decodes, beside the step it feeds.

A CSV of 256x256 JPEG images (written once to a temporary folder), read by
:func:`vlfast.training.data.build_data` for ``clip_micro`` (CUDA: ``clip_vit_b16``) with a
batch per call.  Providers:

* ``0 workers``: decoding in the training process (what ``vlfast train`` did before
  ``--workers``);
* ``1 worker`` / ``2 workers``: the ``DataLoader`` pipeline with that many persistent decoding
  processes, prefetching;
* ``train step``: one training step of the model on a batch already in memory (forward +
  backward + AdamW) -- the time one batch of decoding must fit in to keep the step fed.

``items/s`` is images/s for the pipeline providers and samples/s for the step; the speedups of
the worker providers are against ``0 workers``.  On a 2-core machine the workers compete with
the timing process for the cores, so the worker speedups there are a lower bound.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from .harness import Case, Target, register, training_step

N_IMAGES = 128


def _write_dataset(n: int, size: int) -> Path:
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="vlfast-bench-data-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    rows = ["image,caption,label"]
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i}.jpg", quality=90)
        rows.append(f"{i}.jpg,photo {i},{i % 10}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"


@register("data")
def cases(device: torch.device, quick: bool):
    from vlfast import models
    from vlfast.training.data import build_data

    name, batch = ("clip_vit_b16", 64) if device.type == "cuda" and not quick else ("clip_micro", 8 if quick else 16)
    # more images than the pipeline keeps decoded ahead (a few batches), so every call decodes
    csv = _write_dataset(8 * batch if quick else max(N_IMAGES, 8 * batch), 256)
    torch.manual_seed(0)
    model = models.create(name).to(device).train()
    providers = {}
    for w in (0, 1, 2):
        data = build_data(f"csv:{csv}", model, batch, seed=0, workers=w, pin_memory=device.type == "cuda")
        atexit.register(data.close)

        def pull(data=data):
            b = data.next_batch()
            b["images"].to(device, non_blocking=True)

        providers[f"{w} worker{'s' if w != 1 else ''}"] = pull
    fixed = build_data(f"csv:{csv}", model, batch, seed=0).next_batch()
    fixed = {k: v.to(device) for k, v in fixed.items()}

    def loss_fn():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(**fixed)["loss"]

    step = training_step(model.parameters(), loss_fn, device)
    providers["train step"] = step
    yield Case(op="data", name=f"pipeline for {name}", shape=f"batch {batch}, 256px JPEG", dtype="uint8 -> fp32",
               providers=providers, baselines=["0 workers"], candidates=["1 worker", "2 workers"], items=batch,
               targets=[] if quick else [Target("2 workers decode at least 1.5x faster than 0", "2 workers",
                                                baseline="0 workers", minimum=1.5, device="cuda")])

    # the step fed by the pipeline: with workers, the next batches decode while the step runs
    fed = {}
    for w in (0, 2):
        data = build_data(f"csv:{csv}", model, batch, seed=0, workers=w, pin_memory=device.type == "cuda")
        atexit.register(data.close)

        def fed_step(data=data):
            b = {k: v.to(device, non_blocking=True) for k, v in data.next_batch().items()}
            fixed.update(b)
            step()

        fed[f"step fed by {w} workers"] = fed_step
    fed["step on a batch in memory"] = step
    yield Case(op="data", name=f"{name} step fed by the pipeline", shape=f"batch {batch}, 256px JPEG",
               dtype="fp32" if device.type != "cuda" else "bf16 autocast", providers=fed,
               baselines=["step fed by 0 workers"], candidates=["step fed by 2 workers"], items=batch,
               targets=[] if quick else [Target("fed by 2 workers: at least 0.9x the in-memory step's speed",
                                                "step fed by 2 workers", baseline="step on a batch in memory",
                                                minimum=0.9, device="cuda")])
