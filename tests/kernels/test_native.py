"""Tests of the native extension vlfast._C (CPU EMA kernel, build info, CUDA sources)."""
from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vlfast import _native

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PAIRS = list(itertools.product(DTYPES, DTYPES))
SIZES = [1, 17, 1023, 100003]
DECAYS = [0.0, 1.0, 0.9999, 0.5]

C = _native.load()
needs_native = pytest.mark.skipif(C is None, reason=f"vlfast._C unavailable: {_native.error()}")


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _ema_cpu(emas, params, decay):
    C.ema_update_cpu(
        [e.data_ptr() for e in emas],
        [_native.DTYPE_CODES[e.dtype] for e in emas],
        [p.data_ptr() for p in params],
        [_native.DTYPE_CODES[p.dtype] for p in params],
        [e.numel() for e in emas],
        decay,
    )


def _make(n, edt, pdt, gen):
    e = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(edt)
    p = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(pdt)
    return e, p


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map 16-bit floats to integers whose order matches the float order."""
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -0x8000 - i, i)  # sign-magnitude -> two's-complement order


def _check(out: torch.Tensor, e0: torch.Tensor, p0: torch.Tensor, decay: float):
    if out.numel() == 0:
        return
    ref64 = decay * e0.double() + (1.0 - decay) * p0.double()
    if out.dtype == torch.float64:
        if e0.dtype == torch.float64 or p0.dtype == torch.float64:
            torch.testing.assert_close(out, ref64, rtol=1e-13, atol=1e-13)
        else:
            torch.testing.assert_close(out, ref64, rtol=1e-6, atol=1e-6)
    elif out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref64, rtol=1e-6, atol=1e-6)
    else:  # 16-bit: within 1 ulp of the correctly rounded reference
        ref = ref64.to(out.dtype)
        diff = (_ordered_bits(out) - _ordered_bits(ref)).abs()
        assert int(diff.max()) <= 1, (
            f"max ulp diff {int(diff.max())} at {int(diff.argmax())}: "
            f"got {out[diff.argmax()].item()} want {ref64[diff.argmax()].item()}"
        )


@needs_native
@pytest.mark.parametrize("edt,pdt", PAIRS, ids=[f"{_name(a)}-{_name(b)}" for a, b in PAIRS])
@pytest.mark.parametrize("decay", DECAYS)
def test_cpu_pairs_vs_float64_reference(edt, pdt, decay):
    gen = torch.Generator().manual_seed(1234)
    emas, params = zip(*(_make(n, edt, pdt, gen) for n in SIZES))
    e0 = [e.clone() for e in emas]
    _ema_cpu(emas, params, decay)
    for out, e, p in zip(emas, e0, params):
        _check(out, e, p, decay)
    if decay == 1.0:
        for out, e in zip(emas, e0):
            assert torch.equal(out, e)
    if decay == 0.0:
        for out, p in zip(emas, params):
            if p.dtype == torch.float64 and edt in (torch.float16, torch.bfloat16):
                # torch rounds float64 -> 16-bit via float32 (double rounding); ours is a
                # single correct rounding, so it is never farther from the exact value.
                exact = p.double()
                assert bool(((out.double() - exact).abs() <= (p.to(edt).double() - exact).abs()).all())
            else:
                assert torch.equal(out, p.to(edt))


@needs_native
@pytest.mark.parametrize("edt,pdt", [p for p in PAIRS if torch.float64 not in p],
                         ids=[f"{_name(a)}-{_name(b)}" for a, b in PAIRS if torch.float64 not in (a, b)])
def test_cpu_fp32_math_bit_exact(edt, pdt):
    """fp32 compute path: identical to e*d + p*(1-d) done in fp32 by torch, then RNE."""
    gen = torch.Generator().manual_seed(7)
    decay = 0.999
    e, p = _make(50021, edt, pdt, gen)
    d32 = torch.tensor(decay, dtype=torch.float32)
    omd32 = torch.tensor(1.0 - decay, dtype=torch.float64).float()
    want = (e.float() * d32 + p.float() * omd32).to(edt)
    _ema_cpu([e], [p], decay)
    assert torch.equal(e, want)


@needs_native
def test_cpu_mixed_lists_and_many_small():
    gen = torch.Generator().manual_seed(3)
    sizes = [0, 1, 5, 70000, 0, 3, 32768, 32769, 100003, 2]
    sizes += [int(s) for s in torch.randint(0, 300, (400,), generator=gen)]
    emas, params, e0 = [], [], []
    for i, n in enumerate(sizes):
        edt, pdt = PAIRS[i % len(PAIRS)]
        e, p = _make(n, edt, pdt, gen)
        emas.append(e), params.append(p), e0.append(e.clone())
    _ema_cpu(emas, params, 0.9)
    for out, e, p in zip(emas, e0, params):
        _check(out, e, p, 0.9)


@needs_native
def test_cpu_views_offsets():
    """Unaligned starting addresses (views into a bigger buffer) work."""
    gen = torch.Generator().manual_seed(5)
    base_e, base_p = _make(10001, torch.bfloat16, torch.float32, gen)
    e, p = base_e[3:9003], base_p[1:9001]
    e0 = e.clone()
    _ema_cpu([e], [p], 0.75)
    _check(e, e0, p, 0.75)
    assert torch.equal(base_e[:3], base_e[:3])


@needs_native
def test_cpu_empty_list_and_empty_tensors():
    C.ema_update_cpu([], [], [], [], [], 0.9)
    e = torch.empty(0)
    _ema_cpu([e], [torch.empty(0, dtype=torch.bfloat16)], 0.9)


@needs_native
@pytest.mark.parametrize("edt", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pdt", [torch.float32, torch.float64])
def test_cpu_inf_nan_and_rounding_edges(edt, pdt):
    big = torch.finfo(edt).max
    e = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0, 0.0, big, -big, 1e-30, 6e-8],
                     dtype=torch.float64).to(edt)
    p = torch.tensor([1.0, 2.0, 3.0, float("nan"), float("inf"), big, -big, 1e-30, 6e-8],
                     dtype=torch.float64).to(pdt)
    e0 = e.clone()
    _ema_cpu([e], [p], 0.5)
    ref = (0.5 * e0.double() + 0.5 * p.double()).to(edt)
    assert torch.equal(torch.isnan(e), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.equal(e[fin], ref[fin])  # exact halving is exactly representable or inf


def test_float16_bfloat16_roundtrip_all_values():
    """Every 16-bit pattern survives ema = 0*ema + 1*param (decay 0) exactly."""
    if C is None:
        pytest.skip(f"vlfast._C unavailable: {_native.error()}")
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dt in (torch.float16, torch.bfloat16):
        p = bits.view(dt).clone()
        for edt in (dt, torch.float32):
            e = torch.zeros(p.numel(), dtype=edt)
            _ema_cpu([e], [p], 0.0)
            want = p.to(edt)
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(e), nan)
            assert torch.equal(e[~nan], want[~nan])
        # fp32 -> 16-bit rounding of all values between consecutive 16-bit numbers
        src = p.float()
        src = src[torch.isfinite(src)]
        mids = torch.cat([src, (src[:-1].double() + src[1:].double()).div(2).float(),
                          torch.nextafter(src, torch.full_like(src, float("inf")))])
        e = torch.zeros(mids.numel(), dtype=dt)
        _ema_cpu([e], [mids], 0.0)
        want = mids.to(dt)
        assert torch.equal(e, want)  # (-0.0 == 0.0: 0*0 + (-0)*1 is +0 in IEEE)


@needs_native
def test_cpu_bad_arguments():
    e = torch.zeros(4)
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="lengths"):
        C.ema_update_cpu([e.data_ptr()], [0, 0], [p.data_ptr()], [0], [4], 0.9)
    with pytest.raises(ValueError, match="lengths"):
        C.ema_update_cpu([e.data_ptr()], [0], [p.data_ptr()], [0], [], 0.9)
    with pytest.raises(ValueError, match="dtype"):
        C.ema_update_cpu([e.data_ptr()], [4], [p.data_ptr()], [0], [4], 0.9)
    with pytest.raises(ValueError, match="dtype"):
        C.ema_update_cpu([e.data_ptr()], [0], [p.data_ptr()], [-1], [4], 0.9)
    with pytest.raises(ValueError, match="numel"):
        C.ema_update_cpu([e.data_ptr()], [0], [p.data_ptr()], [0], [-4], 0.9)
    with pytest.raises(ValueError, match="null"):
        C.ema_update_cpu([0], [0], [p.data_ptr()], [0], [4], 0.9)
    assert torch.equal(e, torch.zeros(4))


@needs_native
def test_build_info_and_openmp():
    info = C.build_info()
    for key in ("compiler", "flags", "openmp", "cuda", "cuda_version"):
        assert key in info
    assert "-O3" in info["flags"]
    assert C.has_openmp() is True and info["openmp"] is True
    assert C.num_threads() >= 1
    assert C.has_cuda() == info["cuda"] == _native.has_cuda()
    assert hasattr(C, "ema_update_cuda") == C.has_cuda()
    if info["cuda"]:
        assert info["cuda_version"]


def test_native_loader_api():
    assert _native.DTYPE_CODES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
    if _native.load() is None:
        assert "pip install --no-build-isolation -e ." in _native.error()
        with pytest.raises(RuntimeError):
            _native.require()
    else:
        assert _native.error() is None
        assert _native.require() is _native.load()
    with pytest.raises(ValueError):
        _native.dtype_code(torch.int32)


@needs_native
@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not C.has_cuda():
        pytest.skip("vlfast._C built without CUDA")
    gen = torch.Generator().manual_seed(11)
    sizes = [1, 17, 1023, 100003, 65536 * 3 + 5] + [int(s) for s in torch.randint(0, 5000, (300,), generator=gen)]
    emas, params = [], []
    for i, n in enumerate(sizes):
        edt, pdt = PAIRS[i % len(PAIRS)]
        e, p = _make(n, edt, pdt, gen)
        emas.append(e), params.append(p)
    emas_gpu = [e.cuda() for e in emas]
    params_gpu = [p.cuda() for p in params]
    # misaligned views exercise the scalar path
    base = torch.randn(1001, device="cuda").to(torch.bfloat16)
    emas_gpu.append(base[1:])
    params_gpu.append(torch.randn(1000, device="cuda")[:1000])
    emas.append(emas_gpu[-1].cpu())
    params.append(params_gpu[-1].cpu())
    for decay in (0.9999, 0.5):
        _ema_cpu(emas, params, decay)
        C.ema_update_cuda(
            [e.data_ptr() for e in emas_gpu], [_native.DTYPE_CODES[e.dtype] for e in emas_gpu],
            [p.data_ptr() for p in params_gpu], [_native.DTYPE_CODES[p.dtype] for p in params_gpu],
            [e.numel() for e in emas_gpu], decay, torch.cuda.current_stream().cuda_stream,
        )
        torch.cuda.synchronize()
        for a, b in zip(emas, emas_gpu):
            assert torch.equal(a, b.cpu())


def test_cuda_sources_compile(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and (Path(home) / "bin" / "nvcc").is_file():
                nvcc = str(Path(home) / "bin" / "nvcc")
                break
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("CI must compile CUDA sources, but nvcc was not found")
        pytest.skip("nvcc not found; CUDA sources not compiled")
    sources = sorted(glob.glob(str(ROOT / "csrc" / "*.cu")))
    assert sources, "no csrc/*.cu sources found"
    for src in sources:
        out = tmp_path / (Path(src).stem + ".o")
        proc = subprocess.run(
            [nvcc, "-std=c++17", "-arch=sm_90", "-c", src, "-o", str(out)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr)
        assert proc.returncode == 0, f"nvcc failed on {src}:\n{proc.stderr}"
        assert out.exists()
