"""``vlfast eval``: zero-shot, retrieval and kNN on checkpoints written by ``vlfast train``; bad input."""

import json
import os

import pytest
import torch
from PIL import Image

from vlfast.cli import main
from vlfast.training import evaluate as E

COLORS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (220, 220, 30), (200, 40, 210)]
NAMES = ["red", "green", "blue", "yellow", "purple"]


def _dataset(d, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption,label"]
    for i in range(n):
        c = i % len(COLORS)
        noise = (torch.rand(20, 20, 3, generator=g) * 40).to(torch.uint8)
        arr = (torch.tensor(COLORS[c], dtype=torch.uint8).expand(20, 20, 3) // 2 + noise).numpy()
        Image.fromarray(arr).save(d / f"{i}.png")
        rows.append(f"{i}.png,{NAMES[c]} {i},{c}")
    (d / "data.csv").write_text("\n".join(rows) + "\n")
    (d / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return d


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = _dataset(root / "data")
    out = str(root / "run")
    assert main(["train", "--model", "clip_micro", "--data", f"csv:{data / 'data.csv'}", "--steps", "3",
                 "--batch-size", "5", "--out", out, "--no-progress", "--ema", "0.5"]) == 0
    return data, out


def _eval(capsys, *args):
    capsys.readouterr()
    rc = main(["eval", *args])
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def test_zeroshot_matches_a_direct_computation(clip_run, capsys):
    data, out = clip_run
    rc, lines, _ = _eval(capsys, "--model", "clip_micro", "--checkpoint", out, "--data", f"csv:{data / 'data.csv'}",
                         "--task", "zeroshot", "--classnames", str(data / "classes.txt"), "--batch-size", "3")
    assert rc == 0
    res = json.loads(lines[-1])
    assert res["samples"] == 10 and res["classes"] == 5 and res["checkpoint"].endswith("step_3")
    # the same metric from the model's own encoders, written out here
    model, _ = E.load_model("clip_micro", out)
    from vlfast.models.tokenizer import ByteTokenizer
    from vlfast.training.data import load_image

    spec = E._open_data(f"csv:{data / 'data.csv'}", model, need_captions=False, need_labels=True).spec
    size = spec.image_size
    imgs = torch.stack([load_image(str(data / f"{i}.png"), size, 3) for i in range(10)])
    ids, mask = ByteTokenizer()([f"a photo of a {n}." for n in NAMES], spec.text_len)
    with torch.no_grad():
        fi = torch.nn.functional.normalize(model.encode_image(imgs), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(ids, attention_mask=mask), dim=-1)
    pred = (fi @ ft.T).argmax(1)
    want = float((pred == torch.arange(10) % 5).float().mean())
    assert res["top1"] == pytest.approx(want)
    assert res["top5"] == 1.0  # 5 classes


def test_retrieval_and_checkpoint_paths(clip_run, capsys):
    data, out = clip_run
    step = os.path.join(out, "checkpoints", "step_3")
    results = []
    for path in (out, os.path.join(out, "checkpoints"), os.path.join(out, "checkpoints", "latest"), step):
        rc, lines, _ = _eval(capsys, "--model", "clip_micro", "--checkpoint", path, "--data",
                             f"csv:{data / 'data.csv'}", "--task", "retrieval")
        assert rc == 0
        results.append(json.loads(lines[-1]))
    assert all(r == results[0] for r in results)
    r = results[0]
    for k in (1, 5, 10):
        assert 0.0 <= r[f"image_to_text_R@{k}"] <= 1.0 and 0.0 <= r[f"text_to_image_R@{k}"] <= 1.0
    assert r["image_to_text_R@10"] == 1.0 and r["text_to_image_R@10"] == 1.0  # 10 samples
    assert r["image_to_text_R@1"] <= r["image_to_text_R@5"]
    rc, lines, _ = _eval(capsys, "--model", "clip_micro", "--checkpoint", out, "--data", f"csv:{data / 'data.csv'}",
                         "--task", "retrieval", "--ema")
    assert rc == 0 and json.loads(lines[-1])["samples"] == 10


def test_recall_and_knn_known_answers():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.3]])
    r = E._recall(sim, ks=(1, 2))
    assert r == {1: pytest.approx(2 / 3), 2: 1.0}  # row 1's match ranks second
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1]])
    acc = E._topk_accuracy(scores, torch.tensor([1, 1]), ks=(1, 2))
    assert acc == {"top1": 0.5, "top2": 1.0}


@pytest.mark.parametrize("model", ["vit_micro", "mae_micro", "moco_v3_micro"])
def test_knn_on_ssl_models(tmp_path, capsys, model):
    data = _dataset(tmp_path / "data", n=10)
    out = str(tmp_path / "run")
    assert main(["train", "--model", model, "--data", f"csv:{data / 'data.csv'}", "--steps", "1", "--batch-size", "2",
                 "--out", out, "--no-progress"]) == 0
    spec = f"csv:{data / 'data.csv'}"
    rc, lines, _ = _eval(capsys, "--model", model, "--checkpoint", out, "--data", spec, "--task", "knn",
                         "--knn-train", spec, "--knn-k", "1")
    assert rc == 0, lines
    res = json.loads(lines[-1])
    assert res["top1"] == 1.0 and res["k"] == 1 and res["train_samples"] == 10  # its own nearest neighbour


@pytest.mark.parametrize("extra,msg", [
    (["--task", "zeroshot"], "--classnames"),
    (["--task", "knn"], "--knn-train"),
    (["--task", "zeroshot", "--classnames", "/nonexistent/x.txt"], "cannot read --classnames"),
    (["--task", "zeroshot", "--classnames", "CLASSES", "--prompt", "no slot"], "--prompt"),
    (["--task", "retrieval", "--data", "synthetic"], "real data"),
    (["--task", "retrieval", "--checkpoint", "/nonexistent/run"], "no such folder"),
    (["--task", "retrieval", "--model", "no_such_model"], "unknown model"),
    (["--task", "retrieval", "--model", "vit_micro"], "does not hold 'vit_micro' weights"),
    (["--task", "retrieval", "--ema", "--checkpoint", "EMPTYRUN"], "has no model.pt|not a run folder"),
])
def test_bad_input_one_error_line(clip_run, capsys, tmp_path, extra, msg):
    data, out = clip_run
    args = {"--model": "clip_micro", "--checkpoint": out, "--data": f"csv:{data / 'data.csv'}"}
    it = iter(extra)
    rest = []
    for a in it:
        if a in args:
            args[a] = next(it)
        else:
            rest.append(a)
    rest = [str(data / "classes.txt") if a == "CLASSES" else a for a in rest]
    if args["--checkpoint"] == "EMPTYRUN":
        args["--checkpoint"] = str(tmp_path)
    argv = [x for kv in args.items() for x in kv] + rest
    rc, lines, err = _eval(capsys, *argv)
    assert rc == 2 and not lines
    assert len(err) == 1 and err[0].startswith("vlfast eval: error:"), err
    import re
    assert re.search(msg, err[0]), err


def test_planted_pickle_refused(clip_run, capsys, tmp_path):
    import shutil

    data, out = clip_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Planted()}, run / "checkpoints" / "step_3" / "model.pt")
    rc, lines, err = _eval(capsys, "--model", "clip_micro", "--checkpoint", str(run), "--data",
                           f"csv:{data / 'data.csv'}", "--task", "retrieval")
    assert rc == 2 and "refusing to load" in err[-1] and not marker.exists()
