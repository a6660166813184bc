"""Shared by the multi-rank training tests: ``vlfast train`` in a subprocess with a clean rank environment."""

import json
import os
import subprocess
import sys

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def _run(*args, timeout=300):
    cmd = [sys.executable, "-m", "vlfast", "train", "--no-progress", "--threads", "1", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def kill_when(p, path: str, timeout: float, kill) -> None:
    """Wait until ``path`` exists (the run ``p`` still going), then ``kill()`` and reap ``p``."""
    import time

    try:
        deadline = time.time() + timeout
        while not os.path.exists(path):
            assert p.poll() is None, "the run exited early"
            assert time.time() < deadline, f"no {os.path.basename(path)} within {timeout:g} s"
            time.sleep(0.02)
    finally:
        kill()
        p.wait()


def kill_and_resume(tmp_path, engine_args, torn: str):
    """``albef_micro --ema`` on 2 ranks with ``engine_args`` (``--zero 3`` / ``--fsdp``): the launcher and
    both ranks killed with SIGKILL (the process group: a crashed node) once a checkpoint exists, a
    half-written ``.tmp`` checkpoint folder (holding ``torn``) planted beside it; resumed, the run logs
    exactly the losses of the uninterrupted run."""
    import signal
    import time

    from vlfast.comm import free_port
    from vlfast.distributed.zero import remove_cpu_shm_segments

    common = ("--model", "albef_micro", "--batch-size", "8", "--nproc", "2", *engine_args, "--save-every", "2",
              "--ema", "0.9", "--lr", "1e-3")
    b = str(tmp_path / "b")
    latest = os.path.join(b, "checkpoints", "latest")
    port = str(free_port())
    cmd = [sys.executable, "-m", "vlfast", "train", "--no-progress", "--threads", "1", *common, "--steps", "1000000",
           "--out", b]
    p = subprocess.Popen(cmd, env=dict(ENV, MASTER_PORT=port), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # the launcher and its ranks (they die with it): a crashed node
        kill_when(p, latest, 240, lambda: os.killpg(p.pid, signal.SIGKILL))
    finally:
        time.sleep(0.5)
        remove_cpu_shm_segments(port, range(2))  # DeepSpeed's CPU segments: nobody was left to remove them
    with open(latest) as f:
        saved = int(f.read().strip().split("_")[1])
    assert saved >= 2 and saved % 2 == 0
    os.makedirs(os.path.join(b, "checkpoints", f".tmp-step_{saved + 2}-dist", torn))  # a torn write

    total = saved + 3
    a = str(tmp_path / "a")
    r = _run(*common, "--steps", str(total), "--out", a)
    assert r.returncode == 0, r.stderr[-4000:]
    r = _run(*common, "--steps", str(total), "--out", b, "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "removed partial checkpoint" in r.stderr, r.stderr[-4000:]
    assert f"resumed from {os.path.join(b, 'checkpoints')}" in r.stderr, r.stderr[-4000:]
    ref, got = _losses(a), _losses(b)
    assert len(ref) == len(got) == total
    assert got == ref, [(i + 1, x, y) for i, (x, y) in enumerate(zip(got, ref)) if x != y]
