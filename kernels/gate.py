"""The sm_90a compile gate: every Triton kernel of vlfast, compiled for an H200 without a GPU.

``python -m vlfast.kernels.gate`` (or ``vlfast info --kernels``) runs the real launchers of
``vlfast.kernels`` on the documented shapes below (``SHAPES``), captures every launch they make,
compiles each distinct (kernel, signature, specialization, constexprs, options) for
``GPUTarget("cuda", 90, 32)`` through Triton's own pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas
cubin for ``sm_90a``), and reads what the compiler made of it.  No GPU is needed: the Triton wheel
ships ptxas and cuobjdump.

How a launch is captured.  While ``capture()`` is active, Triton's active driver is a fake one
(``_GateDriver``) that reports the H200 target, a device key of its own and stream 0, and
``triton.knobs.runtime.jit_cache_hook`` records each launch's compile request and returns True, so
Triton neither compiles nor launches.  The launchers get ``device="meta"`` tensors: they have
shapes, strides and data pointers (0 plus the view's offset, so a real allocation's 256-byte
alignment is what Triton specializes on) but no storage, so B = 256 at N = 4096 costs nothing.
The tiles, grids and constexprs are therefore exactly those the host code picks (the GPU rows of
the tile tables: the gate refuses to run under ``TRITON_INTERPRET=1``, whose tiles are the
interpreter's).

What is read, per compiled configuration:

* registers, spill stores / loads (bytes) and the stack frame: ptxas's ``-v`` report
  (``knobs.nvidia.dump_ptxas_log``, Triton's own ptxas command line);
* shared memory: the kernel's dynamic shared memory (``metadata.shared``, what the launch asks for);
* MMA kind: the SASS (``cuobjdump -sass``): ``wgmma`` (HGMMA only), ``mma.sync`` (HMMA only),
  ``wgmma+mma.sync`` (both), ``fma`` (a ``tt.dot`` in the TTGIR lowered to FFMA: fp32 IEEE dots),
  ``-`` (no dot);
* CTAs per SM: the occupancy limit of an sm_90 SM (``ctas_per_sm``) from the threads, the
  registers and the shared memory;
* SASS: the number of SASS instructions of the kernel;
* ld<32b: global loads narrower than 32 bits (``LDG`` of ``U8`` / ``S8`` / ``U16`` / ``S16``): what a
  tile load becomes when the compiler cannot prove its rows 16-byte aligned (one 2-byte load per
  element instead of 128-bit loads / cp.async copies; ``attention._aligned``).

Rules (a configuration FAILs on any of them; the gate exits 1 when one does):

* ``compile``: Triton or ptxas raised;
* ``smem``: shared memory over ``SMEM_LIMIT`` (227 KB, the sm_90 per-block opt-in maximum);
* ``half-spill``: a bf16 / fp16 configuration that spills (any spill store or load);
* ``half-wgmma``: a bf16 / fp16 configuration with a dot that is not (only) wgmma;
* ``tf32-wgmma`` / ``tf32-spill``: an fp32 configuration compiled with TF32 dots (``DOT_PREC="tf32"``:
  ``torch.set_float32_matmul_precision("high")``, see ``_common.dot_precision``; the ``... tf32``
  cases) is a tensor-core dot like the half ones: a dot that is not (only) wgmma fails, and so does
  a spill over ``TF32_SPILL_BUDGET`` (bytes; see there why it is not 0);
* ``fp32-spill``: an fp32 configuration with IEEE dots spilling more than ``FP32_SPILL_BUDGET`` bytes;
* ``fence``: a GPU/system-scope ``MEMBAR`` or an L1 invalidate in the SASS (what
  ``tl.atomic_add``'s default acq_rel semantics put around every atomic: accumulating atomics,
  such as the attention bias gradient's, use ``sem="relaxed"``).

Results are cached by a key of (triton version, the kernel's source hash with its callees,
signature, constexprs, specialization, options, target) in ``cache_dir()``
(``$VLFAST_GATE_CACHE``, default ``<tmp>/vlfast-gate-<user>``); ``--no-cache`` recompiles.
Compiles run in ``--jobs`` forked processes (default: the CPU count).
"""

import argparse
import collections
import contextlib
import dataclasses
import getpass
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver as _triton_driver

# ----------------------------------------------------------------------------- target and rules
TARGET = GPUTarget("cuda", 90, 32)          # H100 / H200 (sm_90a)
SMEM_LIMIT = 227 * 1024                     # max dynamic shared memory per block on sm_90 (opt-in)
SMEM_PER_SM = 228 * 1024                    # shared memory per SM
SMEM_RESERVED_PER_CTA = 1024                # the driver reserves 1 KB of it per resident block
REGS_PER_SM = 65536                         # 4 sub-partitions of 16384 registers
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
# IEEE fp32 configurations (FMA dots, no tensor cores) may spill this many bytes (spill stores or
# loads) before the gate fails.  An FMA dot keeps its operand rows in registers, so fp32 attention
# runs small tiles (TILES' fp32 rows: 16-64 rows, mostly 8 warps; issue 13's "fp32 attention without
# heavy spills").  With them the worst IEEE fp32 spill of the CI tier is 44 B (contrastive soft
# targets, _grad_tile_kernel, triton 3.6; attention: 16 B, bwd_kv D = 40, triton 3.8) and of --full at
# N = 197 and 1024 also 44 B (attention: 32 B); it was 39,376 B (bwd_q D = 72 with dropout) before.
# The budget is just above that, so the gate catches any return of the heavy spills; ptxas moves a
# few tens of bytes between triton versions and small kernel edits.
FP32_SPILL_BUDGET = 64
# fp32 configurations with TF32 dots (tensor cores, held to the half rules: wgmma only) may spill this
# many bytes.  They spill nothing except at D = 256 and, under triton 3.6, bwd_q at D = 72 with a bias
# (16 B): bwd_kv's dk and dv accumulators (2 x 64 keys x 256 fp32, 128 registers a thread at 8 warps;
# BLOCK_N = 64 is the least wgmma M, 16 warps cap a thread at 128 registers) leave too few registers:
# up to 112 B (3.8) / 128 B (3.6) with dropout in the CI tier, 152 B with a bias (3.6, --full); bwd_q
# up to 44 B with a bias (3.6).  The budget is just above the worst.
TF32_SPILL_BUDGET = 192
RESULT_VERSION = 4                          # bump when the measured fields change

# ----------------------------------------------------------------------------- shapes
# The documented list of realistic shapes (issue 13).  Attention: B = 256, self-attention on the
# (B, N, 3, H, D) -> (3, B, H, N, D) view a fused qkv projection gives (vlfast.nn, timm), every
# variant with its forward and backward kernels; the bias is a relative-position bias of shape
# (1, H, N, N) expanded over the batch, with a gradient (atomics into the broadcast buffer).
ATTN_B = 256
ATTN_N = (197, 257, 577, 1024, 4096)
ATTN_HEADS = {40: 16, 64: 12, 72: 16, 80: 16, 96: 8, 128: 16, 256: 8}   # head dim -> heads
ATTN_VARIANTS = ("plain", "padding", "bias", "causal", "dropout")
ATTN_DTYPES = ("fp32", "bf16", "fp16")
# Contrastive: one rank's InfoNCE / SigLIP over N = 32k features, hard targets, soft targets
# (teacher features of the same width) and SigLIP, forward and both backward launches; D = 257
# (rows neither 16-element aligned nor a multiple of 16 long: the kernels read zero-padded copies,
# contrastive._kernel_pair).
CON_N = 32768
CON_D = (256, 257, 512, 768)
CON_VARIANTS = ("hard", "soft", "siglip")
CON_DTYPES = ("fp32", "bf16", "fp16")
# MAE masking: B = 256, L patches (196: ViT/16 at 224, 256: ViT/14 at 224), 75% masked, encoder
# widths 768 / 1024 / 1280 and the decoder's 512; the positional add of the gather and the
# decoder's mask-token fill (and the gather's backward, without a fill).
MAE_B = 256
MAE_L = (196, 256)
MAE_D = (512, 768, 1024, 1280)
MAE_DTYPES = ("fp32", "bf16")
# EMA: a ViT-B block's parameter shapes, (ema dtype, param dtype) pairs.
EMA_SHAPES = ((2304, 768), (2304,), (768, 768), (768,), (3072, 768), (3072,), (768, 3072))
EMA_DTYPES = (("fp32", "fp32"), ("bf16", "bf16"), ("fp32", "bf16"))
# The CI tier (the default; ``--full`` compiles every case above): one case per configuration that is
# distinct after the host code's tile choice, which depends on (kind, dtype class, padded head dim).
# N = 257 and 577 compile exactly like 197 (odd lengths: no divisibility by 16 of N or the strides);
# 4096 differs from 1024 only in num_m's divisibility by 16.  Head dims 80 and 96 share BLOCK_D = 128,
# the D mask and divisible strides; 72 and 40 are the padded ones with strides not divisible by 16.
# fp16 runs the bf16 tiles and code except the output rounding: its plain variant at N = 197.  fp32
# attention (IEEE FMA dots, 2-4 s a compile with the small fp32 tiles; ~10 s when they spilled) keeps
# its plain and dropout variants at N = 197.
CI_ATTN_D = (40, 64, 72, 80, 128, 256)
CI_ATTN_N = {"bf16": (197, 1024), "fp16": (197,), "fp32": (197,)}
CI_ATTN_VARIANTS = {"bf16": ATTN_VARIANTS, "fp16": ("plain",), "fp32": ("plain", "dropout")}
CI_CON_D = (256, 768)                       # 512 compiles like 256 with a longer (constexpr) D loop
CI_CON_VARIANTS = {"bf16": CON_VARIANTS, "fp16": ("hard",), "fp32": CON_VARIANTS}
CI_CON_EXTRA = (("bf16", 257, "hard"),)        # plus: the padded-feature path
# TF32 (fp32 inputs under torch.set_float32_matmul_precision("high"): the labels end in " tf32"):
# tensor-core dots at the tables' "tf32" tiles (else their fp32 ones), held to wgmma and
# TF32_SPILL_BUDGET.  CI: attention plain and dropout at N = 197 for each CI head dim, contrastive hard
# targets at D = 768; --full: every attention and contrastive shape.
CI_TF32_ATTN_N = (197,)
CI_TF32_ATTN_VARIANTS = ("plain", "dropout")
CI_TF32_CON_D = (768,)
CI_TF32_CON_VARIANTS = ("hard",)
DROPOUT_P = 0.1
DROPOUT_SEED = 1234567                      # ops draws seeds in [0, 2**31): an odd i32, like most

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One realistic call of the launchers: ``run()`` makes the launches on meta tensors."""
    op: str
    label: str           # e.g. "attention bf16 N=197 D=64 H=12 bias"
    dtype: str           # "fp32", "bf16", "fp16", or "fp32<-bf16" (EMA: ema <- params)
    run: Callable[[], None]
    ci: bool = True      # in the CI tier (the default)
    tf32: bool = False   # run under torch.set_float32_matmul_precision("high") (fp32 TF32 dots)

    @property
    def half(self) -> bool:
        return "bf16" in self.dtype or "fp16" in self.dtype


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _with_tf32(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` under ``torch.set_float32_matmul_precision("high")`` (fp32 dots in TF32), the previous
    precision restored afterwards."""
    def tf32_run():
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            run()
        finally:
            torch.set_float32_matmul_precision(prev)

    return tf32_run


def _attention_case(dtype: str, N: int, D: int, variant: str, tf32: bool = False) -> Case:
    H = ATTN_HEADS[D]

    def run():
        from . import attention

        dt = _DT[dtype]
        q, k, v = _meta(ATTN_B, N, 3, H, D, dtype=dt).permute(2, 0, 3, 1, 4).unbind(0)
        kw = dict(scale=D ** -0.5)
        grad_shape = None
        if variant == "padding":
            kw["key_padding_mask"] = _meta(ATTN_B, N, dtype=torch.bool)
        elif variant == "bias":
            kw["bias"] = _meta(1, H, N, N, dtype=dt).expand(ATTN_B, H, N, N)
            grad_shape = (1, H, N, N)
        elif variant == "causal":
            kw["causal"] = True
        elif variant == "dropout":
            kw.update(dropout_p=DROPOUT_P, seed=DROPOUT_SEED)
        out, lse = attention.attention_forward(q, k, v, **kw)
        do = _meta(ATTN_B, H, N, D, dtype=dt)
        attention.attention_backward(do, q, k, v, out, lse, bias_grad_shape=grad_shape, **kw)

    label = f"attention {dtype} N={N} D={D} H={H} {variant}"
    if tf32:
        ci = D in CI_ATTN_D and N in CI_TF32_ATTN_N and variant in CI_TF32_ATTN_VARIANTS
        return Case("attention", label + " tf32", dtype, _with_tf32(run), ci, tf32=True)
    ci = D in CI_ATTN_D and N in CI_ATTN_N[dtype] and variant in CI_ATTN_VARIANTS[dtype]
    return Case("attention", label, dtype, run, ci)


def _dropout_mask_case() -> Case:
    def run():
        from . import attention

        attention.dropout_mask(ATTN_B, 12, 197, 197, dropout_p=DROPOUT_P, seed=DROPOUT_SEED, offset=0,
                               device="meta")

    return Case("attention", "dropout_mask N=197 H=12", "fp32", run)


def _contrastive_case(dtype: str, D: int, variant: str, tf32: bool = False) -> Case:
    def run():
        from . import contrastive

        dt = _DT[dtype]
        q, k = _meta(CON_N, D, dtype=dt), _meta(CON_N, D, dtype=dt)
        g = _meta(CON_N, dtype=torch.float32)
        if variant == "siglip":
            contrastive.siglip_rows_forward(q, k, 10.0, -10.0)
            contrastive.siglip_rows_backward(q, k, 10.0, -10.0, g)
            return
        soft = {}
        if variant == "soft":
            soft = dict(sq=_meta(CON_N, D, dtype=dt), sk=_meta(CON_N, D, dtype=dt), soft_scale=20.0)
        lse, sdot, slse = contrastive.contrastive_loss_lse_forward(q, k, 100.0, **soft)
        back = dict(soft, soft_lse=slse, g_soft=g) if soft else {}
        contrastive.contrastive_loss_lse_backward(q, k, 100.0, lse, g, **back)

    label = f"contrastive {dtype} N={CON_N} D={D} {variant}"
    if tf32:
        ci = D in CI_TF32_CON_D and variant in CI_TF32_CON_VARIANTS
        return Case("contrastive", label + " tf32", dtype, _with_tf32(run), ci, tf32=True)
    ci = (D in CI_CON_D and variant in CI_CON_VARIANTS[dtype]) or (dtype, D, variant) in CI_CON_EXTRA
    return Case("contrastive", label, dtype, run, ci)


def _masking_case(dtype: str, L: int, D: int) -> Case:
    def run():
        from . import masking

        dt = _DT[dtype]
        keep = L // 4
        keys = _meta(MAE_B, L, dtype=torch.float32)
        _, ids_keep, _ = masking.random_masking_rank(keys, keep, dt)
        x = _meta(MAE_B, L, D, dtype=dt)
        pos = _meta(1, L + 1, D, dtype=dt)[0, 1:]          # pos_embed without the cls slot
        masking.random_masking_gather(x, ids_keep, pos)
        ids_restore = _meta(MAE_B, L, dtype=torch.int64)
        masking.unshuffle_tokens(_meta(MAE_B, keep, D, dtype=dt), ids_restore, _meta(D, dtype=dt))
        masking.unshuffle_tokens(_meta(MAE_B, keep, D, dtype=dt), ids_restore, None)

    return Case("masking", f"masking {dtype} B={MAE_B} L={L} D={D}", dtype, run)


def _ema_case(ema_dtype: str, param_dtype: str) -> Case:
    def run():
        from . import ema

        ema.ema_update_([_meta(*s, dtype=_DT[ema_dtype]) for s in EMA_SHAPES],
                        [_meta(*s, dtype=_DT[param_dtype]) for s in EMA_SHAPES], 0.9999)

    label = ema_dtype if ema_dtype == param_dtype else f"{ema_dtype}<-{param_dtype}"
    return Case("ema", f"ema {label} ViT-B block ({len(EMA_SHAPES)} tensors)", label, run)


def cases(full: bool = True) -> List[Case]:
    """The documented cases (the shape lists above) in table order; ``full=False``: the CI tier."""
    out = [_attention_case(dt, N, D, var) for dt in ATTN_DTYPES for D in ATTN_HEADS for N in ATTN_N
           for var in ATTN_VARIANTS]
    out += [_attention_case("fp32", N, D, var, tf32=True) for D in ATTN_HEADS for N in ATTN_N
            for var in ATTN_VARIANTS]
    out.append(_dropout_mask_case())
    out += [_contrastive_case(dt, D, var) for dt in CON_DTYPES for D in CON_D for var in CON_VARIANTS]
    out += [_contrastive_case("fp32", D, var, tf32=True) for D in CON_D for var in CON_VARIANTS]
    out += [_masking_case(dt, L, D) for dt in MAE_DTYPES for L in MAE_L for D in MAE_D]
    out += [_ema_case(e, p) for e, p in EMA_DTYPES]
    return out if full else [c for c in out if c.ci]


# ----------------------------------------------------------------------------- capture
class _GateDriver(DriverBase):
    """Triton's active driver while capturing: the H200 target, no device behind it."""

    DEVICE = "vlfast-gate:sm_90a"    # a device key of its own: never shares a real device's caches

    @classmethod
    def is_active(cls):
        return False                 # never chosen by Triton itself

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_current_device(self):
        return self.DEVICE

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_benchmarker(self):
        raise RuntimeError("the compile gate's driver cannot run kernels")


@dataclasses.dataclass
class Launch:
    """One distinct compile request captured from the launchers."""
    kernel: str
    fn: object                       # the JITFunction
    compile: dict                    # the jit_cache_hook's compile request
    cases: List[str]                 # labels of the cases that launched it
    dtype: str
    half: bool
    tf32: bool = False               # an fp32 launch compiled with TF32 dots (DOT_PREC="tf32")

    @property
    def constexprs(self) -> Dict[str, object]:
        names = self.fn.arg_names
        return {names[k[0]]: v for k, v in self.compile["constants"].items() if len(k) == 1}

    def config(self) -> str:
        """The tiles and flags: ``BLOCK_M=128 BLOCK_N=64 HAS_BIAS w8 s3`` (constexprs, warps, stages)."""
        parts = []
        for name, v in self.constexprs.items():
            if isinstance(v, bool):
                if v:
                    parts.append(name)
            elif isinstance(v, int):
                parts.append(f"{name}={v}")
            elif name == "COMPUTE":
                parts.append(f"COMPUTE={v}")
        parts.append(f"w{self.compile['num_warps']} s{self.compile['num_stages']}")
        return " ".join(parts)


def _kernels_are_compiled() -> bool:
    """True when the kernels were decorated for Triton's compiler (not under TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    from . import attention
    return isinstance(attention._attn_fwd_kernel, JITFunction)


@contextlib.contextmanager
def capture(sink: List[Tuple[object, dict]]):
    """Inside the block, Triton launches compile nothing and run nothing: each appends
    ``(JITFunction, compile request)`` to ``sink``, as compiled for ``TARGET``."""
    from vlfast._backend import triton_interpret

    if triton_interpret() or not _kernels_are_compiled():
        raise RuntimeError("the compile gate needs Triton's compiler: run it without TRITON_INTERPRET=1 "
                           "(python -m vlfast.kernels.gate re-runs itself without it)")

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        sink.append((fn.jit_function, compile))
        return True                  # skip Triton's compile and the launch

    saved_driver = _triton_driver._active
    saved_hook = knobs.runtime.jit_cache_hook
    _triton_driver.set_active(_GateDriver())
    knobs.runtime.jit_cache_hook = hook
    try:
        yield sink
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        _triton_driver._active = saved_driver


def collect(case_list: Sequence[Case]) -> Tuple[List[Launch], int]:
    """Run every case's launchers under ``capture`` and merge identical compile requests:
    ``(distinct launches, number of launches captured)``."""
    launches: "collections.OrderedDict[tuple, Launch]" = collections.OrderedDict()
    n_calls = 0
    for case in case_list:
        sink: List[Tuple[object, dict]] = []
        with capture(sink):
            case.run()
        if not sink:
            raise RuntimeError(f"gate case {case.label!r} launched no kernel")
        n_calls += len(sink)
        for fn, req in sink:
            name = fn.__name__
            key = (name, req["key"])
            if key in launches:
                if case.label not in launches[key].cases:
                    launches[key].cases.append(case.label)
            else:
                launch = launches[key] = Launch(name, fn, req, [case.label], case.dtype, case.half)
                launch.tf32 = not case.half and launch.constexprs.get("DOT_PREC") == "tf32"
    return list(launches.values()), n_calls


# ----------------------------------------------------------------------------- compile and measure
def cache_dir() -> str:
    d = os.environ.get("VLFAST_GATE_CACHE")
    if not d:
        try:
            user = getpass.getuser()
        except Exception:  # no user name (containers): one shared folder
            user = "user"
        d = os.path.join(tempfile.gettempdir(), f"vlfast-gate-{user}")
    return d


def _options(req: dict) -> dict:
    return dict(num_warps=req["num_warps"], num_ctas=req["num_ctas"], num_stages=req["num_stages"],
                enable_fp_fusion=req["enable_fp_fusion"], launch_cooperative_grid=req["launch_cooperative_grid"])


def result_key(launch: Launch) -> str:
    req = launch.compile
    blob = json.dumps([RESULT_VERSION, triton.__version__, launch.fn.cache_key, launch.kernel,
                       sorted((str(k), str(v)) for k, v in req["signature"].items()),
                       sorted((str(k), str(v)) for k, v in req["constants"].items()),
                       sorted((str(k), str(v)) for k, v in req["configs"][0].items()),
                       _options(req), [TARGET.backend, TARGET.arch, TARGET.warp_size]])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+([A-Z@!][^;]*);", re.M)


def _opcode(instr: str) -> str:
    """``HGMMA.64x64x16.F32.BF16`` of ``@P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], ...``."""
    toks = instr.split()
    if toks and toks[0].startswith("@"):
        toks = toks[1:]
    return toks[0] if toks else ""


def _is_gpu_fence(op: str) -> bool:
    """A GPU- or system-scope memory fence (``MEMBAR.ALL.GPU``, ``MEMBAR.SC.SYS``...) or an L1
    invalidate (``CCTL.IVALL``): what an acquire/release atomic costs.  CTA-scope fences
    (``MEMBAR.ALL.CTA``, around wgmma's shared-memory operands) are not counted."""
    return (op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op)) or op.startswith("CCTL.IVALL")


def atomic_fence_counts() -> Dict[str, int]:
    """GPU-scope fences (:func:`_is_gpu_fence`) in the sm_90a SASS of a 128-element ``tl.atomic_add``
    with the default (acq_rel) and with relaxed semantics: the premise of the ``fence`` rule."""
    from triton.compiler import ASTSource

    from ._fence_probe import accumulate

    out = {}
    for name, relaxed in (("acq_rel", False), ("relaxed", True)):
        src = ASTSource(accumulate, {"x_ptr": "*fp32", "out_ptr": "*fp32", "RELAXED": "constexpr"},
                        {"RELAXED": relaxed})
        k = triton.compile(src, target=TARGET)
        out[name] = sum(_is_gpu_fence(_opcode(i)) for i in _SASS_INSTR.findall(_sass(k.asm["cubin"])))
    return out


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


_NARROW_LOAD = re.compile(r"LDG(\.\w+)*\.[US](8|16)$")     # LDG.E.U16, LDG.E.EL.S8, ...


def measure(launch: Launch) -> dict:
    """Compile ``launch`` for ``TARGET`` and read registers, spills, shared memory, MMA kind and SASS."""
    from triton.compiler import ASTSource

    req = launch.compile
    src = ASTSource(launch.fn, req["signature"], req["constants"], req["configs"][0])
    log = io.StringIO()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True   # ptxas runs, log printed
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=TARGET, options=_options(req))
    except Exception as exc:  # a compile error is a result of the gate, not a crash
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return dict(error=f"{type(exc).__name__}: {first}"[:300], seconds=time.time() - t0)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    text = log.getvalue()
    spill = _PTXAS_SPILL.search(text)
    regs = _PTXAS_REGS.search(text)
    if spill is None or regs is None:
        return dict(error="could not read ptxas -v report: " + text[-300:], seconds=time.time() - t0)
    sass = _sass(kernel.asm["cubin"])
    instrs = _SASS_INSTR.findall(sass)
    ttgir = kernel.asm.get("ttgir", "")
    return dict(
        regs=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
        spill_loads=int(spill.group(3)), shared=int(kernel.metadata.shared),
        num_warps=int(kernel.metadata.num_warps),
        sass=len(instrs),
        hgmma=sum(1 for i in instrs if _opcode(i).startswith("HGMMA")),
        hmma=sum(1 for i in instrs if _opcode(i).startswith("HMMA")),
        membar=sum(1 for i in instrs if _is_gpu_fence(_opcode(i))),
        narrow_loads=sum(1 for i in instrs if _NARROW_LOAD.match(_opcode(i))),
        dots=len(re.findall(r"\btt\.dot\b", ttgir)),
        wgmma_dots=len(re.findall(r"\bttng\.warp_group_dot\b", ttgir)),
        seconds=time.time() - t0,
    )


def mma_kind(r: dict) -> str:
    if r["hgmma"] and r["hmma"]:
        return "wgmma+mma.sync"
    if r["hgmma"]:
        return "wgmma"
    if r["hmma"]:
        return "mma.sync"
    return "fma" if (r["dots"] or r["wgmma_dots"]) else "-"


def ctas_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per sm_90 SM: the least of the thread, register, shared-memory and block limits.

    Registers are allocated per warp in units of 256 (regs rounded up to 8 per thread), and a warp's
    registers come from one of the 4 sub-partitions (16384 each); each block also holds 1 KB of
    shared memory for the driver.
    """
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = 4 * ((REGS_PER_SM // 4) // per_warp) // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    return max(0, min(MAX_CTAS_PER_SM, by_threads, by_regs, by_smem))


def verdicts(launch: Launch, r: dict) -> List[str]:
    """The rules this configuration breaks (empty: it passes); each names the rule and the number."""
    if "error" in r:
        return [f"compile: {r['error']}"]
    out = []
    spill = max(r["spill_stores"], r["spill_loads"])
    if r["shared"] > SMEM_LIMIT:
        out.append(f"smem: {r['shared']} bytes of shared memory > {SMEM_LIMIT}")
    # tensor-core configurations (bf16 / fp16, and fp32 with TF32 dots): no spill, wgmma only
    tc = "half" if launch.half else "tf32" if launch.tf32 else None
    what = f"{launch.dtype} kernel" + (" with TF32 dots" if tc == "tf32" else "")
    if tc and spill > (TF32_SPILL_BUDGET if tc == "tf32" else 0):
        out.append(f"{tc}-spill: {what} spills {r['spill_stores']} bytes (stores), {r['spill_loads']} (loads)"
                   + (f" > the TF32 budget {TF32_SPILL_BUDGET}" if tc == "tf32" else ""))
    if tc and (r["dots"] or r["hmma"] or (r["wgmma_dots"] and not r["hgmma"])):
        out.append(f"{tc}-wgmma: {what} with a dot that does not use wgmma "
                   f"({mma_kind(r)}: {r['hgmma']} HGMMA, {r['hmma']} HMMA)")
    if r.get("membar"):
        out.append(f"fence: {r['membar']} GPU-scope fence / L1 invalidate instruction(s) (an atomic with "
                   "acquire/release semantics; accumulating atomics need sem='relaxed')")
    if tc is None and spill > FP32_SPILL_BUDGET:
        out.append(f"fp32-spill: spills {spill} bytes > the fp32 budget {FP32_SPILL_BUDGET}")
    return out


def _measure_cached(launch: Launch, use_cache: bool) -> dict:
    path = os.path.join(cache_dir(), result_key(launch) + ".json")
    if use_cache and os.path.exists(path):
        try:
            with open(path) as f:
                r = json.load(f)
            r["cached"] = True
            return r
        except (OSError, ValueError):
            pass
    r = measure(launch)
    if use_cache and "error" not in r:
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(r, f)
        os.replace(tmp, path)
    return r


_WORK: List[Launch] = []             # inherited by the forked compile workers


def _work(args):
    i, use_cache = args
    return i, _measure_cached(_WORK[i], use_cache)


def measure_all(launches: Sequence[Launch], jobs: int = 0, use_cache: bool = True,
                progress: Optional[Callable[[int, int], None]] = None) -> List[dict]:
    """``measure`` every launch (cached), in ``jobs`` forked processes (0: the CPU count)."""
    import multiprocessing as mp

    jobs = jobs or os.cpu_count() or 1
    results: List[Optional[dict]] = [None] * len(launches)
    # Triton's own cache gets binaries for a GPU this machine may not have: keep them apart
    tcache = tempfile.mkdtemp(prefix="vlfast-gate-triton-")
    saved_dir = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = tcache
    try:
        todo = list(range(len(launches)))
        if jobs > 1 and len(todo) > 1 and "fork" in mp.get_all_start_methods():
            _WORK[:] = list(launches)
            with mp.get_context("fork").Pool(min(jobs, len(todo))) as pool:
                for n, (i, r) in enumerate(pool.imap_unordered(_work, [(i, use_cache) for i in todo]), 1):
                    results[i] = r
                    if progress:
                        progress(n, len(todo))
            _WORK.clear()
        else:
            for n, i in enumerate(todo, 1):
                results[i] = _measure_cached(launches[i], use_cache)
                if progress:
                    progress(n, len(todo))
    finally:
        if saved_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_dir
        shutil.rmtree(tcache, ignore_errors=True)
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class Report:
    launches: List[Launch]
    results: List[dict]
    n_cases: int
    n_launch_calls: int
    seconds: float

    def failures(self) -> List[Tuple[Launch, str]]:
        return [(l, v) for l, r in zip(self.launches, self.results) for v in verdicts(l, r)]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def rows(self) -> List[List[str]]:
        rows = []
        for l, r in zip(self.launches, self.results):
            first = l.cases[0] + (f" (+{len(l.cases) - 1})" if len(l.cases) > 1 else "")
            if "error" in r:
                rows.append([l.kernel, l.config(), first, "-", "-", "-", "-", "-", "-", "-", "FAIL compile"])
                continue
            bad = verdicts(l, r)
            rows.append([l.kernel, l.config(), first, str(r["regs"]),
                         str(max(r["spill_stores"], r["spill_loads"])), f"{r['shared'] / 1024:.1f}K", mma_kind(r),
                         str(ctas_per_sm(r["regs"], r["num_warps"], r["shared"])), str(r["sass"]),
                         str(r["narrow_loads"]),
                         "FAIL " + ",".join(v.split(":")[0] for v in bad) if bad else "ok"])
        return rows

    def summary(self) -> List[str]:
        """Per kernel: configurations, wgmma / mma.sync / fma counts, spilling ones, SASS range."""
        per: Dict[str, list] = collections.OrderedDict()
        for l, r in zip(self.launches, self.results):
            per.setdefault(l.kernel, []).append((l, r))
        out = []
        for k, items in per.items():
            ok = [(l, r) for l, r in items if "error" not in r]
            kinds = collections.Counter(mma_kind(r) for _, r in ok)
            spills = [(l, r) for l, r in ok if max(r["spill_stores"], r["spill_loads"])]
            half_spills = sum(1 for l, _ in spills if l.half)
            sass = [r["sass"] for _, r in ok] or [0]
            out.append(f"{k}: {len(items)} configs ({sum(l.half for l, _ in items)} half), "
                       + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
                       + f"; spilling {len(spills)} ({half_spills} half, max "
                       + f"{max([max(r['spill_stores'], r['spill_loads']) for _, r in spills] or [0])} B)"
                       + f"; SASS {min(sass)}-{max(sass)}; compile errors {len(items) - len(ok)}")
        return out

    def format(self) -> List[str]:
        head = ["kernel", "configuration", "first case (+ more with the same configuration)", "regs", "spill B",
                "smem", "mma", "CTAs/SM", "SASS", "ld<32b", "gate"]
        rows = [head] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"vlfast sm_90a compile gate: triton {triton.__version__}, target {TARGET.backend} "
                 f"sm_{TARGET.arch}a (warp {TARGET.warp_size})",
                 f"{self.n_cases} shape cases, {self.n_launch_calls} launches captured, {len(self.launches)} distinct "
                 f"configurations after the host code's tile choice "
                 f"({sum(bool(r.get('cached')) for r in self.results)} from the cache), {self.seconds:.0f} s"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
        lines.append("per kernel:")
        lines += ["  " + s for s in self.summary()]
        fails = self.failures()
        lines.append("")
        if fails:
            lines.append(f"GATE FAILED: {len(fails)} rule violations in "
                         f"{len({id(l) for l, _ in fails})} configurations")
            for l, v in fails:
                lines.append(f"  FAIL {l.kernel} [{l.config()}] ({l.cases[0]}): {v}")
        else:
            lines.append(f"gate passed: {len(self.launches)} configurations, rules: compile, smem <= {SMEM_LIMIT} B, "
                         f"no bf16/fp16 spill, wgmma for every bf16/fp16/TF32 dot, TF32 spills <= "
                         f"{TF32_SPILL_BUDGET} B, fp32 IEEE spills <= {FP32_SPILL_BUDGET} B, no memory fence")
        return lines


def run_gate(only: Optional[str] = None, jobs: int = 0, use_cache: bool = True, full: bool = False,
             progress: Optional[Callable[[int, int], None]] = None) -> Report:
    """Capture, compile and judge the cases (the CI tier, or ``full``) whose label matches the regex ``only``."""
    t0 = time.time()
    sel = [c for c in cases(full) if only is None or re.search(only, c.label)]
    if not sel:
        raise ValueError(f"no gate case matches {only!r}")
    launches, n_calls = collect(sel)
    results = measure_all(launches, jobs=jobs, use_cache=use_cache, progress=progress)
    return Report(launches, results, len(sel), n_calls, time.time() - t0)


# ----------------------------------------------------------------------------- command line
def _parse_tiles(specs: Sequence[str]) -> Dict[str, Dict[str, Dict[str, int]]]:
    """``["attention.fwd.BLOCK_M=32,BLOCK_N=32", ...]`` -> ``{table: {kind: {col: value}}}``."""
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    for spec in specs:
        m = re.fullmatch(r"(\w+)\.(\w+)\.(\w+=\d+(?:,\w+=\d+)*)", spec.strip())
        if not m:
            raise ValueError(f"--tiles {spec!r}: expected TABLE.KIND.COL=VALUE[,COL=VALUE...]")
        vals = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in m.group(3).split(","))
        out.setdefault(m.group(1), {}).setdefault(m.group(2), {}).update(vals)
    return out


def _rerun_without_interpreter(argv: Sequence[str], out) -> int:
    """The gate in a fresh interpreter without TRITON_INTERPRET (this one decorated the kernels for it)."""
    if os.environ.get("VLFAST_GATE_CHILD"):
        raise RuntimeError("the compile gate's kernels are interpreted even without TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLFAST_GATE_CHILD"] = "1"
    cmd = [sys.executable, "-m", "vlfast.kernels.gate", *argv]
    if out is sys.stdout:
        out.flush()
        return subprocess.call(cmd, env=env)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out.write(r.stdout)
    return r.returncode


def main(argv: Optional[Sequence[str]] = None, out=None) -> int:
    """``python -m vlfast.kernels.gate [--only REGEX] [--tiles T.K.COL=V,...] [--jobs N] [--no-cache]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if out is None else out
    parser = argparse.ArgumentParser(prog="python -m vlfast.kernels.gate", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="regex on the case labels (e.g. 'attention bf16 N=197 D=64 ')")
    parser.add_argument("--tiles", action="append", default=[],
                        help="force tiles, as override_tiles: TABLE.KIND.COL=VALUE[,COL=VALUE...] (repeatable)")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: the CPU count)")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything (no result cache)")
    parser.add_argument("--full", action="store_true",
                        help="every documented case, not only the CI tier (about 900 configurations, ~1 h on 2 cores)")
    parser.add_argument("--list", action="store_true", help="list the shape cases and exit")
    parser.add_argument("--quiet", action="store_true", help="print the summary and the failures, not the table")
    args = parser.parse_args(argv)
    from vlfast._backend import triton_interpret

    if triton_interpret() or not _kernels_are_compiled():
        return _rerun_without_interpreter(argv, out)
    if args.list:
        for c in cases(args.full):
            if args.only is None or re.search(args.only, c.label):
                print(c.label, file=out)
        return 0
    from . import _common, attention, contrastive, ema, masking  # noqa: F401  (registers the tile tables)

    tiles = _parse_tiles(args.tiles)
    with contextlib.ExitStack() as stack:
        for table, kinds in tiles.items():
            stack.enter_context(_common.override_tiles(table, **kinds))

        def progress(n, total):
            if sys.stderr.isatty() and (n % 20 == 0 or n == total):
                print(f"\rcompiled {n}/{total}", end="\n" if n == total else "", file=sys.stderr, flush=True)

        report = run_gate(args.only, jobs=args.jobs, use_cache=not args.no_cache, full=args.full, progress=progress)
    lines = report.format()
    if args.quiet:
        lines = lines[:2] + lines[lines.index("per kernel:"):]
    if tiles:
        lines.insert(1, "tiles forced: " + "; ".join(f"{t}.{k}: {v}" for t, ks in tiles.items()
                                                      for k, v in ks.items()))
    for line in lines:
        print(line, file=out)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
