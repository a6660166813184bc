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
