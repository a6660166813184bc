"""TF32 as an opt-in for fp32 inputs (vlfast.kernels._common.dot_precision).

fp32 attention / contrastive kernels use IEEE fp32 dots unless the program opted in to TF32 for its
fp32 matmuls (``torch.set_float32_matmul_precision("high")`` or ``"medium"``, i.e.
``torch.backends.cuda.matmul.allow_tf32``): then their ``tl.dot`` calls get
``input_precision="tf32"`` (the ``DOT_PREC`` constexpr, read at every launch).

* CPU (Triton's interpreter): the switch reaches every kernel with a dot (each launch's
  ``DOT_PREC`` is recorded), ``"highest"`` restores IEEE, and fp16 / bf16 launches do not depend on
  it.  The interpreter ignores ``input_precision`` (numpy fp32 products): it does NOT emulate TF32's
  rounding, so it cannot measure TF32's error; nothing here fakes it.
* CUDA (``make gpu-check`` runs this file; skipped without a GPU): the TF32 error is measured
  against a float64 reference and held to FlashAttention's rule against torch's own TF32 eager
  math (2x for outputs, 3x for gradients), and checked to be far above the IEEE kernels' error
  (so TF32 really ran).
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vlfast.kernels.attention as A  # noqa: E402
import vlfast.kernels.contrastive as C  # noqa: E402
from vlfast.kernels import _common  # noqa: E402
from vlfast.kernels._common import dot_precision, fp32_matmul_uses_tf32  # noqa: E402
from vlfast.testing import FORWARD_FACTOR, GRAD_FACTOR, assert_within_eager_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def matmul_precision(value: str):
    """``torch.set_float32_matmul_precision(value)`` inside the block, the previous value restored."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


class _Spy:
    """Stands in for a ``@triton.jit`` kernel: records each launch's ``DOT_PREC``, then launches."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.seen.append(kwargs["DOT_PREC"])
            return launch(*args, **kwargs)

        return call


def _spy(monkeypatch, module, *names):
    seen = {name: [] for name in names}
    for name in names:
        monkeypatch.setattr(module, name, _Spy(getattr(module, name), seen[name]))
    return seen


def _attention_launches(monkeypatch, dtype, precision):
    """Forward + backward of a small attention under ``precision``: ``{kernel: [DOT_PREC, ...]}``
    and the outputs."""
    seen = _spy(monkeypatch, A, "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    q, k, v, do = (torch.randn(1, 2, 19, 24, device=DEVICE).to(dtype) for _ in range(4))
    with matmul_precision(precision):
        out, lse = A.attention_forward(q, k, v, scale=24 ** -0.5)
        grads = A.attention_backward(do, q, k, v, out, lse, scale=24 ** -0.5)[:3]
    monkeypatch.undo()
    return seen, (out, *grads)


# ----------------------------------------------------------------------------- the switch (CPU)
def test_dot_precision_follows_torch_fp32_matmul_precision():
    assert torch.get_float32_matmul_precision() == "highest"          # torch's default: IEEE
    assert dot_precision(torch.float32) == "ieee" and not fp32_matmul_uses_tf32()
    for value, want in (("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
        with matmul_precision(value):
            assert dot_precision(torch.float32) == want, value
            assert fp32_matmul_uses_tf32() == (want == "tf32")
            for half in (torch.float16, torch.bfloat16):              # tensor cores whatever the setting
                assert dot_precision(half) == "tf32"
    assert dot_precision(torch.float32) == "ieee"                     # restored


def test_dot_precision_reads_allow_tf32_and_the_new_api():
    matmul = torch.backends.cuda.matmul
    prev = torch.get_float32_matmul_precision()
    try:
        matmul.allow_tf32 = True                                      # the legacy flag
        assert dot_precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        if hasattr(matmul, "fp32_precision"):                         # torch >= 2.9
            matmul.fp32_precision = "tf32"                            # (get_float32_matmul_precision raises now)
            assert dot_precision(torch.float32) == "tf32"
            matmul.fp32_precision = "ieee"
            assert dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(prev)                      # also ends a legacy / new API mix
    assert dot_precision(torch.float32) == "ieee"


def test_switch_reaches_every_attention_kernel(monkeypatch):
    ieee, ieee_out = _attention_launches(monkeypatch, torch.float32, "highest")
    torch.manual_seed(0)
    tf32, tf32_out = _attention_launches(monkeypatch, torch.float32, "high")
    for name in ieee:
        assert ieee[name] and set(ieee[name]) == {"ieee"}, (name, ieee[name])
        assert tf32[name] and set(tf32[name]) == {"tf32"}, (name, tf32[name])
    if DEVICE == "cpu":
        # the interpreter ignores input_precision: TF32 launches compute the IEEE results exactly
        for a, b in zip(ieee_out, tf32_out):
            assert torch.equal(a, b)
    # after the block torch is back at "highest": the next launch is IEEE again
    again, _ = _attention_launches(monkeypatch, torch.float32, torch.get_float32_matmul_precision())
    assert all(set(v) == {"ieee"} for v in again.values()), again


def test_half_attention_launches_do_not_depend_on_the_switch(monkeypatch):
    for precision in ("highest", "high"):
        seen, _ = _attention_launches(monkeypatch, torch.bfloat16, precision)
        assert all(v and set(v) == {"tf32"} for v in seen.values()), (precision, seen)


def test_switch_reaches_the_contrastive_kernels(monkeypatch):
    q, k = torch.randn(37, 40, device=DEVICE), torch.randn(45, 40, device=DEVICE)
    g = torch.randn(37, device=DEVICE)
    for precision, want in (("high", "tf32"), ("highest", "ieee")):
        seen = _spy(monkeypatch, C, "_lse_fwd_kernel", "_grad_tile_kernel", "_siglip_fwd_kernel")
        with matmul_precision(precision):
            lse, _, _ = C.contrastive_loss_lse_forward(q, k, 10.0)
            C.contrastive_loss_lse_backward(q, k, 10.0, lse, g)
            C.siglip_rows_forward(q, k, 10.0, -10.0)
        monkeypatch.undo()
        for name, got in seen.items():
            assert got and set(got) == {want}, (precision, name, got)


def test_tf32_tile_class_falls_back_to_fp32_rows(monkeypatch):
    # a table's "tf32" rows serve fp32 inputs under the switch (before its fp32 rows, wherever they
    # stand), its fp32 rows serve them otherwise and wherever a kind has no tf32 row
    monkeypatch.setattr(_common, "_TABLES", dict(_common._TABLES))      # the test table stays local
    t = _common.TileTable("tf32_test", doc="", kernels={"a": ("k",), "b": ("k",)}, keys=("kind", "dtype"),
                          values=("BLOCK_M",), rows=(("a", "fp32", 16), ("a", "tf32", 64), ("b", "fp32", 32),
                                                     ("a", "fp16/bf16", 256)))
    assert _common.tile_classes(torch.float32) == ("fp32",)
    assert t.lookup("a", torch.float32, gpu=True) == {"BLOCK_M": 16}
    with matmul_precision("high"):
        assert _common.tile_classes(torch.float32) == ("tf32", "fp32")
        assert _common.tile_classes(torch.bfloat16) == ("fp16/bf16",)
        assert t.lookup("a", torch.float32, gpu=True) == {"BLOCK_M": 64}
        assert t.lookup("b", torch.float32, gpu=True) == {"BLOCK_M": 32}       # no tf32 row: fp32's
        assert t.lookup("a", torch.bfloat16, gpu=True) == {"BLOCK_M": 256}
        cands = _common.tune_candidates(t, "a", {"BLOCK_M": 64}, torch.float32)
        assert {"BLOCK_M": 16} in cands and {"BLOCK_M": 256} not in cands      # autotune: tf32 + fp32 rows
    assert t.lookup("a", torch.float32, gpu=True) == {"BLOCK_M": 16}


def test_attention_tf32_rows_are_wgmma_shaped():
    # the attention table's tf32 rows give every MMA >= 64 rows (what wgmma needs; the gate checks the
    # compiled kernels), and its IEEE fp32 rows are used again once the switch is off
    for bd in (64, 128, 256):
        ieee = {kind: A.TILES.lookup(kind, torch.float32, BLOCK_D=bd, gpu=True) for kind in ("fwd", "bwd_kv", "bwd_q")}
        with matmul_precision("high"):
            tf32 = {kind: A.TILES.lookup(kind, torch.float32, BLOCK_D=bd, gpu=True) for kind in ieee}
        assert tf32["fwd"]["BLOCK_M"] >= 64 and tf32["bwd_q"]["BLOCK_M"] >= 64 and tf32["bwd_kv"]["BLOCK_N"] >= 64
        assert tf32 != ieee, bd
        assert ieee == {kind: A.TILES.lookup(kind, torch.float32, BLOCK_D=bd, gpu=True) for kind in ieee}


# ----------------------------------------------------------------------------- the error (CUDA)
def _tf32_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def _eager_attention(q, k, v, scale):
    """Eager attention in the inputs' dtype (torch.matmul: TF32 under "high" for fp32 inputs)."""
    return torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1) @ v


def _kernel_attention(q, k, v, do, scale):
    out, lse = A.attention_forward(q, k, v, scale=scale)
    return (out, *A.attention_backward(do, q, k, v, out, lse, scale=scale)[:3])


def _eager_with_grads(q, k, v, do, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = _eager_attention(*leaves, scale)
    grads = torch.autograd.grad(out, leaves, do)
    return (out.detach(), *grads)


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not _tf32_capable(), reason="TF32 needs CUDA compute capability >= 8.0")
@pytest.mark.parametrize("D", [64, 80, 128])
def test_tf32_attention_error_within_torch_tf32_error(D):
    B, H, N, scale = 2, 4, 197, D ** -0.5
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda") for _ in range(4))
    ref = _eager_with_grads(*(t.double() for t in (q, k, v, do)), scale)
    with matmul_precision("high"):
        eager_tf32 = _eager_with_grads(q, k, v, do, scale)
        fused_tf32 = _kernel_attention(q, k, v, do, scale)
    with matmul_precision("highest"):
        eager_ieee = _eager_with_grads(q, k, v, do, scale)
        fused_ieee = _kernel_attention(q, k, v, do, scale)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        factor = FORWARD_FACTOR if name == "out" else GRAD_FACTOR
        fused_err, eager_err, _ = assert_within_eager_error(fused_tf32[i], eager_tf32[i], ref[i], factor,
                                                            what=f"TF32 {name}")
        ieee_err = _max_err(fused_ieee[i], ref[i])
        # TF32 really ran: its error (inputs rounded to 10 mantissa bits) is far above the IEEE
        # kernels' (24 bits) and of the order of torch's TF32 error, which is far above torch's IEEE
        assert eager_err > 16 * _max_err(eager_ieee[i], ref[i]), f"torch did not use TF32 for {name}"
        assert fused_err > 16 * ieee_err, f"{name}: TF32 error {fused_err:.3g} vs IEEE {ieee_err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not _tf32_capable(), reason="TF32 needs CUDA compute capability >= 8.0")
def test_tf32_contrastive_lse_error_within_torch_tf32_error():
    N, D, scale = 1031, 768, 20.0
    q = torch.nn.functional.normalize(torch.randn(N, D, device="cuda"), dim=1)
    k = torch.nn.functional.normalize(torch.randn(N, D, device="cuda"), dim=1)
    ref = torch.logsumexp(scale * (q.double() @ k.double().T), dim=1)
    with matmul_precision("high"):
        eager = torch.logsumexp(scale * (q @ k.T), dim=1)
        fused, _, _ = C.contrastive_loss_lse_forward(q, k, scale)
    with matmul_precision("highest"):
        ieee, _, _ = C.contrastive_loss_lse_forward(q, k, scale)
    fused_err, _, _ = assert_within_eager_error(fused, eager, ref, FORWARD_FACTOR, what="TF32 lse")
    assert fused_err > 16 * _max_err(ieee, ref), (fused_err, _max_err(ieee, ref))
