"""MAE random-masking and decoder-unshuffle benchmarks.

Providers:

* ``eager``: MAE's code (He et al., 2021) as :mod:`vlfast.reference.masking` writes it and
  ``vlfast.nn.RandomMasking`` / ``UnshuffleTokens`` run it with ``fused=False``: ``rand``,
  ``x + pos_embed``, two argsorts, a gather of the kept tokens, a gather of the mask
  (``random_masking_reference``); the decoder's ``cat`` + ``gather``
  (``unshuffle_tokens_reference``).
* ``vlfast`` (auto backend) and ``vlfast[<backend>]``: ``vlfast.ops.random_masking`` /
  ``vlfast.ops.unshuffle_tokens``.

Before timing, each vlfast provider's output is compared with eager's on the same
noise; a mismatch makes that provider an error row.
"""

from __future__ import annotations

from typing import Callable

import torch

from .harness import Case, Target, register

RATIO = 0.75
# (B, L, D) per device type; quick = smoke sizes
SIZES = {"quick": (4, 49, 64), "cpu": (64, 196, 768), "cuda": (256, 196, 1024)}
DTYPE = {"quick": torch.float32, "cpu": torch.float32, "cuda": torch.bfloat16}
BACKENDS = {"cpu": ["native", "torch"], "cuda": ["triton", "torch"]}


def _raiser(msg: str) -> Callable[[], None]:
    def run() -> None:
        raise RuntimeError(msg)

    return run


def _providers(device, eager_fn, vlfast_fn, check, op):
    from vlfast import available_backends

    providers = {"eager": eager_fn}
    unavailable = {}
    reasons = available_backends(op, device)
    for name, backend in [("vlfast", None), *((f"vlfast[{b}]", b) for b in BACKENDS.get(device.type, []))]:
        if backend is not None and reasons.get(backend):
            unavailable[name] = reasons[backend]
            continue
        problem = check(backend)
        providers[name] = _raiser(problem) if problem else vlfast_fn(backend)
    return providers, unavailable


@register("masking")
def cases(device: torch.device, quick: bool):
    from vlfast.ops import random_masking, unshuffle_tokens
    from vlfast.reference import random_masking_reference, unshuffle_tokens_reference

    key = "quick" if quick else device.type
    B, L, D = SIZES.get(key, SIZES["cpu"])
    dtype = DTYPE.get(key, torch.float32)
    es = torch.empty((), dtype=dtype).element_size()
    K = int(L * (1 - RATIO))
    x = torch.randn(B, L, D, device=device, dtype=dtype)
    pos = torch.randn(1, L, D, device=device, dtype=dtype)
    tag = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    big = not quick

    # ---- random masking (forward), with the positional add
    noise = torch.rand(B, L, device=device)
    want = random_masking_reference(x, RATIO, noise, pos)

    def eager_mask():  # RandomMasking(fused=False): the noise draw, then MAE's sequence
        return random_masking_reference(x, RATIO, torch.rand(B, L, device=device), pos)

    def check_mask(backend):
        got = random_masking(x, RATIO, noise=noise, pos_embed=pos, backend=backend)
        bad = [n for n, a, b in zip(("x_kept", "mask", "ids_restore"), got, want) if not torch.equal(a, b)]
        return f"output differs from MAE's eager result: {bad}" if bad else None

    def vl_mask(backend):
        return lambda: random_masking(x, RATIO, pos_embed=pos, backend=backend)

    providers, unavailable = _providers(device, eager_mask, vl_mask, check_mask, "random_masking")
    targets = []
    if big:
        targets = [
            Target("CPU: at least 1.5x MAE's eager sequence", "vlfast", baseline="eager", minimum=1.5, device="cpu"),
            Target("H200: at least 5x MAE's eager sequence", "vlfast", baseline="eager", minimum=5.0,
                   device="cuda", device_name="H200"),
            Target("H200: at least 80% of copy bandwidth over the bytes it must move", "vlfast",
                   metric="frac_copy_bw", minimum=0.8, device="cuda", device_name="H200"),
        ]
    yield Case(
        op="masking", name=f"random_masking {tag} ratio {RATIO} +pos", shape=f"B={B} L={L} D={D}", dtype=tag,
        providers=providers, baselines=["eager"], candidates=[p for p in providers if p != "eager"],
        # kept rows read + written, pos rows read once, keys read, ids_restore + mask written
        bytes_moved=2 * B * K * D * es + L * D * es + B * L * (4 + 8 + es),
        unavailable=unavailable, targets=targets)

    # ---- decoder unshuffle
    x_kept = torch.randn(B, K, D, device=device, dtype=dtype)
    ids_restore = torch.stack([torch.randperm(L, device=device) for _ in range(B)])
    token = torch.randn(1, 1, D, device=device, dtype=dtype)
    want_u = unshuffle_tokens_reference(x_kept, ids_restore, token)

    def check_unshuffle(backend):
        got = unshuffle_tokens(x_kept, ids_restore, token, backend=backend)
        return None if torch.equal(got, want_u) else "output differs from MAE's eager decoder step"

    def vl_unshuffle(backend):
        return lambda: unshuffle_tokens(x_kept, ids_restore, token, backend=backend)

    providers, unavailable = _providers(device, lambda: unshuffle_tokens_reference(x_kept, ids_restore, token),
                                        vl_unshuffle, check_unshuffle, "unshuffle_tokens")
    targets = []
    if big:
        targets = [Target("H200: at least 3x MAE's eager decoder step", "vlfast", baseline="eager", minimum=3.0,
                          device="cuda", device_name="H200")]
    yield Case(
        op="masking", name=f"unshuffle_tokens {tag}", shape=f"B={B} L={L} K={K} D={D}", dtype=tag,
        providers=providers, baselines=["eager"], candidates=[p for p in providers if p != "eager"],
        bytes_moved=B * K * D * es + B * L * D * es + B * L * 8,
        unavailable=unavailable, targets=targets)
