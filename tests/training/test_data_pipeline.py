"""The real-data pipeline: DataLoader workers, seeded per-epoch shuffle, skipped images, exact resume."""

import io
import tarfile

import pytest
import torch
from PIL import Image

from vlfast import models
from vlfast.training.data import DataError, build_data


def _make_csv(d, n=11, bad=(2, 7)):
    d.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption,label"]
    for i in range(n):
        if i in bad:
            (d / f"{i}.png").write_bytes(b"not an image")
        else:
            Image.new("RGB", (18, 14), (20 * i % 256, 255 - 20 * i % 256, 90)).save(d / f"{i}.png")
        rows.append(f"{i}.png,caption {i},{i % 3}")
    (d / "data.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{d / 'data.csv'}"


@pytest.fixture(scope="module")
def clip():
    return models.create("clip_micro")


def _stream(spec, model, steps, **kw):
    data = build_data(spec, model, 4, seed=5, warn=lambda m: None, **kw)
    out = []
    try:
        for _ in range(steps):
            b = data.next_batch()
            out.append((b["images"].clone(), b["input_ids"].clone(), data.position, data.skipped))
    finally:
        data.close()
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ia, pa, sa), (xb, ib, pb, sb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ia, ib) and (pa, sa) == (pb, sb)


def test_workers_give_the_batches_of_the_training_process(tmp_path, clip):
    spec = _make_csv(tmp_path / "d")
    ref = _stream(spec, clip, 7, workers=0)
    _same(ref, _stream(spec, clip, 7, workers=2))
    assert ref[-1][3] == 2  # both bad images found (7 steps x 4 > one epoch), counted once


def test_shuffle_is_a_new_permutation_per_epoch_and_seeded(tmp_path, clip):
    spec = _make_csv(tmp_path / "d", n=8, bad=())
    data = build_data(spec, clip, 4, seed=1, shuffle=True)
    seen = []
    for _ in range(4):  # two epochs
        ids = data.next_batch()["input_ids"]
        seen.extend(data.tokenizer.decode(row.tolist()) for row in ids)
    data.close()
    e0, e1 = seen[:8], seen[8:]
    assert sorted(e0) == sorted(e1) == sorted(f"caption {i}" for i in range(8))  # each epoch: every sample once
    assert e0 != e1 and e0 != sorted(e0, key=lambda c: int(c.split()[1]))  # shuffled, differently per epoch
    again = build_data(spec, clip, 4, seed=1, shuffle=True)
    first = [again.tokenizer.decode(r.tolist()) for r in again.next_batch()["input_ids"]]
    again.close()
    assert first == e0[:4]
    plain = build_data(spec, clip, 4, seed=1, shuffle=False)
    assert [plain.tokenizer.decode(r.tolist()) for r in plain.next_batch()["input_ids"]] == [
        f"caption {i}" for i in range(4)]
    plain.close()


def test_resume_mid_stream_is_exact(tmp_path, clip):
    spec = _make_csv(tmp_path / "d")
    whole = _stream(spec, clip, 6, workers=1)
    data = build_data(spec, clip, 4, seed=5, warn=lambda m: None, workers=1)
    for _ in range(3):
        data.next_batch()
    state = data.state_dict()
    data.close()
    resumed = build_data(spec, clip, 4, seed=5, warn=lambda m: None, workers=1)
    resumed.load_state_dict(state)
    rest = []
    for _ in range(3):
        b = resumed.next_batch()
        rest.append((b["images"], b["input_ids"], resumed.position, resumed.skipped))
    resumed.close()
    _same(whole[3:], rest)
    other = build_data(spec, clip, 4, seed=6, warn=lambda m: None)
    with pytest.raises(DataError, match="--seed"):
        other.load_state_dict(state)


def test_wds_workers_read_members_without_shared_handles(tmp_path, clip):
    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (40 * i, 10, 200)).save(buf, format="PNG")
            for name, data in ((f"k{i}.png", buf.getvalue()), (f"k{i}.txt", f"cap {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    spec = f"wds:{shard}"
    _same(_stream(spec, clip, 4, workers=0), _stream(spec, clip, 4, workers=2))


def test_bad_pipeline_arguments(tmp_path, clip):
    spec = _make_csv(tmp_path / "d", bad=())
    with pytest.raises(ValueError, match="workers"):
        build_data(spec, clip, 4, seed=0, workers=-1)
    with pytest.raises(ValueError, match="workers"):
        build_data(spec, clip, 4, seed=0, workers=True)
