"""Checkpoints are read with ``weights_only=True``: a crafted pickle in a checkpoint runs nothing.

A planted file whose unpickling would call ``os.system`` (``touch`` a marker file) replaces one
file of a real checkpoint; ``vlfast train --resume`` must refuse it with one error line, exit 2,
and the marker must not exist.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlfast.cli import main
from vlfast.training import checkpoint as ckpt


class _Planted:
    """Unpickling this calls ``os.system(cmd)`` (what a malicious checkpoint does)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _plant(path, marker):
    torch.save({"state": _Planted(f"touch {marker}"), "w": torch.ones(3)}, path)


def test_load_file_refuses_code_and_reads_plain_files(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _plant(evil, marker)
    # the planted file really is a working exploit under weights_only=False
    if sys.platform != "win32":
        torch.load(evil, weights_only=False)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ckpt.CheckpointError, match="refusing to load .*evil.pt.*posix.system|refusing to load"):
        ckpt.load_file(str(evil))
    assert not marker.exists()

    plain = tmp_path / "plain.pt"
    obj = {"a": torch.arange(5.0), "n": 3, "s": "x", "t": (1, 2.5, None), "l": [torch.ones(2)], "set": {1, 2}}
    torch.save(obj, plain)
    got = ckpt.load_file(str(plain), mmap=True)
    assert got["set"] == {1, 2} and got["t"] == (1, 2.5, None) and torch.equal(got["a"], obj["a"])
    legacy = tmp_path / "legacy.pt"
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)  # cannot be memory-mapped: plain read
    assert torch.equal(ckpt.load_file(str(legacy), mmap=True)["a"], obj["a"])

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="junk.pt"):
        ckpt.load_file(str(junk))


class _Plain:
    """A plain data class: accepted only when allowed."""


def test_load_file_allow_list(tmp_path):
    p = tmp_path / "cls.pt"
    obj = _Plain()
    obj.x = 3
    torch.save({"o": obj}, p)
    with pytest.raises(ckpt.CheckpointError, match="_Plain"):
        ckpt.load_file(str(p))
    assert ckpt.load_file(str(p), allow=[_Plain])["o"].x == 3


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    np.random.seed(11)
    torch.manual_seed(5)
    state = ckpt.rng_state()
    p = tmp_path / "rng.pt"
    torch.save(state, p)
    want = (np.random.rand(4), torch.rand(3))
    ckpt.set_rng_state(ckpt.load_file(str(p)))
    got = (np.random.rand(4), torch.rand(3))
    assert np.array_equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.parametrize("victim", ["model.pt", "trainer_state.pt"])
def test_resume_refuses_planted_pickle(tmp_path, capsys, victim):
    out = str(tmp_path / "run")
    args = ["train", "--model", "vit_micro", "--batch-size", "2", "--out", out, "--no-progress", "--threads", "1"]
    assert main([*args, "--steps", "1", "--ema", "0.9"]) == 0
    step = os.path.join(out, "checkpoints", "step_1")
    marker = tmp_path / "pwned"
    _plant(os.path.join(step, victim), marker)
    capsys.readouterr()
    assert main([*args, "--steps", "2", "--ema", "0.9", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vlfast train: error: refusing to load") and victim in err[-1], err
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_resume_refuses_planted_pickle(tmp_path):
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "vlfast", "train", "--model", "vit_micro", "--batch-size", "2", "--out", out,
            "--no-progress", "--threads", "1", "--zero", "2"]
    r = subprocess.run([*args, "--steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the real files load under weights_only=True with DeepSpeed's plain classes allowed: resume works
    r = subprocess.run([*args, "--steps", "2", "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    ds_dir = os.path.join(out, "checkpoints", "step_2", "deepspeed")
    optim = [f for f in os.listdir(ds_dir) if f.endswith("optim_states.pt")]
    assert optim, os.listdir(ds_dir)
    marker = tmp_path / "pwned"
    _plant(os.path.join(ds_dir, optim[0]), marker)
    r = subprocess.run([*args, "--steps", "3", "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vlfast train: error: refusing to load") and optim[0] in last, r.stderr
    assert not marker.exists()


def test_safetensors_export(tmp_path):
    from safetensors.torch import load_file as st_load

    from vlfast import models

    out = str(tmp_path / "run")
    assert main(["train", "--model", "albef_micro", "--batch-size", "2", "--out", out, "--no-progress", "--threads",
                 "1", "--steps", "1", "--ema", "0.9", "--safetensors"]) == 0
    step = os.path.join(out, "checkpoints", "step_1")
    model_pt = ckpt.load_file(os.path.join(step, "model.pt"))
    exported = st_load(os.path.join(step, "model.safetensors"))
    assert set(exported) == {k for k, v in model_pt.items() if isinstance(v, torch.Tensor)}  # stored sorted
    assert all(torch.equal(exported[k], model_pt[k]) for k in exported)
    m = models.create("albef_micro")
    m.load_state_dict(exported)  # strict: tied weights stored under every name
    assert os.path.isfile(os.path.join(step, "ema.safetensors"))
