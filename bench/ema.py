"""EMA (mean-teacher / momentum encoder) update benchmark.

``ema[i] <- decay * ema[i] + (1 - decay) * params[i]`` over the parameter list of
a timm ViT, as done every step by MoCo / ALBEF / DINO / BLIP momentum encoders and
by timm's ``ModelEmaV3``.

Providers:

* ``loop``: the MoCo / ALBEF per-parameter Python loop (allocates new tensors);
* ``foreach_lerp``: timm ``ModelEmaV3`` (``torch._foreach_lerp_``, params cast to
  the EMA dtype inside the timed call when the dtypes differ);
* ``vlfast`` (auto backend) and ``vlfast[<backend>]``: ``vlfast.ops.ema_update_``.
"""

from __future__ import annotations

import traceback
from typing import Callable, Sequence

import torch

from .harness import Case, Target, register

DECAY = 0.999
BASELINES = ["loop", "foreach_lerp"]

# name -> (width, depth, patch, tokens incl. cls, mlp ratio, classes)
VIT_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "vit_tiny": (64, 2, 16, 197, 4, 1000),  # --quick only
    "vit_s16": (384, 12, 16, 197, 4, 1000),
    "vit_b16": (768, 12, 16, 197, 4, 1000),
    "vit_l16": (1024, 24, 16, 197, 4, 1000),
}
# parameter counts of timm's vit_{small,base,large}_patch16_224
VIT_PARAMS = {"vit_s16": 22_050_664, "vit_b16": 86_567_656, "vit_l16": 304_326_632}
MODELS = {"quick": ["vit_tiny"], "cpu": ["vit_s16", "vit_b16"], "cuda": ["vit_b16", "vit_l16"]}
# (ema dtype, param dtype)
DTYPES = [(torch.float32, torch.bfloat16), (torch.float32, torch.float32)]
# explicit backends timed besides the auto one, per device type
BACKENDS = {"cpu": ["native"], "cuda": ["native", "triton", "torch"]}

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def vit_param_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a timm ViT, in ``named_parameters`` order."""
    w, depth, p, n, r, classes = VIT_CONFIGS[model]
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("cls_token", (1, 1, w)),
        ("pos_embed", (1, n, w)),
        ("patch_embed.proj.weight", (w, 3, p, p)),
        ("patch_embed.proj.bias", (w,)),
    ]
    for i in range(depth):
        b = f"blocks.{i}."
        shapes += [
            (b + "norm1.weight", (w,)),
            (b + "norm1.bias", (w,)),
            (b + "attn.qkv.weight", (3 * w, w)),
            (b + "attn.qkv.bias", (3 * w,)),
            (b + "attn.proj.weight", (w, w)),
            (b + "attn.proj.bias", (w,)),
            (b + "norm2.weight", (w,)),
            (b + "norm2.bias", (w,)),
            (b + "mlp.fc1.weight", (r * w, w)),
            (b + "mlp.fc1.bias", (r * w,)),
            (b + "mlp.fc2.weight", (w, r * w)),
            (b + "mlp.fc2.bias", (w,)),
        ]
    shapes += [("norm.weight", (w,)), ("norm.bias", (w,)), ("head.weight", (classes, w)), ("head.bias", (classes,))]
    return shapes


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_param_counts() -> None:
    for model, expected in VIT_PARAMS.items():
        got = sum(_numel(s) for _, s in vit_param_shapes(model))
        assert got == expected, f"{model}: shape list sums to {got:,} parameters, timm has {expected:,}"


_check_param_counts()


# --------------------------------------------------------------------------- providers


def loop_ema(ema: list[torch.Tensor], params: list[torch.Tensor], m: float) -> Callable[[], None]:
    """MoCo / ALBEF ``_momentum_update_key_encoder`` (verbatim form)."""

    def run() -> None:
        for pk, pq in zip(ema, params):
            pk.data = pk.data * m + pq.data * (1.0 - m)

    return run


def foreach_lerp_ema(ema: list[torch.Tensor], params: list[torch.Tensor], m: float) -> Callable[[], None]:
    """timm ``ModelEmaV3`` (``_foreach_lerp_``), casting params to the EMA dtype when needed."""
    cast = any(e.dtype != p.dtype for e, p in zip(ema, params))

    def run() -> None:
        src = [p.to(e.dtype) for e, p in zip(ema, params)] if cast else params
        torch._foreach_lerp_(ema, src, 1.0 - m)

    return run


def _vlfast_ema(ema, params, m, backend: str | None) -> Callable[[], None]:
    from vlfast.ops import ema_update_

    if backend is None:

        def run() -> None:
            ema_update_(ema, params, m)

    else:

        def run() -> None:
            ema_update_(ema, params, m, backend=backend)

    return run


def _raiser(msg: str) -> Callable[[], None]:
    def run() -> None:
        raise RuntimeError(msg)

    return run


def _probe(device: torch.device, ema_dtype: torch.dtype, param_dtype: torch.dtype) -> tuple[dict, dict]:
    """Try each vlfast backend on a tiny multi-tensor list.

    Returns ``(broken, unavailable)``: provider -> message. ``unavailable`` holds the
    backends for which the op raised RuntimeError (cannot run here); ``broken``
    holds import failures and wrong results, which are benchmark errors.
    """
    names = {"vlfast": None, **{f"vlfast[{b}]": b for b in BACKENDS.get(device.type, [])}}
    broken: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    try:
        from vlfast.ops import ema_update_  # noqa: F401
    except Exception:  # noqa: BLE001 - becomes an error row per provider
        tb = traceback.format_exc()
        return {n: f"cannot import vlfast.ops.ema_update_:\n{tb}" for n in names}, {}
    g = torch.Generator().manual_seed(0)
    sizes = [3, 1000, 4097, 1]
    e0 = [torch.randn(s, generator=g).to(device=device, dtype=ema_dtype) for s in sizes]
    p0 = [torch.randn(s, generator=g).to(device=device, dtype=param_dtype) for s in sizes]
    d = 0.75
    want = [(d * e.double() + (1 - d) * p.double()).to(ema_dtype) for e, p in zip(e0, p0)]
    for name, backend in names.items():
        e = [t.clone() for t in e0]
        try:
            _vlfast_ema(e, p0, d, backend)()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except RuntimeError as exc:
            if backend is None:
                broken[name] = f"auto backend raised: {traceback.format_exc()}"
            else:
                unavailable[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        except Exception:  # noqa: BLE001
            broken[name] = f"probe call raised:\n{traceback.format_exc()}"
            continue
        for i, (got, exp) in enumerate(zip(e, want)):
            if got.dtype != exp.dtype or not torch.allclose(got.double(), exp.double(), rtol=1e-5, atol=1e-6):
                err = (got.double() - exp.double()).abs().max().item() if got.shape == exp.shape else float("nan")
                broken[name] = (f"wrong result in probe (tensor {i} of {len(sizes)}, numel {sizes[i]}, "
                                f"dtype {got.dtype}, max abs err {err:.3g})")
                break
    return broken, unavailable


# --------------------------------------------------------------------------- cases


def _make_case(model: str, device: torch.device, ema_dtype, param_dtype, probe) -> Case:
    shapes = [s for _, s in vit_param_shapes(model)]
    params = [torch.randn(s, device=device, dtype=param_dtype) for s in shapes]
    ema = [torch.randn(s, device=device, dtype=ema_dtype) for s in shapes]
    numel = sum(p.numel() for p in params)
    e_size = torch.empty((), dtype=ema_dtype).element_size()
    p_size = torch.empty((), dtype=param_dtype).element_size()

    broken, unavailable = probe
    providers: dict[str, Callable[[], None]] = {
        "loop": loop_ema(ema, params, DECAY),
        "foreach_lerp": foreach_lerp_ema(ema, params, DECAY),
    }
    candidates = ["vlfast", *(f"vlfast[{b}]" for b in BACKENDS.get(device.type, []))]
    for name in candidates:
        if name in unavailable:
            continue
        if name in broken:
            providers[name] = _raiser(broken[name])
        else:
            backend = None if name == "vlfast" else name[len("vlfast["):-1]
            providers[name] = _vlfast_ema(ema, params, DECAY, backend)
    en, pn = _DTYPE_NAMES[ema_dtype], _DTYPE_NAMES[param_dtype]
    return Case(
        op="ema",
        name=f"{model} {en}-ema/{pn}-params",
        shape=f"{len(shapes)} tensors, {numel / 1e6:.1f}M params",
        dtype=f"ema={en} params={pn}",
        providers=providers,
        baselines=list(BASELINES),
        candidates=candidates,
        bytes_moved=numel * (2 * e_size + p_size),
        unavailable={n: r for n, r in unavailable.items() if n in candidates},
        targets=_targets(model, ema_dtype, param_dtype),
    )


def _targets(model: str, ema_dtype: torch.dtype, param_dtype: torch.dtype) -> list[Target]:
    """The foundation issue's goals: CPU >= 2x the loop and >= foreach_lerp; on an H200
    >= 85% of copy bandwidth on ViT-L and >= 1.2x foreach_lerp on mixed-dtype lists."""
    if model not in VIT_PARAMS:  # the --quick smoke case has no goal
        return []
    goals = [
        Target("CPU: at least 2x the per-parameter loop", "vlfast", baseline="loop", minimum=2.0, device="cpu"),
        Target("CPU: no slower than _foreach_lerp_", "vlfast", baseline="foreach_lerp", minimum=1.0, device="cpu"),
    ]
    if model == "vit_l16":
        goals.append(Target("H200: at least 85% of measured copy bandwidth on the ViT-L list", "vlfast",
                            metric="frac_copy_bw", minimum=0.85, device="cuda", device_name="H200"))
    if ema_dtype != param_dtype:
        goals.append(Target("H200: at least 1.2x _foreach_lerp_ on a mixed-dtype list", "vlfast",
                            baseline="foreach_lerp", minimum=1.2, device="cuda", device_name="H200"))
    return goals


@register("ema")
def cases(device: torch.device, quick: bool):
    models = MODELS["quick"] if quick else MODELS.get(device.type, MODELS["cpu"])
    probes = {dt: _probe(device, *dt) for dt in DTYPES}
    for model in models:
        for ema_dtype, param_dtype in DTYPES:
            # no local reference to the case's tensors survives the yield
            yield _make_case(model, device, ema_dtype, param_dtype, probes[(ema_dtype, param_dtype)])
