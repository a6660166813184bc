"""A probe kernel for the compile gate's ``fence`` rule (``vlfast.kernels.gate.atomic_fence_counts``)."""

import triton
import triton.language as tl


@triton.jit
def accumulate(x_ptr, out_ptr, RELAXED: tl.constexpr):
    """``out[i % 4] += x[i]`` for 128 elements, with relaxed or default (acq_rel) atomics."""
    i = tl.arange(0, 128)
    v = tl.load(x_ptr + i)
    if RELAXED:
        tl.atomic_add(out_ptr + i % 4, v, sem="relaxed")
    else:
        tl.atomic_add(out_ptr + i % 4, v)
