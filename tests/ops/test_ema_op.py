"""vlfast.ops.ema_update_ against a float64 reference, on every backend."""

import logging

import pytest
import torch

import vlfast
from vlfast import _backend
from vlfast.ops import ema_update_
from vlfast.reference import ema_update_reference_, moco_momentum_update_
from vlfast.testing import cases_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [(1,), (17,), (197, 3), (1023,), (8193,), (5, 7, 11)]  # 8193 crosses a kernel chunk
CASES = cases_for("ema_update_")


def _eps(dtype):
    return torch.finfo(dtype).eps


def _check(ema_out, e0, p0, decay):
    """ema_out must be the float64 result rounded to its dtype, within the compute precision."""
    ref = e0.double() * decay + p0.double() * (1.0 - decay)
    mag = (e0.double() * decay).abs() + (p0.double() * (1.0 - decay)).abs()
    compute_eps = _eps(torch.float64) * 1e3 if torch.float64 in (e0.dtype, p0.dtype) else _eps(torch.float32)
    # one rounding to the ema dtype (half an ulp, relative) + a few roundings in the compute dtype
    tol = _eps(ema_out.dtype) * ref.abs() * 0.5 + 4 * compute_eps * mag + 1e-300
    err = (ema_out.double() - ref).abs()
    assert torch.all(err <= tol), f"max err {err.max().item():.3g}, tol there {tol[err.argmax()].item():.3g}"


def _lists(dtype_e, dtype_p, device, sizes=SIZES):
    ema = [torch.randn(s, device=device).to(dtype_e) for s in sizes]
    params = [torch.randn(s, device=device).to(dtype_p) for s in sizes]
    return ema, params


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype_e", DTYPES, ids=str)
@pytest.mark.parametrize("dtype_p", DTYPES, ids=str)
def test_matches_float64_reference(device, backend, dtype_e, dtype_p):
    ema, params = _lists(dtype_e, dtype_p, device)
    e0 = [e.clone() for e in ema]
    ids = [id(e) for e in ema]
    ema_update_(ema, params, 0.9, backend=backend)
    assert [id(e) for e in ema] == ids
    for e, a, p in zip(ema, e0, params):
        assert e.dtype == dtype_e
        _check(e, a, p, 0.9)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("decay", [0.0, 1.0, 0.5, 0.9999, 0.123456789])
def test_decays_and_mixed_list(device, backend, decay):
    # one list mixing dtype pairs (several kernel groups) and sizes
    pairs = [(torch.float32, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
             (torch.float16, torch.float32), (torch.float32, torch.bfloat16)]
    ema, params = [], []
    for (de, dp), s in zip(pairs, [(1,), (33, 3), (1023,), (17,), (8192,)]):
        ema.append(torch.randn(s, device=device).to(de))
        params.append(torch.randn(s, device=device).to(dp))
    e0 = [e.clone() for e in ema]
    ema_update_(ema, params, decay, backend=backend)
    for e, a, p in zip(ema, e0, params):
        _check(e, a, p, decay)
        if decay == 1.0:
            assert torch.equal(e, a)
        if decay == 0.0:
            assert torch.equal(e, p.to(e.dtype))


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous(device, backend):
    base_e = torch.randn(37, 29, device=device)
    base_p = torch.randn(37, 29, device=device, dtype=torch.bfloat16)
    ema = [
        base_e.clone().t(),                                  # dense, same layout as its param
        torch.randn(40, 31, device=device)[1:38:2, 3:20],    # strided slice (staged)
        torch.randn(23, 6, device=device),                   # contiguous ema, transposed param
        torch.randn(8, 5, 3, device=device).permute(2, 0, 1),  # dense permuted ema, contiguous param
    ]
    params = [
        base_p.clone().t(),
        torch.randn(19, 17, device=device),
        torch.randn(6, 23, device=device, dtype=torch.float16).t(),
        torch.randn(3, 8, 5, device=device),
    ]
    e0 = [e.clone() for e in ema]
    ptrs = [e.data_ptr() for e in ema]
    ema_update_(ema, params, 0.75, backend=backend)
    assert [e.data_ptr() for e in ema] == ptrs
    for e, a, p in zip(ema, e0, params):
        _check(e, a, p, 0.75)


@pytest.mark.parametrize("device,backend", CASES)
def test_version_counter_and_grad_mode(device, backend):
    ema, params = _lists(torch.float32, torch.bfloat16, device, [(5,), (17,)])
    params = [p.requires_grad_() for p in params]
    versions = [e._version for e in ema]
    ema_update_(ema, params, 0.5, backend=backend)  # grad mode on, params require grad
    assert all(e._version > v for e, v in zip(ema, versions))
    assert not any(e.requires_grad for e in ema) and all(e.grad_fn is None for e in ema)

    # a saved tensor modified in place is caught by autograd, as with any in-place op
    w = torch.randn(5, device=device, requires_grad=True)
    x = torch.randn(5, device=device)
    y = (w * x).sum()  # saves x
    ema_update_([x], [torch.randn(5, device=device)], 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_ema_requiring_grad():
    e = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"ema\[0\] requires grad"):
        ema_update_([e], [torch.randn(4)], 0.5)
    with torch.no_grad():
        ema_update_([e], [torch.zeros(4)], 0.5)


def test_fp32_average_keeps_small_bf16_updates():
    """The motivating bug: a bf16 average rounds 1e-4-sized updates to zero."""
    p = torch.full((64,), 1.5, dtype=torch.bfloat16)
    ema32 = [torch.ones(64)]
    ema16 = [torch.ones(64, dtype=torch.bfloat16)]
    for _ in range(10):
        ema_update_(ema32, [p], 0.9999)
        ema_update_(ema16, [p], 0.9999)
    assert torch.all(ema16[0] == 1.0)  # lost in bf16 storage, whatever the backend
    expected = 1.5 - 0.5 * 0.9999 ** 10
    torch.testing.assert_close(ema32[0], torch.full((64,), expected), rtol=1e-6, atol=0)


def test_matches_moco_loop():
    q = [torch.randn(s) for s in [(3, 4), (7,), (1,)]]
    k1 = [torch.randn_like(t) for t in q]
    k2 = [t.clone() for t in k1]
    moco_momentum_update_(k1, q, 0.99)
    ema_update_(k2, q, 0.99)
    for a, b in zip(k1, k2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reference_is_float64_exact():
    e = [torch.randn(7, dtype=torch.float64)]
    p = [torch.randn(7, dtype=torch.float64)]
    want = e[0] * 0.3 + p[0] * 0.7
    ema_update_reference_(e, p, 0.3)
    assert torch.equal(e[0], want)


def test_empty_and_generators():
    ema_update_([], [], 0.5)
    e = torch.randn(3)
    before = e.clone()
    ema_update_((t for t in [e]), (t for t in [torch.zeros(3)]), 0.5)
    torch.testing.assert_close(e, before * 0.5)
    z = torch.randn(0)
    ema_update_([z], [torch.randn(0)], 0.5)


@pytest.mark.parametrize("ema,params,decay,exc,match", [
    (lambda: [torch.zeros(3)], lambda: [], 0.5, ValueError, "same length"),
    (lambda: [torch.zeros(3), torch.zeros(2)], lambda: [torch.zeros(3), torch.zeros(3)], 0.5, ValueError,
     r"ema\[1\] has shape \(2,\) but params\[1\] has shape \(3,\)"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3, device="meta")], 0.5, ValueError, r"params\[0\] is on meta"),
    (lambda: [torch.zeros(3, dtype=torch.int64)], lambda: [torch.zeros(3)], 0.5, TypeError,
     r"ema\[0\] must be a floating tensor"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3, dtype=torch.complex64)], 0.5, TypeError, r"params\[0\]"),
    (lambda: torch.zeros(3), lambda: [torch.zeros(3)], 0.5, TypeError, "wrap it in a list"),
    (lambda: [1.0], lambda: [torch.zeros(3)], 0.5, TypeError, r"ema\[0\] must be a torch.Tensor"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3)], 1.5, ValueError, r"decay must be in \[0, 1\]"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3)], -0.1, ValueError, r"decay must be in \[0, 1\]"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3)], float("nan"), ValueError, "decay"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3)], True, TypeError, "decay must be a real number"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3)], "0.9", TypeError, "decay must be a real number"),
    (lambda: [torch.zeros(3)], lambda: [torch.zeros(3)], torch.tensor([0.5, 0.5]), ValueError, "one-element"),
])
def test_bad_input(ema, params, decay, exc, match):
    with pytest.raises(exc, match=match):
        ema_update_(ema(), params(), decay)


def test_decay_tensor_accepted():
    e = [torch.ones(3)]
    ema_update_(e, [torch.zeros(3)], torch.tensor(0.25))
    torch.testing.assert_close(e[0], torch.full((3,), 0.25))


# ------------------------------------------------------------------ dispatch rules
def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton'.*TRITON_INTERPRET=1"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5, backend="triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend= must be one of"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5, backend="cuda")


def test_env_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("VLFAST_BACKEND", "torch")
    assert _backend.select("ema_update_", cpu) == "torch"
    monkeypatch.setenv("VLFAST_BACKEND", "attention=triton,ema_update_=torch")
    assert _backend.select("ema_update_", cpu) == "torch"
    assert _backend.select("ema_update_", cpu, "auto") != "triton"  # auto never picks the CPU interpreter
    monkeypatch.setenv("VLFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VLFAST_BACKEND must be one of"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5)
    # the argument wins over the environment
    assert _backend.select("ema_update_", cpu, "torch") == "torch"


def test_auto_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.setitem(_backend._CHECKS, "native", lambda device: "pretend the extension is missing")
    monkeypatch.setattr(_backend, "_logged", set())
    monkeypatch.setattr(_backend, "_cache", {})  # a fresh selection cache, dropped after the test
    monkeypatch.delenv("VLFAST_BACKEND", raising=False)
    with caplog.at_level(logging.WARNING, logger="vlfast"):
        for _ in range(3):
            assert _backend.select("ema_update_", torch.device("cpu")) == "torch"
    msgs = [r.getMessage() for r in caplog.records if "pretend the extension is missing" in r.getMessage()]
    assert len(msgs) == 1 and "'torch'" in msgs[0]


def test_selection_is_cached_per_environment(monkeypatch):
    cpu = torch.device("cpu")
    calls = []
    real = _backend._CHECKS["native"]
    monkeypatch.setitem(_backend._CHECKS, "native", lambda device: calls.append(device) or real(device))
    monkeypatch.setattr(_backend, "_cache", {})
    monkeypatch.delenv("VLFAST_BACKEND", raising=False)
    for _ in range(5):
        assert _backend.select("ema_update_", cpu) == "native"
    assert len(calls) == 1  # checked once, then a dictionary lookup
    monkeypatch.setenv("VLFAST_BACKEND", "ema_update_=torch")  # a new environment is a new key
    assert _backend.select("ema_update_", cpu) == "torch"
    monkeypatch.delenv("VLFAST_BACKEND")
    assert _backend.select("ema_update_", cpu) == "native" and len(calls) == 1


def test_registry_rejects_duplicates_and_unknown_backends():
    op = _backend.get_op("ema_update_")
    with pytest.raises(ValueError, match="registered twice"):
        op.implement("torch")(lambda *a: None)
    with pytest.raises(ValueError, match="unknown backend"):
        op.implement("cuda")
    with pytest.raises(ValueError, match="registered twice"):
        _backend.register_op("ema_update_", {"cpu": ("torch",)})
    with pytest.raises(KeyError, match="registered: .*attention"):
        _backend.get_op("no_such_op")


def test_auto_picks_native_on_cpu(monkeypatch):
    monkeypatch.delenv("VLFAST_BACKEND", raising=False)
    assert _backend.select("ema_update_", torch.device("cpu")) == "native"


def test_available_backends_report():
    rows = {op: (chosen, avail) for op, chosen, avail in vlfast.backend_report("cpu")}
    chosen, avail = rows["ema_update_"]
    assert set(avail) == {"triton", "native", "torch"} and avail["torch"] is None


# ------------------------------------------------------------------ torch.library / compile
def test_registered_custom_op_and_compile():
    assert hasattr(torch.ops.vlfast, "ema_update_")

    def step(ema, params):
        ema_update_(ema, params, 0.75, backend="torch")
        return ema[0] * 2

    ema = [torch.randn(5), torch.randn(3)]
    params = [torch.randn(5), torch.randn(3)]
    e0 = [e.clone() for e in ema]
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(ema, params)
    for e, a, p in zip(ema, e0, params):
        torch.testing.assert_close(e, a * 0.75 + p * 0.25)
    torch.testing.assert_close(out, ema[0] * 2)


def test_opcheck():
    ema = [torch.randn(5), torch.randn(3, dtype=torch.float64)]
    params = [torch.randn(5, dtype=torch.bfloat16), torch.randn(3)]
    torch.library.opcheck(torch.ops.vlfast.ema_update_.default, (ema, params, 0.5, "native"),
                          test_utils=("test_schema", "test_faketensor"))


def test_registered_op_bumps_version_counter():
    e = torch.randn(9)
    v = e._version
    torch.ops.vlfast.ema_update_([e], [torch.randn(9)], 0.5, "torch")
    assert e._version > v


@pytest.mark.parametrize("device,backend", CASES)
def test_unaligned_views_and_cached_metadata(device, backend):
    """Views starting off a 16-byte boundary; a second call reuses the cached chunk tables."""
    e_store = torch.randn(9000, device=device)
    p_store = torch.randn(9000, device=device, dtype=torch.bfloat16)
    original = e_store.clone()
    ema = [e_store[1:8194], e_store[8195:8200]]
    params = [p_store[3:8196], p_store[8197:8202]]
    for decay in (0.3, 0.9):
        e0 = [e.clone() for e in ema]
        ema_update_(ema, params, decay, backend=backend)
        for e, a, p in zip(ema, e0, params):
            _check(e, a, p, decay)
    outside = torch.ones(9000, dtype=torch.bool, device=device)
    outside[1:8194] = False
    outside[8195:8200] = False
    assert torch.equal(e_store[outside], original[outside])  # neighbours of the views untouched


@pytest.mark.parametrize("device,backend", CASES)
def test_same_addresses_new_dtypes(device, backend):
    """Cached kernel metadata must not be reused when the same memory holds other dtypes."""
    store_e = torch.zeros(4096, device=device)
    store_p = torch.zeros(4096, device=device)
    e32, p32 = [store_e[:1024], store_e[2048:3072]], [store_p[:1024], store_p[2048:3072]]
    ema_update_(e32, [p.normal_() for p in p32], 0.5, backend=backend)
    bf_e = store_e.view(torch.bfloat16)  # same byte addresses, half the element size
    bf_p = store_p.view(torch.bfloat16)
    e16 = [bf_e[:1024].normal_(), bf_e[4096:5120].normal_()]
    p16 = [bf_p[:1024].normal_(), bf_p[4096:5120].normal_()]
    e0 = [e.clone() for e in e16]
    ema_update_(e16, p16, 0.5, backend=backend)
    for e, a, p in zip(e16, e0, p16):
        _check(e, a, p, 0.5)


def test_inference_tensors():
    with torch.inference_mode():
        e = torch.randn(4)
    with pytest.raises(RuntimeError, match=r"ema\[0\] is an inference tensor"):
        ema_update_([e], [torch.randn(4)], 0.5)
    with torch.inference_mode():
        ema_update_([e], [torch.zeros(4)], 0.5)


def test_interpreter_refuses_cuda_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in _backend.triton_unavailable(torch.device("cuda"))
