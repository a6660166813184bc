"""``vlfast train``: runs, metrics, atomic checkpoints, exact kill-and-resume, CSV / wds data, bad input."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import pytest
from PIL import Image  # installed by the Makefile: a missing one fails, never skips

from _train_run import kill_when  # the wait-then-kill of the multi-rank SIGKILL tests

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SLOW = pytest.mark.slow  # each case starts a Python process (~3 s); the fast suite keeps two of them


def _cmd(*args):
    return [sys.executable, "-m", "vlfast", "train", "--no-progress", "--threads", "1", *args]


def _run(*args, timeout=120):
    return subprocess.run(_cmd(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(out):
    recs = {}
    for r in _records(out):
        recs[r["step"]] = r["loss"]  # the last record per step wins
    return recs


def test_train_clip_synthetic(tmp_path):
    out = str(tmp_path / "run")
    r = _run("--model", "clip_micro", "--steps", "6", "--batch-size", "4", "--out", out)
    assert r.returncode == 0, r.stderr
    recs = _records(out)
    assert [x["step"] for x in recs] == list(range(1, 7))
    for x in recs:
        for k in ("step", "loss", "samples_per_s", "lr", "time"):
            assert k in x
        assert x["loss"] == x["loss"] and x["samples_per_s"] > 0
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step_6"
    files = set(os.listdir(os.path.join(root, "step_6")))
    assert {"model.pt", "optimizer.pt", "trainer_state.pt", "args.json"} <= files
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]


def test_python_m_and_cli_entry(tmp_path):
    from vlfast.cli import main

    out = str(tmp_path / "r")
    assert main(["train", "--model", "vit_micro", "--steps", "1", "--batch-size", "2", "--out", out,
                 "--no-progress", "--ema", "0.9"]) == 0
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_1", "ema.pt"))


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    common = ["--model", "vit_micro", "--batch-size", "4", "--save-every", "3", "--seed", "7"]
    b = str(tmp_path / "b")
    latest = os.path.join(b, "checkpoints", "latest")
    # a run that would go on for a long time, killed with SIGKILL once a checkpoint exists
    p = subprocess.Popen(_cmd(*common, "--steps", "1000000", "--out", b), env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(p, latest, 60, lambda: p.send_signal(signal.SIGKILL))
    with open(latest) as f:
        name = f.read().strip()
    saved = int(name.split("_")[1])
    assert saved >= 3 and saved % 3 == 0
    assert os.path.isfile(os.path.join(b, "checkpoints", name, "trainer_state.pt"))
    # simulate a crash during a later checkpoint write: a half-written tmp dir
    junk = os.path.join(b, "checkpoints", f".tmp-step_{saved + 3}-99999")
    os.makedirs(junk)
    with open(os.path.join(junk, "model.pt"), "wb") as f:
        f.write(b"partial")

    # the uninterrupted reference runs exactly as far as the resumed run, so steps after
    # the checkpoint are always compared
    total = saved + 4
    a = str(tmp_path / "a")
    r = _run(*common, "--steps", str(total), "--out", a)
    assert r.returncode == 0, r.stderr
    ref = _losses(a)
    assert sorted(ref) == list(range(1, total + 1))
    r = _run(*common, "--steps", str(total), "--out", b, "--resume")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(junk)
    got = _losses(b)
    assert sorted(got) == list(range(1, total + 1))
    for s in range(1, total + 1):
        assert got[s] == ref[s], (s, got[s], ref[s])


@pytest.mark.slow
def test_resume_ignores_partial_tmp_checkpoint(tmp_path):
    common = ["--model", "vit_micro", "--batch-size", "2", "--seed", "1"]
    full = str(tmp_path / "full")
    assert _run(*common, "--steps", "4", "--out", full).returncode == 0
    out = str(tmp_path / "o")
    assert _run(*common, "--steps", "2", "--out", out).returncode == 0
    root = os.path.join(out, "checkpoints")
    junk = os.path.join(root, ".tmp-step_3-12345")
    os.makedirs(junk)
    with open(os.path.join(root, "latest.tmp-12345"), "w") as f:
        f.write("step_3")
    r = _run(*common, "--steps", "4", "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    assert not os.path.exists(junk) and not os.path.exists(os.path.join(root, "latest.tmp-12345"))
    assert _losses(out) == _losses(full)


def _png(path, color, size=(40, 24)):
    Image.new("RGB", size, color).save(path)


@pytest.mark.slow
def test_csv_data_skips_bad_images(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for i in range(5):
        _png(d / f"img{i}.png", (40 * i, 255 - 40 * i, 100))
        rows.append((f"img{i}.png", f"a picture number {i}"))
    (d / "corrupt.png").write_bytes(b"this is not a png")
    rows.insert(1, ("corrupt.png", "broken"))
    rows.insert(3, ("missing.png", "gone"))
    with open(d / "data.csv", "w") as f:
        f.write("image,caption\n")
        for img, cap in rows:
            f.write(f"{img},{cap}\n")
    out = str(tmp_path / "run")
    r = _run("--model", "clip_micro", "--data", f"csv:{d / 'data.csv'}", "--steps", "2", "--batch-size", "2",
             "--out", out, "--no-shuffle")  # file order: both bad rows fall in the first two batches
    assert r.returncode == 0, r.stderr
    recs = _records(out)
    assert len(recs) == 2
    assert recs[-1]["skipped_images"] == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("skipping unreadable image") == 2


@pytest.mark.slow
def test_csv_data_image_only_model_epochs(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "data.csv", "w") as f:
        f.write("image,caption,label\n")
        for i in range(4):
            _png(d / f"i{i}.png", (10 * i, 20, 30))
            f.write(f"{d / f'i{i}.png'},cap {i},{i % 3}\n")
    out = str(tmp_path / "run")
    r = _run("--model", "vit_micro", "--data", f"csv:{d / 'data.csv'}", "--epochs", "1", "--batch-size", "2",
             "--out", out)
    assert r.returncode == 0, r.stderr
    assert len(_records(out)) == 2


@pytest.mark.slow
def test_wds_data(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (36, 36), (50 * i, 10, 200)).save(buf, format="JPEG" if i % 2 else "PNG")
            for name, data in ((f"s{i:04d}.{'jpg' if i % 2 else 'png'}", buf.getvalue()),
                               (f"s{i:04d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "run")
    r = _run("--model", "clip_micro", "--data", f"wds:{tmp_path}/shard-{{000..000}}.tar", "--steps", "2",
             "--batch-size", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    recs = _records(out)
    assert len(recs) == 2 and recs[-1]["skipped_images"] == 0


@pytest.mark.parametrize("args", [
    ["--model", "no_such_model", "--steps", "1"],
    pytest.param(["--model", "clip_micro", "--data", "ftp:whatever"], marks=SLOW),
    ["--model", "clip_micro", "--data", "csv:/nonexistent/dir/data.csv", "--steps", "1"],
    pytest.param(["--model", "clip_micro", "--batch-size", "0"], marks=SLOW),
    pytest.param(["--model", "clip_micro", "--batch-size", "-3"], marks=SLOW),
    pytest.param(["--model", "clip_micro", "--steps", "2", "--epochs", "1"], marks=SLOW),
    pytest.param(["--model", "clip_micro", "--data", "csv:DATA"], marks=SLOW),  # real data without --steps/--epochs
    pytest.param(["--model", "clip_micro", "--epochs", "1"], marks=SLOW),  # synthetic data with --epochs
    pytest.param(["--model", "clip_micro", "--precision", "fp16"], marks=SLOW),
    pytest.param(["--model", "clip_micro", "--data", "wds:/nonexistent/{000..001}.tar", "--steps", "1"], marks=SLOW),
])
def test_bad_input(tmp_path, args):
    import torch

    if "fp16" in args and torch.cuda.is_available():
        pytest.skip("fp16 is valid with CUDA")
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("image,caption\nx.png,hi\n")
    args = [a.replace("DATA", str(csv_path)) for a in args]
    r = _run(*args, "--out", str(tmp_path / "o"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "vlfast train: error:" in ln]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
