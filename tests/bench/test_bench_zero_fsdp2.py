"""The FSDP2 EMA-update cases of ``vlfast.bench.zero`` (``EMA update FSDP2 fp32`` / ``bf16``): the cases, their
providers and goal, and the 2-rank worker (``python -m vlfast.bench.zero --worker --engine fsdp2``) whose
result line parses.

No timing assertions: the benchmark's goals are checked (and printed) by ``vlfast bench``.
"""

import math

import pytest
import torch

from vlfast.bench import zero
from vlfast.bench.harness import Measured, SelfTimed

PROVIDERS = {"gather-then-update", "shard-local"}


def _fsdp2_cases(device, quick):
    return [c for c in zero.cases(device, quick) if c.name.startswith("EMA update FSDP2")]


@pytest.mark.parametrize("quick", [True, False])
def test_cases_are_lazy_with_their_goal(quick):
    # building the cases starts no process (SelfTimed providers); the goal only outside --quick, on 2+ ranks
    cases = _fsdp2_cases(torch.device("cpu"), quick)
    model, precisions, _, _ = zero.MOMENTUM_CONFIG["quick" if quick else "cpu"]
    assert [c.name for c in cases] == [f"EMA update FSDP2 {p}" for p in precisions]
    for c in cases:
        assert c.op == "zero" and c.shape == f"{model}, {zero.RANKS_CPU} ranks"
        assert set(c.providers) == PROVIDERS and all(isinstance(f, SelfTimed) for f in c.providers.values())
        assert c.baselines == ["gather-then-update"] and c.candidates == ["shard-local"]
        if quick:
            assert c.targets == []
        else:
            (t,) = c.targets
            assert (t.candidate, t.baseline, t.metric, t.minimum) == (
                "shard-local", "gather-then-update", "speedup", zero.EMA_FSDP2_GOAL)
    # the ZeRO-3 cases are still there, with their own baseline and goal
    zero3 = [c for c in zero.cases(torch.device("cpu"), False) if c.name.startswith("momentum update ZeRO-3")]
    assert zero3 and all(c.baselines == ["gathered"] and c.targets[0].minimum == zero.MOMENTUM_GOAL for c in zero3)


def test_one_gpu_reports_unavailable(monkeypatch):
    # one NCCL rank per GPU: with a single GPU the case is reported unavailable, its goal NOT MEASURED
    monkeypatch.setattr(zero, "_world_size", lambda device: 1)
    cases = list(zero._update_cases(torch.device("cuda"), False, "fsdp2"))
    assert cases and all(c.providers == {} and set(c.unavailable) == PROVIDERS for c in cases)
    assert all("2 or more CUDA devices" in r for c in cases for r in c.unavailable.values())
    assert all(c.targets[0].minimum == zero.EMA_FSDP2_GOAL for c in cases)


def test_providers_read_one_shared_run(monkeypatch):
    # the providers of every precision read one worker run: the medians of the keys they are named for
    calls = []

    def fake_measure(device, model, precisions, warmup, reps, world=None, timeout=zero.TIMEOUT_S, engine="zero3"):
        calls.append(engine)
        return {"results": [dict(precision=p, local_ms=[1.0, 2.0], gathered_ms=[5.0, 7.0, 9.0], local_median_ms=1.5,
                                 gathered_median_ms=7.0) for p in precisions]}

    monkeypatch.setattr(zero, "measure_momentum_update", fake_measure)
    cases = _fsdp2_cases(torch.device("cpu"), False)
    got = {(c.name, p): f.measure() for c in cases for p, f in c.providers.items()}
    assert calls == ["fsdp2"]
    for (_, p), m in got.items():
        assert isinstance(m, Measured)
        assert (m.ms, m.runs) == ((1.5, 2) if p == "shard-local" else (7.0, 3))


def test_bad_engine():
    with pytest.raises(ValueError, match="engine must be one of"):
        zero.measure_momentum_update(torch.device("cpu"), "moco_v3_micro", ("fp32",), 1, 1, world=2, engine="fsdp")


@pytest.mark.distributed
def test_fsdp2_ema_worker_two_ranks():
    reps = 2
    res = zero.measure_momentum_update(torch.device("cpu"), "moco_v3_micro", ("fp32", "bf16"), warmup=1, reps=reps,
                                       world=2, timeout=300, engine="fsdp2")
    assert res["engine"] == "fsdp2" and res["world"] == 2 and res["model"] == "moco_v3_micro"
    assert res["warmup"] == 1 and res["reps"] == reps
    assert [(r["precision"], r["dtype"]) for r in res["results"]] == [("fp32", "float32"), ("bf16", "bfloat16")]
    for r in res["results"]:
        # rank 0 holds the larger half of every sharded tensor, and the replicated ones in full
        assert r["max_rss_mb"] > 0 and r["tensors"] > 0 and r["numel"] / 2 <= r["shard_numel"] < r["numel"]
        for key in ("local", "gathered"):
            assert len(r[f"{key}_ms"]) == reps
            assert all(t > 0 and math.isfinite(t) for t in r[f"{key}_ms"])
            assert min(r[f"{key}_ms"]) <= r[f"{key}_median_ms"] <= max(r[f"{key}_ms"])
