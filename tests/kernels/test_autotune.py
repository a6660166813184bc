"""The opt-in autotune (VLFAST_AUTOTUNE=1, vlfast.kernels._common.autotune): off by default, a
pruned candidate set around the tile table's row, one tuning per key, results unchanged.

Kernels run in the Triton CPU interpreter (conftest sets TRITON_INTERPRET=1), where the timings
are wall-clock runs: what is tested is the mechanism, not which tile wins.
"""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from vlfast.kernels import _common
from vlfast.kernels import attention as A
from vlfast.kernels import contrastive as C


@pytest.fixture(autouse=True)
def _fresh():
    _common.clear_tuned()
    yield
    _common.clear_tuned()


def _count_timings(monkeypatch):
    calls = []
    real = _common._time_once

    def timed(run, device):
        calls.append(1)
        return real(run, device)

    monkeypatch.setattr(_common, "_time_once", timed)
    return calls


def _contrastive(q, k, sq, sk):
    lse, sdot, slse = C.contrastive_loss_lse_forward(q, k, 0.8, sq, sk, 2.0)
    g = torch.linspace(-1, 1, q.shape[0])
    return (lse, sdot, slse) + C.contrastive_loss_lse_backward(q, k, 0.8, lse, g, sq, sk, 2.0, slse, g)


def test_off_by_default_times_nothing(monkeypatch):
    monkeypatch.delenv("VLFAST_AUTOTUNE", raising=False)
    calls = _count_timings(monkeypatch)
    q, k = torch.randn(20, 24), torch.randn(33, 24)
    C.contrastive_loss_lse_forward(q, k, 0.5)
    C.siglip_rows_forward(q, k, 1.0, -2.0)
    monkeypatch.setenv("VLFAST_AUTOTUNE", "0")
    C.contrastive_loss_lse_forward(q, k, 0.5)
    assert calls == [] and _common.tuned_tiles() == {}


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("VLFAST_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="VLFAST_AUTOTUNE"):
        C.contrastive_loss_lse_forward(torch.randn(3, 8), torch.randn(3, 8), 1.0)


def test_tunes_once_per_key_and_keeps_results(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(37, 40), torch.randn(45, 40)
    sq, sk = torch.randn(37, 16), torch.randn(45, 16)
    plain = _contrastive(q, k, sq, sk)
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    calls = _count_timings(monkeypatch)
    tuned = _contrastive(q, k, sq, sk)
    first = len(calls)
    choices = _common.tuned_tiles()
    kinds = sorted(k[1] for k in choices)
    assert kinds == ["bwd", "fwd"]
    for entry in choices.values():
        assert len(entry["timings"]) > 1 and entry["tiles"] in [c for c, _ in entry["timings"]]
        assert all(ms is not None and ms > 0 for _, ms in entry["timings"])
    assert first == sum(len(e["timings"]) for e in choices.values())
    again = _contrastive(q, k, sq, sk)                 # cached: no timing
    assert len(calls) == first
    for a, b, c in zip(plain, tuned, again):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5) and torch.equal(b, c)   # fp32 reordering: ~4e-6 of float64
    # another shape bucket tunes again
    _contrastive(q[:5], k, sq[:5], sk)
    assert len(calls) > first


def test_override_tiles_wins(monkeypatch):
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    calls = _count_timings(monkeypatch)
    with _common.override_tiles("contrastive", fwd=dict(BLOCK_M=16)):
        C.contrastive_loss_lse_forward(torch.randn(9, 8), torch.randn(9, 8), 1.0)
    assert calls == []


def test_candidates_are_pruned_and_valid():
    base = A.TILES.lookup("fwd", torch.bfloat16, gpu=True, BLOCK_D=64)
    cands = _common.tune_candidates(A.TILES, "fwd", base, torch.bfloat16, limits=dict(BLOCK_N=64),
                                    prune=lambda c: c["BLOCK_M"] >= 64)
    assert cands[0] == base and len(cands) == len({tuple(sorted(c.items())) for c in cands}) > 3
    for c in cands:
        assert set(c) == set(base)
        assert c["BLOCK_M"] >= 64 and 16 <= c["BLOCK_N"] <= 64
        assert all(v & (v - 1) == 0 for col, v in c.items() if col.startswith("BLOCK"))
        assert c["num_warps"] in (4, 8) and 1 <= c["num_stages"] <= 4
    # one-step neighbours of the base are there; a column the kind does not use stays None
    assert {**base, "num_warps": 4 if base["num_warps"] == 8 else 8} in cands
    pre = A.TILES.lookup("bwd_preprocess", torch.bfloat16, gpu=True)
    assert all(c["BLOCK_N"] is None for c in _common.tune_candidates(A.TILES, "bwd_preprocess", pre))


def test_out_of_resources_is_skipped_and_recorded():
    base = C.TILES.lookup("fwd", torch.float32, gpu=True)
    cands = _common.tune_candidates(C.TILES, "fwd", base, torch.float32)
    too_big = cands[1]
    seen = []

    def run(tiles):
        seen.append(tiles)
        if tiles == too_big:
            raise OutOfResources(300000, 232448, "shared memory")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLFAST_AUTOTUNE", "1")
        got = _common.autotune(C.TILES, "fwd", torch.float32, ("k",), base, run, torch.device("cpu"))
        assert got != too_big and seen == cands
        (entry,) = _common.tuned_tiles().values()
        assert [ms for c, ms in entry["timings"] if c == too_big] == [None]

        def base_fails(tiles):
            raise OutOfResources(1, 0, "registers")

        with pytest.raises(OutOfResources):
            _common.autotune(C.TILES, "fwd", torch.float32, ("other",), base, base_fails, torch.device("cpu"))


def _attention(q, k, v, do, bias):
    out, lse = A.attention_forward(q, k, v, bias=bias, scale=0.3)
    # a bias broadcast over the batch: its gradient is accumulated with atomics (DBIAS == 2), which a
    # tuning run must not add to the result
    return (out, lse) + A.attention_backward(do, q, k, v, out, lse, bias=bias, scale=0.3,
                                             bias_grad_shape=(1,) + tuple(bias.shape[1:]))


def test_attention_tunes_each_kernel_once_with_the_same_results(monkeypatch):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(2, 2, 19, 24) for _ in range(4))
    bias = torch.randn(1, 2, 19, 19).expand(2, 2, 19, 19)
    plain = _attention(q, k, v, do, bias)
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    calls = _count_timings(monkeypatch)
    tuned = _attention(q, k, v, do, bias)
    choices = _common.tuned_tiles()
    assert sorted(key[1] for key in choices) == ["bwd_kv", "bwd_q", "fwd"]
    assert all(key[0] == "attention" for key in choices)
    for entry in choices.values():
        assert len(entry["timings"]) > 1 and entry["tiles"] in [c for c, _ in entry["timings"]]
    first = len(calls)
    assert first == sum(len(e["timings"]) for e in choices.values())
    again = _attention(q, k, v, do, bias)               # cached: no timing, bit-identical
    assert len(calls) == first
    for a, b, c in zip(plain, tuned, again):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5) and torch.equal(b, c)
    # the variant flags are part of the key: causal tunes its own kernels
    A.attention_forward(q, k, v, causal=True, scale=0.3)
    assert len(calls) > first and len(_common.tuned_tiles()) == 4


def test_attention_tensor_core_candidates_keep_wgmma_rows(monkeypatch):
    # off the interpreter, bf16 (and TF32) candidates keep >= 64 rows on each kernel's MMA M side
    monkeypatch.setattr(A, "interpret", lambda: False)
    seen = {}

    def fake_autotune(table, kind, dtype, key, base, run, device, prune=None):
        seen[kind] = [c for c in _common.tune_candidates(table, kind, base, dtype) if prune is None or prune(c)]
        return dict(base)

    monkeypatch.setattr(A, "autotune", fake_autotune)
    for kind, side in A._WGMMA_SIDE.items():
        A._tuned(kind, 64, torch.bfloat16, ("k",), lambda *t: None, torch.device("cpu"))
        assert seen[kind] and all(c[side] >= 64 for c in seen[kind]), (kind, seen[kind])
        A._tuned(kind, 64, torch.float32, ("k",), lambda *t: None, torch.device("cpu"))   # IEEE fp32: no rule
        assert any(c[side] < 64 for c in seen[kind]), kind
