"""Device helpers shared by vlfast's Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, OUT_BF16: tl.constexpr, out_ty: tl.constexpr):
    """Cast an fp32/fp64 value to ``out_ty`` with round-to-nearest-even.

    bf16 is rounded with integer arithmetic on the fp32 bits (NaN kept quiet), so the
    result is the same on GPUs and in the Triton CPU interpreter (which truncates).
    ``OUT_BF16`` must be ``out_ty == tl.bfloat16``.
    """
    if OUT_BF16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x32 != x32, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ty)
