"""Contrastive-loss benchmarks: InfoNCE over N queries x N keys, forward + backward.

Providers: ``eager`` (``F.cross_entropy(logit_scale * q @ k.T, arange(N))``, which
materializes the N x N logits, their softmax and gradient) and ``vlfast``
(``vlfast.ops.contrastive_loss``: tiles only).  Besides time, each provider's
*loss memory* is measured in a fresh subprocess: peak memory during one
forward + backward (after one warm-up step) minus the memory held before it (CPU: the process's peak
resident set, reset through /proc/self/clear_refs; CUDA: torch's peak allocated
bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

from .harness import Case, Target, register

_CHILD = textwrap.dedent("""
    import json, os, sys, torch, torch.nn.functional as F
    provider, N, D, dtype, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dtype = getattr(torch, dtype)
    from vlfast.ops import contrastive_loss
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(N, D, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    k = F.normalize(torch.randn(N, D, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    labels = torch.arange(N, device=device)

    def rss_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])

    def step():
        if provider == "eager":
            loss = F.cross_entropy(scale * q @ k.T, labels)
        else:
            loss = contrastive_loss(q, k, scale)
        loss.backward()

    step()  # warm-up: allocator pools, BLAS/OpenMP buffers and the autograd graph are not the loss's memory
    q.grad = k.grad = scale.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_kb("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        step()
        peak = (rss_kb("VmHWM:") - base) * 1024
    print(json.dumps({"loss_mem_mb": peak / 2**20}))
""")


def loss_memory_mb(provider: str, N: int, D: int, dtype: torch.dtype, device: torch.device) -> float:
    """Peak memory (MiB) of one forward + backward of ``provider``, measured in a fresh process."""
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc return freed blocks at once, so the resident-set peak
    # follows live allocations instead of arena reuse luck (same setting for every provider).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    r = subprocess.run([sys.executable, "-c", _CHILD, provider, str(N), str(D), str(dtype).replace("torch.", ""),
                        device.type], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"memory subprocess for {provider} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["loss_mem_mb"]


def _providers(q, k, scale, labels, do_eager: bool):
    from vlfast.ops import contrastive_loss

    def eager():
        F.cross_entropy(scale * q @ k.T, labels).backward()

    def fused():
        contrastive_loss(q, k, scale).backward()

    return ({"eager": eager} if do_eager else {}) | {"vlfast": fused}


@register("contrastive")
def cases(device: torch.device, quick: bool):
    if quick:
        sizes, D, dtype = [256], 64, torch.float32
    elif device.type == "cuda":
        sizes, D, dtype = [8192, 32768, 65536, 131072, 262144], 512, torch.bfloat16
    else:
        sizes, D, dtype = [16384], 256, torch.float32
    es = torch.empty((), dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    for N in sizes:
        g = torch.Generator().manual_seed(0)
        q = F.normalize(torch.randn(N, D, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
        k = F.normalize(torch.randn(N, D, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
        scale = torch.tensor(14.3, device=device, requires_grad=True)
        labels = torch.arange(N, device=device)
        eager_bytes = 4 * N * N * max(es, 4)  # logits, softmax, their grads (fp32 inside cross_entropy)
        do_eager = free is None or eager_bytes < 0.8 * free
        providers = _providers(q, k, scale, labels, do_eager)
        unavailable = {} if do_eager else {
            "eager": f"would need ~{eager_bytes / 2**30:.0f} GiB for the N x N logits and gradients"}
        extra = {}
        for p in providers:
            extra[p] = {"loss_mem_mb": loss_memory_mb(p, N, D, dtype, device)}
        targets = []
        if not quick and device.type == "cpu":
            targets = [
                Target("CPU: peak loss memory at most 10% of eager's", "vlfast", metric="extra_ratio",
                       baseline="eager", key="loss_mem_mb", maximum=0.10, device="cpu"),
                Target("CPU: time at most 1.5x eager's", "vlfast", baseline="eager", minimum=1 / 1.5, device="cpu"),
            ]
        if N == 32768:
            targets = [
                Target("H200: at least 1.3x eager", "vlfast", baseline="eager", minimum=1.3, device="cuda",
                       device_name="H200"),
                Target("H200: under 1% of eager's loss memory", "vlfast", metric="extra_ratio", baseline="eager",
                       key="loss_mem_mb", maximum=0.01, device="cuda", device_name="H200"),
            ]
        flops = 2 * N * N * D * 4  # logits forward + recompute + dq + dk
        yield Case(op="contrastive", name=f"infonce N={N} fwd+bwd", shape=f"N={N} D={D}",
                   dtype=str(dtype).replace("torch.", ""), providers=providers,
                   baselines=["eager"] if do_eager else [], candidates=["vlfast"], flops=flops,
                   unavailable=unavailable, targets=targets, extra=extra,
                   min_runs=2 if device.type == "cpu" and not quick else None)
