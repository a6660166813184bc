"""The ZeRO benchmark module (``vlfast.bench.zero``): result parsing and the 2-rank momentum worker.

No timing assertions: the benchmark's goals are checked (and printed) by ``vlfast bench``.
The worker test starts 2 CPU ranks (gloo); the first DeepSpeed start on a machine JIT-builds
its shm comm op (about a minute, cached afterwards).
"""

import json
import math
import os
import uuid

import deepspeed  # noqa: F401  (installed by the Makefile: a missing one fails, never skips)
import pytest
import torch

from vlfast.bench import zero
from vlfast.bench.harness import SelfTimed
from vlfast.distributed.zero import remove_cpu_shm_segments


def test_parse_result():
    out = "some deepspeed log line\n" + zero.RESULT_TAG + json.dumps({"world": 2, "results": []}) + "\nbye\n"
    assert zero.parse_result(out) == {"world": 2, "results": []}
    with pytest.raises(ValueError, match="VLFAST_BENCH_ZERO_RESULT"):
        zero.parse_result("no result here\n")


def test_step_time_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    times = [1.0, 0.5, 0.03, 0.01, 0.02, 0.04]  # steps 1-2 (start-up) are left out
    path.write_text("".join(json.dumps({"step": i + 1, "step_time_s": t, "samples_per_s": 8 / t}) + "\n"
                            for i, t in enumerate(times)))
    ms, n = zero.step_time_from_metrics(path)
    assert n == 4 and ms == pytest.approx(25.0)
    path.write_text(json.dumps({"step": 1, "step_time_s": 0.2}) + "\n")
    assert zero.step_time_from_metrics(path) == (pytest.approx(200.0), 1)  # never skips every step
    path.write_text("")
    with pytest.raises(ValueError, match="no step"):
        zero.step_time_from_metrics(path)


def test_shared_measurement_runs_once_and_keeps_its_error():
    calls = []

    def boom():
        calls.append(1)
        raise OSError("worker could not start")

    once = zero._Once(boom)
    with pytest.raises(OSError, match="worker could not start"):  # in full, once
        once()
    with pytest.raises(RuntimeError, match="shared measurement failed.*OSError: worker could not start"):
        once()
    assert len(calls) == 1


def test_cases_are_lazy_and_self_timed():
    # building (or listing) the cases starts no process: every provider is SelfTimed
    cases = list(zero.cases(torch.device("cpu"), True))
    names = [c.name for c in cases]
    assert "momentum update ZeRO-3 fp32" in names and any(n.endswith("train step") for n in names)
    for c in cases:
        assert c.providers and all(isinstance(f, SelfTimed) for f in c.providers.values())
        assert set(c.baselines + c.candidates) <= set(c.providers)


@pytest.mark.distributed
def test_momentum_worker_two_ranks():
    reps = 2
    res = zero.measure_momentum_update(torch.device("cpu"), "moco_v3_micro", ("fp32",), warmup=1, reps=reps,
                                       world=2, timeout=300)
    assert res["world"] == 2 and res["model"] == "moco_v3_micro"
    (r,) = res["results"]
    assert r["precision"] == "fp32" and r["dtype"] == "float32"
    assert r["max_rss_mb"] > 0 and r["tensors"] > 0 and 0 < r["numel"] <= 2 * r["shard_numel"]
    for key in ("local", "gathered"):
        assert len(r[f"{key}_ms"]) == reps
        assert all(t > 0 and math.isfinite(t) for t in r[f"{key}_ms"])
        assert min(r[f"{key}_ms"]) <= r[f"{key}_median_ms"] <= max(r[f"{key}_ms"])


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or not hasattr(os, "getuid"), reason="needs /dev/shm")
def test_removes_only_its_own_shm_buffers():
    # DeepSpeed's CPU comm op leaves one /dev/shm segment per rank; the benchmark removes its runs' own
    port = f"test{uuid.uuid4().hex[:8]}"
    mine = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in range(2)]
    other = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}x_0"
    try:
        for p in mine + [other]:
            open(p, "w").close()
        assert remove_cpu_shm_segments(port, range(2)) == mine
        assert not any(os.path.exists(p) for p in mine) and os.path.exists(other)
        assert remove_cpu_shm_segments(port, range(2)) == []  # already gone: no error
    finally:
        for p in mine + [other]:
            if os.path.exists(p):
                os.unlink(p)


@pytest.mark.distributed
def test_fsdp_train_step_measured_by_the_ranks():
    import torch

    m = zero.measure_train_step(torch.device("cpu"), "vit_micro", 4, 4, "fp32", "fsdp", 2, timeout=300)
    assert m.ms > 0 and m.runs >= 1
