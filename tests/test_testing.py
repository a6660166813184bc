"""vlfast.testing: the test helpers must be able to fail (and must pass what they should)."""

import socket
import sys

import pytest
import torch

import vlfast.comm
import vlfast.ops  # noqa: F401  (registers every op with vlfast._backend)
import vlfast.testing as T
from vlfast.testing import (EAGER_ERROR_FLOOR, FORWARD_TOLERANCE, GRAD_FACTOR, GRAD_TOLERANCE, assert_close,
                            assert_within_eager_error, cases_for, fake_zero3_param, max_abs_error, tolerance)


def test_importable_without_pytest(monkeypatch):
    """A fresh copy of the module executes with ``import pytest`` failing (cases_for imports it when called)."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "pytest", None)  # makes `import pytest` raise ImportError
    spec = importlib.util.spec_from_file_location("vlfast._testing_probe", T.__file__)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.DEVICES == T.DEVICES
    with pytest.raises(ImportError):
        probe.cases_for("attention")


def test_devices():
    assert T.DEVICES[0] == "cpu"
    assert ("cuda" in T.DEVICES) == torch.cuda.is_available()


# ---------------------------------------------------------------- tolerance table, assert_close
def test_tolerance_table():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        fwd, grad = tolerance(dtype), tolerance(dtype, grad=True)
        assert fwd == FORWARD_TOLERANCE[dtype] and grad == GRAD_TOLERANCE[dtype]
        assert grad.atol >= fwd.atol and grad.rtol >= fwd.rtol
    # coarser dtypes get looser tolerances
    order = [tolerance(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    assert all(a.rtol < b.rtol for a, b in zip(order, order[1:]))
    assert tolerance(torch.int64) == (0.0, 0.0) and tolerance(torch.bool, grad=True) == (0.0, 0.0)
    assert tolerance(torch.complex64) == FORWARD_TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="float8"):
        tolerance(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="dtype"):
        tolerance("float32")
    with pytest.raises(TypeError, match="grad"):
        tolerance(torch.float32, grad=1)


def test_assert_close_upcasts_and_uses_the_dtype_tolerance():
    ref = torch.randn(64, dtype=torch.float64)
    assert_close(ref.bfloat16(), ref)  # bf16 rounding is within bf16's tolerance ...
    with pytest.raises(AssertionError):
        assert_close(ref.bfloat16().float(), ref)  # ... not within float32's
    assert_close(ref.bfloat16().float(), ref, dtype=torch.bfloat16)  # unless told the precision
    assert_close(ref.float(), ref)


def test_assert_close_fails_on_planted_errors():
    ref = torch.randn(5, 7, dtype=torch.float64)
    bad = ref.float().clone()
    bad[2, 3] += 1e-3  # 50x float32's tolerance
    with pytest.raises(AssertionError, match=r"(?s)dq: .*Greatest absolute difference"):
        assert_close(bad, ref, msg="dq")
    assert_close(bad, ref, atol=2e-3)  # override
    small = ref.float() + 5e-5  # 2.5x the forward atol, within the gradient's
    with pytest.raises(AssertionError):
        assert_close(small, ref)
    assert_close(small, ref, grad=True)
    with pytest.raises(AssertionError, match="[Ss]hape"):
        assert_close(ref.float()[:4], ref)
    nan = ref.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_close(nan, ref)
    assert_close(nan, nan, equal_nan=True)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))  # integers are exact
    assert_close(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 2, 3]))


def test_assert_close_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(TypeError, match="actual"):
        assert_close([0.0, 0.0, 0.0], x)
    with pytest.raises(TypeError, match="expected"):
        assert_close(x, 0.0)
    with pytest.raises(ValueError, match="atol"):
        assert_close(x, x, atol=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        assert_close(x, x, rtol=float("nan"))
    with pytest.raises(TypeError, match="msg"):
        assert_close(x, x, msg=3)


# ---------------------------------------------------------------- the 2x / 3x eager rule
def _eager_and_ref(n=256, dtype=torch.bfloat16):
    ref = torch.randn(n, dtype=torch.float64)
    return ref.to(dtype), ref  # eager: the reference rounded to the low precision


def test_within_eager_error_passes_equal_errors():
    eager, ref = _eager_and_ref()
    err_f, err_e, bound = assert_within_eager_error(eager.clone(), eager, ref)
    assert err_f == err_e > 0 and bound >= 2 * err_e


def test_within_eager_error_fails_on_a_planted_10x_error():
    eager, ref = _eager_and_ref()
    err_e = max_abs_error(eager, ref)
    fused = eager.double().clone()
    i = int((eager.double() - ref).abs().argmax())
    fused[i] = ref[i] + 10 * err_e * torch.sign(eager.double()[i] - ref[i])
    with pytest.raises(AssertionError, match=r"out: fused error .* > 2 x eager error"):
        assert_within_eager_error(fused, eager, ref, what="out", dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_within_eager_error(fused, eager, ref, GRAD_FACTOR, dtype=torch.bfloat16)  # 3x: still fails
    assert_within_eager_error(fused, eager, ref, 11.0, dtype=torch.bfloat16)


def test_within_eager_error_factor_boundary():
    eager, ref = _eager_and_ref(dtype=torch.float16)
    err_e = max_abs_error(eager, ref)
    i = int((eager.double() - ref).abs().argmax())
    for k, ok in ((2.5, True), (3.5, False)):  # factor 3: 2.5x eager's error passes, 3.5x does not
        fused = ref.clone()
        fused[i] += k * err_e
        if ok:
            assert_within_eager_error(fused, eager, ref, 3.0, atol=0.0)
        else:
            with pytest.raises(AssertionError):
                assert_within_eager_error(fused, eager, ref, 3.0, atol=0.0)


def test_within_eager_error_floor_when_eager_is_exact():
    ref = torch.zeros(8, dtype=torch.float64)  # e.g. a gradient that is exactly 0
    eager = ref.bfloat16()
    fused = ref.clone()
    fused[3] = 1e-4  # one reordered-sum rounding: below the floor 1e-3 * max(|ref|, 1)
    assert_within_eager_error(fused, eager, ref, dtype=torch.bfloat16)  # fused is float64 here: name the precision
    assert_within_eager_error(fused.bfloat16(), eager, ref)
    fused[3] = 5e-2  # a real error: above the floor
    with pytest.raises(AssertionError, match="floor"):
        assert_within_eager_error(fused.bfloat16(), eager, ref)
    # the floor scales with the reference
    big = torch.full((8,), 1000.0, dtype=torch.float64)
    assert_within_eager_error(big + 0.5, big.bfloat16(), big, dtype=torch.bfloat16)
    assert EAGER_ERROR_FLOOR[torch.bfloat16] * 1000 > 0.5
    with pytest.raises(AssertionError):
        assert_within_eager_error(big + 0.5, big.bfloat16(), big, dtype=torch.bfloat16, atol=0.1)


def test_within_eager_error_non_finite_and_shapes():
    eager, ref = _eager_and_ref(8)
    nan = eager.clone()
    nan[1] = float("nan")
    with pytest.raises(AssertionError, match="fused result is not finite"):
        assert_within_eager_error(nan, eager, ref)
    with pytest.raises(AssertionError, match="eager result is not finite"):
        assert_within_eager_error(eager, nan, ref)
    with pytest.raises(AssertionError, match="shape"):
        assert_within_eager_error(eager[:4], eager, ref)
    # matching infinities (the lse of a fully masked row) are no error
    lse = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    assert_within_eager_error(lse.bfloat16(), lse.bfloat16(), lse)
    assert max_abs_error(torch.empty(0), torch.empty(0, dtype=torch.float64)) == 0.0


def test_within_eager_error_bad_arguments():
    eager, ref = _eager_and_ref(4)
    with pytest.raises(TypeError, match="fused"):
        assert_within_eager_error(eager.tolist(), eager, ref)
    with pytest.raises(ValueError, match="factor"):
        assert_within_eager_error(eager, eager, ref, 0.0)
    with pytest.raises(TypeError, match="factor"):
        assert_within_eager_error(eager, eager, ref, "2")
    with pytest.raises(ValueError, match="atol"):
        assert_within_eager_error(eager, eager, ref, atol=-1e-3)
    with pytest.raises(ValueError, match="floor"):
        assert_within_eager_error(eager.to(torch.int32), eager, ref)


# ---------------------------------------------------------------- cases_for, fake_zero3_param, free_port
def test_cases_for_lists_every_backend_and_explains_skips():
    import vlfast._backend as B

    for op in ("attention", "ema_update_", "random_masking"):
        info = B.get_op(op)
        cases = cases_for(op)
        assert [c.id for c in cases] == [f"{d}-{b}" for d in T.DEVICES for b in info.backends]
        for c in cases:
            device, backend = c.values
            reason = info.unavailable(backend, torch.device(device))
            if reason is None:
                assert not c.marks
            else:
                (mark,) = c.marks
                assert mark.name == "skip" and mark.kwargs["reason"] == reason
    assert any(c.marks for c in cases_for("attention"))  # xformers on CPU: explained, not dropped
    assert [c.id for c in cases_for("ema_update_", devices=["cpu"])] == [f"cpu-{b}" for b in
                                                                         B.get_op("ema_update_").backends]
    with pytest.raises(TypeError, match="op"):
        cases_for(3)


def test_fake_zero3_param_shards():
    full = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    shards = [fake_zero3_param(full, r, 3, torch.bfloat16) for r in range(3)]
    for p in shards:
        assert isinstance(p, torch.nn.Parameter) and p.numel() == 0 and not p.requires_grad
        assert p.ds_numel == 10 and p.ds_shape == (2, 5) and p.ds_persist is False
        assert p.ds_status.name == "NOT_AVAILABLE" and p.ds_tensor.dtype == torch.bfloat16
        assert p.ds_tensor.numel() == 4
    flat = torch.cat([p.ds_tensor for p in shards]).float()
    assert torch.equal(flat[:10], full.reshape(-1)) and torch.equal(flat[10:], torch.zeros(2))  # zero padding
    with pytest.raises(ValueError, match="rank"):
        fake_zero3_param(full, 3, 3, torch.float32)
    with pytest.raises(ValueError, match="world"):
        fake_zero3_param(full, 0, 0, torch.float32)
    with pytest.raises(TypeError, match="full"):
        fake_zero3_param(full.tolist(), 0, 1, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        fake_zero3_param(full, 0, 1, "bf16")


def test_free_port_is_the_comm_one_and_bindable():
    assert T.free_port is vlfast.comm.free_port
    port = T.free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_markers_registered(pytestconfig):
    lines = pytestconfig.getini("markers")
    for name in ("slow", "distributed", "gpu"):
        assert any(line.startswith(f"{name}:") for line in lines), name


def _pytest_in(pytester, test_source):
    """Run pytest (in this process) on one test file next to a copy of tests/conftest.py."""
    from pathlib import Path

    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_it=test_source)
    return pytester.runpytest_inprocess("-q", "-rs", "-p", "no:cacheprovider")


def test_unregistered_marker_is_an_error(pytester):
    r = _pytest_in(pytester, "import pytest\n\n@pytest.mark.slwo\ndef test_a():\n    pass\n")
    out = str(r.stdout) + str(r.stderr)
    assert r.ret != 0 and "unregistered pytest markers: slwo" in out, out


def test_gpu_marker_skips_without_cuda(pytester):
    r = _pytest_in(pytester, "import pytest\n\n@pytest.mark.gpu\ndef test_cuda():\n    import torch\n"
                             "    assert torch.cuda.is_available()\n\n"
                             "@pytest.mark.slow\n@pytest.mark.distributed\ndef test_other():\n    pass\n")
    if torch.cuda.is_available():
        r.assert_outcomes(passed=2)
    else:
        r.assert_outcomes(passed=1, skipped=1)
        assert "needs CUDA (marker gpu)" in str(r.stdout)
