"""The digits end-to-end benchmark (vlfast.bench.digits) on random arrays: no scikit-learn needed.

The data set writer (files, CSV columns, a disjoint seeded split, captions and labels matching the
input arrays, the PNG pixels against a numpy nearest-neighbour upscale), its argument checks, the
caption-length check, and a tiny end-to-end run (2 training steps, both evaluations) whose zero-shot
top-1 is recomputed here from the checkpoint with our own decoding and matrix product.  One extra
test runs the writer on the real scikit-learn digits when scikit-learn is installed.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch

from vlfast.bench import digits as D

WORDS = D.CLASSNAMES["words"]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _random_set(n=23, h=7, w=5, classes=4, seed=3):
    g = np.random.default_rng(seed)
    images = g.uniform(0.1, 11.0, size=(n, h, w))  # non-zero everywhere
    labels = np.concatenate([np.arange(classes), g.integers(0, classes, n - classes)])  # every class present
    return images, labels


def test_split_is_disjoint_complete_and_seeded():
    tr, te = D.split_indices(23, 0.7, seed=5)
    assert len(tr) == 16 and len(te) == 7
    assert set(tr).isdisjoint(te) and sorted(set(tr) | set(te)) == list(range(23))
    tr2, te2 = D.split_indices(23, 0.7, seed=5)
    assert tr.tolist() == tr2.tolist() and te.tolist() == te2.tolist()
    assert any(D.split_indices(23, 0.7, seed=s)[1].tolist() != te.tolist() for s in range(6, 9))  # seed moves it


@pytest.mark.parametrize("n, frac", [(1, 0.5), (10, 0.0), (10, 1.0), (10, 0.01), (10, 0.99), (10, True)])
def test_split_refuses_empty_parts(n, frac):
    with pytest.raises(ValueError, match="n must|train_frac"):
        D.split_indices(n, frac, seed=0)


def test_writer_files_columns_split_and_captions(tmp_path):
    images, labels = _random_set()
    names = WORDS[:4]
    out = D.write_dataset(images, labels, tmp_path / "a", classnames=names, image_size=35, train_frac=0.7, seed=5,
                          max_value=10.0)
    assert out.n_train == 16 and out.n_test == 7
    tr, te = D.split_indices(23, 0.7, seed=5)
    assert list(out.train_indices) == tr.tolist() and list(out.test_indices) == te.tolist()
    assert (tmp_path / "a" / "classnames.txt").read_text().splitlines() == list(names)
    seen = []
    for path, idx in ((out.train_csv, out.train_indices), (out.test_csv, out.test_indices)):
        cols, rows = _rows(path)
        assert cols == ["image", "caption", "label"]
        assert len(rows) == len(idx)
        for r, i in zip(rows, idx):
            src = int(r["image"].split("/")[-1].split(".")[0])  # images/NNNNN.png: the input row
            assert src == i
            assert int(r["label"]) == labels[i] and r["caption"] == names[labels[i]]
            assert (out.root / r["image"]).is_file()
            seen.append(src)
    assert sorted(seen) == list(range(23))  # disjoint and complete

    # pixels: ink (high values) is dark, max_value and above is black, upscaled by exact blocks (35 = 5*7 = 7*5)
    from PIL import Image

    with Image.open(out.root / "images" / "00004.png") as im:
        assert im.mode == "L" and im.size == (35, 35)
        got = np.asarray(im)
    ref = 255 - np.rint(255 * np.minimum(images[4] / 10.0, 1.0))
    ref = np.repeat(np.repeat(ref, 35 // 7, axis=0), 35 // 5, axis=1)
    assert np.array_equal(got, ref.astype(np.uint8))

    again = D.write_dataset(images, labels, tmp_path / "b", classnames=names, image_size=35, train_frac=0.7, seed=5,
                            max_value=10.0)
    assert again.test_csv.read_text() == out.test_csv.read_text()
    other = D.write_dataset(images, labels, tmp_path / "c", classnames=names, image_size=35, train_frac=0.7, seed=6,
                            max_value=10.0)
    assert other.test_indices != out.test_indices


@pytest.mark.parametrize("change, err, match", [
    (dict(labels=np.array([0, 1, 4])), ValueError, r"labels must lie in \[0, 4\)"),
    (dict(labels=np.array([0, 1])), ValueError, "labels must have shape"),
    (dict(labels=np.array([0.0, 1.0, 2.0])), TypeError, "labels must be integers"),
    (dict(images=np.ones((3, 4))), ValueError, "images must have shape"),
    (dict(images=-np.ones((3, 4, 4))), ValueError, "non-negative"),
    (dict(images=np.full((3, 4, 4), np.nan)), ValueError, "finite"),
    (dict(classnames=["a", "a", "b", "c"]), ValueError, "distinct"),
    (dict(classnames=["a", "b\n", "c", "d"]), ValueError, "line break"),
    (dict(classnames="abcd"), TypeError, "classnames must be a sequence"),
    (dict(image_size=0), ValueError, "image_size"),
    (dict(max_value=0.0), ValueError, "max_value"),
    (dict(train_frac=1.0), ValueError, "train_frac"),
])
def test_writer_refuses_bad_input(tmp_path, change, err, match):
    kw = dict(images=np.ones((3, 4, 4)), labels=np.array([0, 1, 2]), classnames=WORDS[:4], image_size=8,
              train_frac=0.5)
    kw.update(change)
    with pytest.raises(err, match=match):
        D.write_dataset(out=tmp_path / "x", **kw)


def test_writer_refuses_an_existing_set(tmp_path):
    images, labels = _random_set()
    D.write_dataset(images, labels, tmp_path, classnames=WORDS[:4], image_size=8)
    with pytest.raises(FileExistsError, match="train.csv exists"):
        D.write_dataset(images, labels, tmp_path, classnames=WORDS[:4], image_size=8)


def test_captions_must_fit_the_context():
    D.check_captions_fit(WORDS, 16)  # "three", "seven": 5 bytes + [CLS] + [SEP]
    D.check_captions_fit(D.CLASSNAMES["digits"], 3)
    with pytest.raises(ValueError, match="a photo of the digit six"):
        D.check_captions_fit(["a photo of the digit six", "six"], 16)  # the prompt: cut at 16


@pytest.mark.parametrize("argv, match", [(["--train-frac", "1.5"], "train_frac must lie in"),
                                         (["--batch-size", "1"], "batch_size must be >= 2"),
                                         (["--steps", "0"], "steps must be >= 1"),
                                         (["--lr", "nan"], "lr must be a finite number")])
def test_main_refuses_bad_numbers_before_writing(tmp_path, capsys, argv, match):
    assert D.main(["--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("digits: error: ") and match in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_run_pipeline_refuses_bad_settings_before_writing(tmp_path):
    images, labels = _random_set()
    with pytest.raises(TypeError, match="steps must be an int"):
        D.run_pipeline(images, labels, tmp_path / "o", classnames=WORDS[:4], steps=2.0)
    with pytest.raises(ValueError, match="schedule must be"):
        D.run_pipeline(images, labels, tmp_path / "o", classnames=WORDS[:4], schedule="linear")
    with pytest.raises(ValueError, match="exceed the model's text context"):
        D.run_pipeline(images, labels, tmp_path / "o", classnames=["a photo of the digit " + w for w in WORDS[:4]])
    assert not (tmp_path / "o").exists()


def test_a_failing_command_is_named(capfd):
    with pytest.raises(RuntimeError, match=r"`\S+ -m vlfast train --no-such-flag` exited with status 2"):
        D._vlfast(["train", "--no-such-flag"], threads=1, capture=False)
    assert "--no-such-flag" in capfd.readouterr().err


def test_tiny_end_to_end_and_zeroshot_recomputed(tmp_path, capfd):
    images, labels = _random_set(n=20, h=8, w=8, classes=5, seed=11)
    names = WORDS[:5]
    s = D.run_pipeline(images, labels, tmp_path, classnames=names, steps=2, batch_size=4, train_frac=0.75, seed=2,
                       warmup_steps=1, lr=1e-3, threads=1)
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert (s["train_samples"], s["test_samples"], s["classes"], s["steps"]) == (15, 5, 5, 2)
    assert s["loss_chance"] == pytest.approx(math.log(4))
    assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("loss_first", "loss_last", "loss_last10_mean"))
    assert s["zeroshot_samples"] == 5
    assert s["zeroshot_top5"] == 1.0  # 5 classes: every label is in the top 5
    for k in ("retrieval_image_to_text_R@1", "retrieval_text_to_image_R@1"):
        assert 0.0 <= s[k] <= 1.0
    assert s["commands"][0].startswith("vlfast train --model clip_micro --data csv:")
    assert "--prompt '{}'" in s["commands"][1]

    # independent zero-shot: our own PNG decoding and normalization, the class texts through the tokenizer,
    # argmax of the cosine similarities
    from PIL import Image

    from vlfast.models.tokenizer import ByteTokenizer
    from vlfast.training.data import CLIP_MEAN, CLIP_STD
    from vlfast.training.evaluate import load_model

    model, _ = load_model("clip_micro", str(tmp_path / "run"), fused=False)
    _, rows = _rows(tmp_path / "data" / "test.csv")
    x = []
    for r in rows:
        with Image.open(tmp_path / "data" / r["image"]) as im:
            a = torch.tensor(np.asarray(im.convert("RGB")), dtype=torch.float64).permute(2, 0, 1) / 255
        x.append((a - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None])
                 / torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None])
    ids, mask = ByteTokenizer()(list(names), 16)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack(x).float()).double(), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(ids, attention_mask=mask).double(), dim=-1)
    pred = (img @ txt.T).argmax(1)
    top1 = float((pred == torch.tensor([int(r["label"]) for r in rows])).double().mean())
    assert s["zeroshot_top1"] == pytest.approx(top1, abs=1e-6)
    # stdout of the subprocesses went to stderr: stdout stays free for the summary line
    assert capfd.readouterr().out == ""


def test_sklearn_digits_written_when_installed(tmp_path):
    pytest.importorskip("sklearn")
    images, labels = D.load_sklearn_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() >= 0 and images.max() <= D.SKLEARN_MAX_VALUE
    out = D.write_dataset(images, labels, tmp_path, classnames=WORDS, image_size=32, train_frac=0.8, seed=0,
                          max_value=D.SKLEARN_MAX_VALUE)
    assert (out.n_train, out.n_test) == (1438, 359)
    _, rows = _rows(out.test_csv)
    assert {r["caption"] for r in rows} == set(WORDS)
