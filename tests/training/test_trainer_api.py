"""The structure of ``vlfast train``: :class:`Trainer` from Python, :class:`CheckpointManager` owning every
file name, torchrun's launcher for ``--nproc`` (a failing rank, ranks dying with a SIGKILLed launcher)."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from vlfast.training import CheckpointError, CheckpointManager, StepFolder, Trainer, main

from _train_run import ENV

ARGS = ["--model", "vit_micro", "--batch-size", "4", "--no-progress", "--threads", "1", "--lr", "1e-3"]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_trainer_steps_state_and_resume_equal_the_cli(tmp_path):
    cli = str(tmp_path / "cli")
    assert main([*ARGS, "--steps", "4", "--out", cli]) == 0
    ref = [r["loss"] for r in _metrics(cli)]

    out = str(tmp_path / "api")
    trainer = Trainer.from_argv([*ARGS, "--steps", "4", "--out", out, "--save-every", "2"])
    assert (trainer.step, trainer.total_steps, trainer.world_size) == (0, 4, 1)
    assert isinstance(trainer.checkpoints, CheckpointManager)
    loss = trainer.train_step(trainer.data.next_batch())  # one step by hand ...
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert trainer.step == 1 and loss.item() == pytest.approx(ref[0], rel=1e-6)
    loss = trainer.train_step(trainer.data.next_batch())
    assert loss.item() == pytest.approx(ref[1], rel=1e-6)
    state = trainer.state_dict()
    assert set(state) == {"step", "data"} and state["step"] == 2
    folder = trainer.save()
    assert isinstance(folder, StepFolder) and folder == trainer.checkpoints.step_folder(2)
    assert trainer.checkpoints.latest() == folder and folder.is_complete()
    del trainer
    # ... then a new trainer resumes from the checkpoint and the loop finishes the run like the CLI's
    trainer = Trainer.from_argv([*ARGS, "--steps", "4", "--out", out, "--resume"])
    assert trainer.step == 2
    last = trainer.train()
    got = [r["loss"] for r in _metrics(out)]
    assert got == pytest.approx(ref[2:], rel=1e-6) and last == pytest.approx(ref[-1], rel=1e-6)
    assert trainer.checkpoints.latest() == trainer.checkpoints.step_folder(4)


def test_trainer_from_argv_refuses_nproc_outside_a_launcher(tmp_path, monkeypatch):
    from vlfast.training import TrainError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TrainError, match="--nproc starts processes"):
        Trainer.from_argv([*ARGS, "--steps", "1", "--out", str(tmp_path), "--nproc", "2", "--fsdp"])


def test_checkpoint_manager_layout_and_resolve(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    f = mgr.step_folder(7)
    assert f.path == os.path.join(str(tmp_path), "checkpoints", "step_7") and os.fspath(f) == str(f) == f.path
    assert (os.path.basename(f.model), os.path.basename(f.ema), os.path.basename(f.state)) == (
        "model.pt", "ema.pt", "trainer_state.pt")
    assert os.path.basename(f.rng(3)) == "rng_rank3.pt" and os.path.basename(f.momentum_masters(1)) == \
        "momentum_masters_rank1.pt"
    assert mgr.latest() is None
    with pytest.raises(CheckpointError, match="no such folder"):
        CheckpointManager.resolve(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not a run folder"):
        CheckpointManager.resolve(str(tmp_path))
    os.makedirs(f.path)
    with open(os.path.join(mgr.root, "latest"), "w") as fh:
        fh.write("step_7\n")
    assert mgr.latest() is None  # no trainer state: not complete
    with pytest.raises(CheckpointError, match="has no model.pt"):
        CheckpointManager.resolve(str(tmp_path))
    torch.save({}, f.model)
    torch.save({"step": 7}, f.state)
    for p in (str(tmp_path), mgr.root, os.path.join(mgr.root, "latest"), f.path):
        assert CheckpointManager.resolve(p) == f
    assert mgr.latest() == f


def test_file_names_are_spelled_only_by_the_checkpoint_manager():
    """Every checkpoint file name lives in vlfast/training/checkpoint.py (the issue: "one checkpoint manager
    that owns every file name"): no other module of the package spells one as a string literal."""
    import vlfast

    names = ["model.pt", "ema.pt", "optimizer.pt", "scaler.pt", "trainer_state.pt", "args.json", "rng_rank",
             "momentum_masters_rank", "metrics.jsonl", "latest"]
    root = os.path.dirname(vlfast.__file__)
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or path.endswith(os.path.join("training", "checkpoint.py")):
                continue
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):  # string constants and the literal parts of f-strings
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value.strip():
                    # (a text with a space is a message or help text that mentions a name, not a path built)
                    if any(n in node.value for n in names):
                        found.append((os.path.relpath(path, root), node.value))
    assert found == [], found


@pytest.mark.distributed
def test_failing_rank_reported_and_the_others_stopped(tmp_path):
    """--nproc 2 where the ranks fail by themselves (a --deepspeed-config file that is not JSON, read by every
    rank): the launcher's exit code is the failing rank's (2, not the -15 of a rank it stopped), the rank is
    named, and the rank's own error line is shown."""
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    cmd = [sys.executable, "-m", "vlfast", "train", *ARGS, "--steps", "2", "--out", str(tmp_path / "o"), "--nproc",
           "2", "--zero", "1", "--deepspeed-config", str(bad)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert re.search(r"vlfast train: error: rank [01] exited with code 2", r.stderr), r.stderr[-3000:]
    assert "DeepSpeed config" in r.stderr


def _children(pid: int) -> list:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_sigkilled_launcher(tmp_path):
    """torchrun's launcher starts each rank in a session of its own: SIGKILL of the launcher alone (not its
    process group) must still end both ranks, so they do not train on into the run folder."""
    out = str(tmp_path / "o")
    cmd = [sys.executable, "-m", "vlfast", "train", *ARGS, "--steps", "1000000", "--out", out, "--nproc", "2",
           "--fsdp", "--log-every", "1"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.time() + 240
        while not (os.path.isfile(os.path.join(out, "metrics.jsonl")) and len(ranks) == 2):
            assert p.poll() is None, "the run exited early"
            assert time.time() < deadline, "no step logged within 240 s"
            ranks = _children(p.pid)
            time.sleep(0.1)
        assert all(os.getsid(r) != os.getsid(p.pid) for r in ranks)  # the premise: sessions of their own
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.time() + 30
        while any(_alive(r) for r in ranks) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(r) for r in ranks), "a rank outlived its SIGKILLed launcher"
    finally:
        for r in ranks:
            if _alive(r):
                os.kill(r, signal.SIGKILL)
