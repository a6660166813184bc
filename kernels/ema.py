"""Multi-tensor EMA update in Triton.

``ema[i] <- decay * ema[i] + (1 - decay) * params[i]`` for a whole list of
tensors in one launch per (ema dtype, param dtype, device) group, in the spirit of
apex's ``multi_tensor_apply``: the list is cut into fixed-size chunks and every
program updates one chunk of one tensor.

Tensors are addressed relative to a base tensor of the group: the host stores,
for each tensor, its offset in elements from the base tensor's address, and a
chunk table maps ``program_id -> (tensor, chunk)``.  Because the base is a real
pointer argument and all offsets are multiples of the 16-byte vector width when
every address is 16-byte aligned, Triton can emit 128-bit loads on the unmasked
(full-chunk) path; only the last chunk of a tensor takes the masked path.

The metadata depends only on the tensors' addresses and sizes, so it is built
once and cached (an optimizer step reuses the same parameter storages).
"""

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import TileTable, compute_type, round_to

TILES = TileTable(
    "ema",
    doc="Multi-tensor EMA: BLOCK elements per vectorized step, CHUNK (a multiple of BLOCK) elements "
        "per program; the same on GPUs and in the interpreter; Triton's default warps and stages.",
    kernels={"multi_tensor": ("_ema_multi_tensor_kernel",)},
    keys=("kind", "dtype"),
    values=("BLOCK", "CHUNK"),
    rows=(
        # kind           dtype  BLOCK  CHUNK
        ("multi_tensor", "any", 1024,  8 * 1024),
    ),
)
_META_CACHE_SIZE = 32


@triton.jit
def _ema_multi_tensor_kernel(
    ema_base,            # pointer: the group's first ema tensor (all others addressed from it)
    param_base,          # pointer: the group's first param tensor
    ema_off_ptr,         # int64[T]: element offset of ema[t] from ema_base
    param_off_ptr,       # int64[T]: element offset of params[t] from param_base
    numel_ptr,           # int64[T]: number of elements of tensor t
    chunk_tensor_ptr,    # int32[G]: tensor index of program g
    chunk_index_ptr,     # int32[G]: chunk index (within its tensor) of program g
    decay_hi, decay_lo,  # fp32 pair: decay = hi + lo (lo carries the bits fp64 needs)
    omd_hi, omd_lo,      # fp32 pair: 1 - decay, likewise
    COMPUTE: tl.constexpr,     # tl.float32, or tl.float64 when either side is float64
    EMA_VEC: tl.constexpr,     # offsets are multiples of this many ema elements (1 = unknown)
    PARAM_VEC: tl.constexpr,   # likewise for params
    OUT_BF16: tl.constexpr,    # ema is bfloat16: round_to's integer rounding path
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = tl.load(chunk_index_ptr + pid).to(tl.int64) * CHUNK
    n = tl.load(numel_ptr + t)
    ema_ptr = ema_base + tl.multiple_of(tl.load(ema_off_ptr + t), EMA_VEC)
    param_ptr = param_base + tl.multiple_of(tl.load(param_off_ptr + t), PARAM_VEC)
    decay = tl.cast(decay_hi, COMPUTE) + tl.cast(decay_lo, COMPUTE)
    one_minus_decay = tl.cast(omd_hi, COMPUTE) + tl.cast(omd_lo, COMPUTE)
    out_ty = ema_base.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    if start + CHUNK <= n:
        # full chunk: no mask, so aligned tensors get 16-byte vector accesses
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + lanes
            e = tl.load(ema_ptr + offs).to(COMPUTE)
            p = tl.load(param_ptr + offs).to(COMPUTE)
            tl.store(ema_ptr + offs, round_to(e * decay + p * one_minus_decay, OUT_BF16, out_ty))
    else:
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + lanes
            mask = offs < n
            e = tl.load(ema_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            tl.store(ema_ptr + offs, round_to(e * decay + p * one_minus_decay, OUT_BF16, out_ty),
                     mask=mask)


def _split_fp32(x: float):
    """Split a double into two fp32 values whose sum carries ~48 bits of it."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    lo = float(torch.tensor(x - hi, dtype=torch.float32))
    return hi, lo


class _MetaCache:
    """LRU cache of device-side chunk tables, keyed by addresses and sizes."""

    def __init__(self, size: int):
        self.size = size
        self._d: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, ema, params, chunk: int):
        device = ema[0].device
        # offsets are in elements, so the element sizes are part of the key
        key = (device, ema[0].dtype, params[0].dtype, chunk,
               tuple((e.data_ptr(), p.data_ptr(), e.numel()) for e, p in zip(ema, params)))
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
            return hit
        meta = _build_meta(ema, params, device, chunk)
        self._d[key] = meta
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return meta

    def clear(self):
        self._d.clear()


_meta_cache = _MetaCache(_META_CACHE_SIZE)


def _build_meta(ema, params, device, chunk: int):
    e_size = ema[0].element_size()
    p_size = params[0].element_size()
    e_addr = [e.data_ptr() for e in ema]
    p_addr = [p.data_ptr() for p in params]
    numels = [e.numel() for e in ema]
    # every address must be a whole number of elements away from the base
    e_off = [(a - e_addr[0]) // e_size for a in e_addr]
    p_off = [(a - p_addr[0]) // p_size for a in p_addr]
    aligned = all(a % 16 == 0 for a in e_addr) and all(a % 16 == 0 for a in p_addr)
    e_vec = 16 // e_size if aligned else 1
    p_vec = 16 // p_size if aligned else 1
    counts = torch.tensor([triton.cdiv(n, chunk) for n in numels], dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(len(ema), dtype=torch.int32), counts)
    firsts = torch.cumsum(counts, 0) - counts
    chunk_idx = (torch.arange(tensor_idx.numel(), dtype=torch.int64)
                 - torch.repeat_interleave(firsts, counts)).to(torch.int32)
    to_dev = dict(device=device, non_blocking=False)
    return dict(
        ema_off=torch.tensor(e_off, dtype=torch.int64).to(**to_dev),
        param_off=torch.tensor(p_off, dtype=torch.int64).to(**to_dev),
        numel=torch.tensor(numels, dtype=torch.int64).to(**to_dev),
        chunk_tensor=tensor_idx.to(**to_dev),
        chunk_index=chunk_idx.to(**to_dev),
        grid=int(tensor_idx.numel()),
        e_vec=e_vec,
        p_vec=p_vec,
    )


def ema_update_(ema, params, decay: float) -> None:
    """``ema[i] <- decay * ema[i] + (1 - decay) * params[i]`` in place, one launch for the group.

    ``ema`` and ``params`` are lists of contiguous tensors on one device; all
    ``ema`` tensors share one dtype and all ``params`` share one dtype (the
    caller, ``vlfast.ops.ema``, groups and checks them).  Math in fp32 (fp64 when
    a side is fp64), ``decay`` carried as an fp32 pair; empty tensors are skipped.
    Tiles: ``TILES`` kind ``multi_tensor`` (one program per CHUNK elements of one tensor).
    """
    pairs = [(e, p) for e, p in zip(ema, params) if e.numel() > 0]
    if not pairs:
        return
    ema = [e for e, _ in pairs]
    params = [p for _, p in pairs]
    tiles = TILES.lookup("multi_tensor")
    block, chunk = tiles["BLOCK"], tiles["CHUNK"]
    if chunk % block:
        raise ValueError(f"ema tiles: CHUNK ({chunk}) must be a multiple of BLOCK ({block})")
    meta = _meta_cache.get(ema, params, chunk)
    d_hi, d_lo = _split_fp32(decay)
    o_hi, o_lo = _split_fp32(1.0 - decay)
    _ema_multi_tensor_kernel[(meta["grid"],)](
        ema[0], params[0],
        meta["ema_off"], meta["param_off"], meta["numel"],
        meta["chunk_tensor"], meta["chunk_index"],
        d_hi, d_lo, o_hi, o_lo,
        COMPUTE=compute_type(ema[0].dtype, params[0].dtype),
        EMA_VEC=meta["e_vec"], PARAM_VEC=meta["p_vec"],
        OUT_BF16=ema[0].dtype == torch.bfloat16,
        BLOCK=block, CHUNK=chunk,
    )
